"""The Hub, for real over HTTP: dataset streaming (``datasets`` and the hf_streamlm pipeline) and
uploads (``HfApi`` and ``push_export``) against a loopback Hub server (tests/hub_server.py), with
dropped connections, 429/503 answers, stalls and permanent failures injected into file downloads.

huggingface_hub retries every file request itself (``http_backoff``: 5 retries, waiting ``Retry-After``
+ 1 s or 1, 2, 4, 8 s); ``datasets`` adds its own attempts around each read (``data.retries``). So a
transient fault costs about a second here, whatever ``data.retry_backoff`` says.
"""

from __future__ import annotations

import json
import re

import pytest

from hf_streamlm.config import load_config
from hf_streamlm.data.pipeline import iter_rows
from tests.hub_fixtures import hub_server, set_read_timeout  # noqa: F401 - the fixture
from tests.conftest import checkpoints_of

REPO = "org/name"
SHARDS = [f"data/train-{i:05d}-of-00003.jsonl" for i in range(3)]
PER_SHARD = 120
DOC_ID = re.compile(r"doc-\d{5}")


def docs(start: int, n: int) -> list[dict]:
    return [{"id": f"doc-{i:05d}", "text": f"doc-{i:05d} " + " ".join(["word"] * (5 + i % 7)) + "."}
            for i in range(start, start + n)]


def jsonl_repo(server, repo: str = REPO) -> list[str]:
    """A dataset repo of 3 jsonl shards; returns the document ids in stream order."""
    ids = []
    for k, shard in enumerate(SHARDS):
        rows = docs(k * PER_SHARD, PER_SHARD)
        server.add_file(f"datasets/{repo}/{shard}", "".join(json.dumps(r) + "\n" for r in rows))
        ids += [r["id"] for r in rows]
    return ids


def parquet_repo(server, repo: str = "org/name-parquet", n: int = 300) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = docs(0, n)
    path = server.repo_dir(repo) / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=50)
    return [r["id"] for r in rows]


def stream_ids(*overrides: str, repo: str = REPO) -> list[str]:
    config = load_config([f"data.sources=[{{path: {repo}}}]", "data.eval_holdout=0", *overrides])
    ids = []
    for text, source in iter_rows(config):
        assert source == 0
        ids += DOC_ID.findall(text)[:1]
    return ids


def assert_same_documents(got: list[str], expected: list[str]) -> None:
    duplicated = sorted({i for i in got if got.count(i) > 1})
    missing = sorted(set(expected) - set(got))
    assert not duplicated and not missing, f"duplicated: {duplicated[:5]}, missing: {missing[:5]}"
    assert got == expected


# ---------------------------------------------------------------------------------------------- streaming


def test_load_dataset_streams_every_shard_through_the_server(hub_server):
    import datasets

    expected = jsonl_repo(hub_server)
    rows = list(datasets.load_dataset(REPO, split="train", streaming=True))
    assert [r["id"] for r in rows] == expected
    for shard in SHARDS:
        assert hub_server.count(shard) >= 1
    assert all(r.range for r in hub_server.requests(method="GET") if r.file)  # ranged reads
    assert hub_server.unhandled == []

    expected = parquet_repo(hub_server)
    rows = list(datasets.load_dataset("org/name-parquet", split="train", streaming=True))
    assert [r["id"] for r in rows] == expected
    assert hub_server.unhandled == []


def test_iter_rows_yields_every_hub_document_once_in_order(hub_server):
    expected = jsonl_repo(hub_server)
    assert_same_documents(stream_ids(), expected)
    expected = parquet_repo(hub_server)
    assert_same_documents(stream_ids(repo="org/name-parquet"), expected)


# ---------------------------------------------------------------------------------------------- faults

FAULTS = {
    "dropped_mid_file": lambda server, shard: server.drop_connection(shard, after_bytes=2000),
    "429_then_success": lambda server, shard: server.fail_with(shard, 429, times=1),
    "503_then_success": lambda server, shard: server.fail_with(shard, 503, times=2),
    "stall_before_headers": lambda server, shard: server.stall(shard, seconds=3),
    "stall_mid_body": lambda server, shard: server.stall(shard, seconds=3, after_bytes=1500),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_transient_fault_loses_and_repeats_nothing(hub_server, monkeypatch, fault):
    expected = jsonl_repo(hub_server)
    set_read_timeout(monkeypatch, 1.0)
    shard = SHARDS[1]
    injected = FAULTS[fault](hub_server, shard)

    ids = stream_ids("data.retries=3", "data.retry_backoff=0")

    assert_same_documents(ids, expected)
    assert injected.fired == injected.times  # the fault happened ...
    faulted = [r for r in hub_server.requests(shard) if r.fault]
    assert len(faulted) == injected.times
    last = hub_server.requests(shard)[-1]  # ... and a later request of the same file succeeded
    assert last.fault is None and last.status in (200, 206)


def raised(err: BaseException, kind: type) -> BaseException:
    """The first exception of type ``kind`` in the chain of ``err`` (hf_streamlm may wrap the client's)."""
    seen = err
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    raise AssertionError(f"no {kind.__name__} in the chain of {err!r}")


def test_rate_limited_forever_is_an_error_after_the_retries(hub_server):
    from huggingface_hub.errors import HfHubHTTPError

    jsonl_repo(hub_server)
    hub_server.fail_with(SHARDS[1], 429, times=None)

    with pytest.raises(Exception) as err:
        stream_ids("data.retries=2", "data.retry_backoff=0")

    # datasets gives up with ConnectionError("Server Disconnected") from the last HfHubHTTPError
    disconnected = raised(err.value, ConnectionError)
    assert str(disconnected) == "Server Disconnected"
    cause = disconnected.__cause__
    assert isinstance(cause, HfHubHTTPError) and cause.response.status_code == 429
    assert "429 Too Many Requests" in str(cause) and SHARDS[1] in str(cause)
    # datasets makes data.retries attempts of the read, huggingface_hub 1 + 5 requests for each
    assert hub_server.count(SHARDS[1]) == 2 * 6


def test_service_unavailable_forever_is_not_retried_by_datasets(hub_server):
    """503 is retried by huggingface_hub only (datasets retries 504 and 429): data.retries does not
    change the number of requests."""
    from huggingface_hub.errors import HfHubHTTPError

    jsonl_repo(hub_server)
    hub_server.fail_with(SHARDS[1], 503, times=None)

    with pytest.raises(Exception) as err:
        stream_ids("data.retries=3", "data.retry_backoff=0")
    http_error = raised(err.value, HfHubHTTPError)
    assert http_error.response.status_code == 503 and "503 Service Unavailable" in str(http_error)
    assert hub_server.count(SHARDS[1]) == 6


def test_transient_error_while_opening_the_source_is_retried(hub_server):
    # A 503 on the repo-info call is retried by neither huggingface_hub nor datasets: hf_streamlm's
    # own retry around load_dataset (data.retries) must absorb it.
    expected = jsonl_repo(hub_server)
    hub_server.fail_with(f"/api/datasets/{REPO}", 503, times=1)
    assert_same_documents(stream_ids("data.retries=3", "data.retry_backoff=0"), expected)


# ---------------------------------------------------------------------------------------------- uploads


def model_folder(path):
    import os

    path.mkdir()
    files = {
        "config.json": json.dumps({"model_type": "gpt2", "n_layer": 2}).encode(),
        "notes/tokenizer.txt": "héllo wörld\n".encode(),
        "model.safetensors": os.urandom(70_000) + bytes(range(256)),
    }
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return files


def assert_downloads(server, repo_id: str, files: dict, cache_dir) -> None:
    from huggingface_hub import hf_hub_download

    for name, data in files.items():
        local = hf_hub_download(repo_id, name, cache_dir=cache_dir, endpoint=server.url)
        with open(local, "rb") as fh:
            assert fh.read() == data, name
        assert (server.repo_dir(repo_id, "model") / name).read_bytes() == data


def test_upload_folder_and_read_back(hub_server, tmp_path):
    from huggingface_hub import HfApi

    files = model_folder(tmp_path / "export")
    api = HfApi(endpoint=hub_server.url)
    url = api.create_repo("me/model")
    assert url.startswith(hub_server.url) and url.repo_id == "me/model"
    info = api.upload_folder(repo_id="me/model", folder_path=tmp_path / "export", commit_message="first")
    assert info.commit_url.startswith(hub_server.url) and info.oid == hub_server.commits("me/model")[-1]["oid"]
    assert sorted(hub_server.commits("me/model")[-1]["files"]) == sorted(files)
    assert {s.rfilename for s in api.model_info("me/model").siblings} >= set(files)
    assert_downloads(hub_server, "me/model", files, tmp_path / "dl")
    assert hub_server.unhandled == []


def test_push_export_uploads_the_folder(hub_server, tmp_path):
    from hf_streamlm.export import push_export

    files = model_folder(tmp_path / "export")
    config = load_config(["hub.repo_id=me/run"])
    push_export(tmp_path / "export", config)
    assert len(hub_server.commits("me/run")) == 1
    assert hub_server.commits("me/run")[0]["summary"] == config.hub.commit_message
    assert_downloads(hub_server, "me/run", files, tmp_path / "dl")

    push_export(tmp_path / "export", config)  # again: the repo exists, nothing changed -> no new commit
    assert len(hub_server.commits("me/run")) == 1
    assert hub_server.unhandled == []


# ---------------------------------------------------------------------------------------------- training


def test_training_stops_cleanly_when_retries_run_out_and_keeps_its_checkpoints(hub_server, tmp_path, capfd,
                                                                              reset_accelerate):
    """Two good shards, then one that always answers 429: the run saves its last completed step, stops with
    one line naming the source and the cause, and exits 4 (a data failure after training started); no
    checkpoint is left half-written. The run is ``main`` in this process (conftest ``main_refuses``)."""
    from tests.conftest import main_refuses

    for k in range(2):
        rows = docs(k * 1500, 1500)
        hub_server.add_file(f"datasets/org/flaky/data/train-{k:05d}-of-00003.jsonl",
                            "".join(json.dumps(r) + "\n" for r in rows))
    bad = "data/train-00002-of-00003.jsonl"
    hub_server.add_file(f"datasets/org/flaky/{bad}", "".join(json.dumps(r) + "\n" for r in docs(3000, 100)))
    hub_server.fail_with(bad, 429, times=None)
    out = tmp_path / "run"
    args = ["recipe=quickstart_decoder", "data.sources=[{path: org/flaky}]",
            "data.retries=1", "data.retry_backoff=0", "data.eval_holdout=0", "data.shuffle_buffer_size=0",
            "data.sequence_length=32", "data.batch_size=4", "model.hidden_size=64", "model.num_layers=1",
            "model.intermediate_size=128", "tokenizer.train_samples=200", "tokenizer.vocab_size=300",
            "scheduler.total_steps=2000", "scheduler.warmup_steps=1", "runtime.checkpoint.every_n_steps=20",
            "runtime.checkpoint.max_keep=3", "runtime.evaluation.every_n_steps=null", "runtime.log_every_n_steps=20",
            "runtime.logging.progress_bar=false", f"runtime.output_dir={out}"]
    err = main_refuses(args, capfd, code=4)
    errors = [line for line in err.splitlines() if line.startswith("hf-streamlm: error:")]
    assert len(errors) == 1 and "org/flaky" in errors[0] and "429" in errors[0], err[-2000:]
    assert hub_server.count(bad) >= 2  # retried before giving up
    checkpoints = sorted(checkpoints_of(out))
    assert checkpoints and all(p.name.startswith("step-") for p in checkpoints)  # no .tmp- folder left
    newest = max(checkpoints, key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["step"] >= 20 and (newest / "model.safetensors").is_file() and (newest / "data_state_0.pt").is_file()
    assert f"training stopped after step {state['step']}" in errors[0]  # the last completed step, not the last 20th
