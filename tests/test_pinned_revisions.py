"""Pinned Hub revisions (hf_streamlm.data.revisions) against the loopback Hub: the commit a Hub source
resolved to at the first start is what a resume reads, after a new commit has moved the branch; a
pinned commit the Hub no longer has (history squashed) is one clear line.

The repository's new commit is pushed with the real client (``HfApi.upload_file``), and the history
squashed with ``HfApi.super_squash_history``: the loopback Hub keeps earlier commits readable by sha
until then, as the Hub does."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from hf_streamlm.config import ConfigError, load_config
from tests.hub_fixtures import hub_server  # noqa: F401 - the fixture
from tests.test_hub import REPO, SHARDS, docs, jsonl_repo, stream_ids

SOURCE = f"data.sources=[{{path: {REPO}}}]"


def push_new_rows(server) -> list[str]:
    """A commit to main that rewrites the first shard with other documents; returns their ids."""
    from huggingface_hub import HfApi

    rows = [{"id": f"doc-{i:05d}", "text": f"doc-{i:05d} " + " ".join(["fresh"] * 8) + "."} for i in range(90000, 90200)]
    HfApi().upload_file(path_or_fileobj="".join(json.dumps(r) + "\n" for r in rows).encode(), path_in_repo=SHARDS[0],
                        repo_id=REPO, repo_type="dataset", commit_message="a new dump")
    return [r["id"] for r in rows]


def test_pins_survive_a_push_and_a_squashed_commit_is_one_line(hub_server, tmp_path):
    from huggingface_hub import HfApi

    from hf_streamlm.data.revisions import apply_pins, pinned_revisions

    old = jsonl_repo(hub_server)
    first = load_config([SOURCE, "data.eval_holdout=0"])
    sha = HfApi().dataset_info(REPO).sha
    assert pinned_revisions(first, None) == [[sha]]  # a first start: the branch's commit now
    apply_pins(first, [[sha]])
    checkpoint = tmp_path / "step-3"
    first.save(checkpoint / "config.yaml")  # what save_checkpoint writes
    assert yaml.safe_load((checkpoint / "config.yaml").read_text())["data"]["sources"][0]["pinned_revision"] == sha

    new = push_new_rows(hub_server)
    assert HfApi().dataset_info(REPO).sha != sha
    assert set(new) & set(stream_ids())  # unpinned, the branch now serves the new rows

    resumed = load_config([SOURCE, "data.eval_holdout=0"])  # the same command again: no pin on it
    pins = pinned_revisions(resumed, checkpoint)
    assert pins == [[sha]]  # the checkpoint's, not the branch head
    assert stream_ids(f"data.sources=[{{path: {REPO}, pinned_revision: {sha}}}]") == old

    HfApi().super_squash_history(REPO, repo_type="dataset")  # the pinned commit is gone
    with pytest.raises(ConfigError) as err:
        pinned_revisions(load_config([SOURCE]), checkpoint)
    message = str(err.value)
    assert "\n" not in message and sha in message and REPO in message and "no longer has that commit" in message


def test_resumed_run_trains_on_the_pinned_commit_after_a_push(hub_server, tmp_path, capsys, reset_accelerate):
    """A real run stops after step 3 (its last step), a commit replaces the first shard, the same command
    with a longer schedule resumes: every document traced after the resume is one of the first commit's
    (blake2b keys of their text); config.yaml, the checkpoints and the model card name the commit. With
    the commit squashed away, the next resume is one line. The runs are ``main`` in the test process (conftest
    ``run_in_process``, ``main_refuses``), against the loopback Hub as a process of its own would be."""
    from huggingface_hub import HfApi, ModelCard

    from tests.conftest import main_refuses, run_in_process, run_in_process_stdout

    old = {r["text"] for k in range(len(SHARDS)) for r in docs(k * 120, 120)}
    jsonl_repo(hub_server)
    sha = HfApi().dataset_info(REPO).sha
    out = tmp_path / "run"
    args = ["recipe=quickstart_decoder", SOURCE, "data.eval_holdout=0", "data.shuffle_buffer_size=20",
            "data.sequence_length=16", "data.batch_size=4", "data.trace_documents=true", "model.hidden_size=32",
            "model.num_layers=1", "model.intermediate_size=64", "model.max_position_embeddings=16",
            "tokenizer.vocab_size=300", "tokenizer.train_samples=100", "scheduler.warmup_steps=1",
            "runtime.checkpoint.every_n_steps=3", "runtime.evaluation.every_n_steps=null", "runtime.log_every_n_steps=1",
            "runtime.logging.progress_bar=false", "runtime.logging.report_to=none", "runtime.demo_sentences=[]",
            f"runtime.output_dir={out}"]
    run_in_process(*args, "scheduler.total_steps=3")
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["sources"][0]["pinned_revision"] == sha
    push_new_rows(hub_server)

    assert "Resuming from" in run_in_process_stdout(capsys, *args, "scheduler.total_steps=12")
    trace = [json.loads(line) for line in (out / "trace" / "rank-0.jsonl").read_text().splitlines()]
    keys = {hashlib.blake2b(t.encode("utf-8"), digest_size=8).hexdigest() for t in old}
    resumed = [doc for row in trace if row["step"] > 3 for doc in row["docs"]]
    assert [row["step"] for row in trace] == list(range(1, 13)) and len(resumed) > 10
    assert all(key in keys for _, key, _ in resumed), "a document of the new commit was trained on"
    for saved in (out / "config.yaml", out / "checkpoints" / "step-12" / "config.yaml"):
        assert yaml.safe_load(saved.read_text())["data"]["sources"][0]["pinned_revision"] == sha
    card = ModelCard.load(out / "export" / "README.md")
    assert card.data.datasets == [REPO] and card.data.dataset_revisions == {REPO: sha}
    assert f"{REPO} (commit {sha})" in card.text

    HfApi().super_squash_history(REPO, repo_type="dataset")
    err = main_refuses([*args, "scheduler.total_steps=15"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("hf-streamlm: error:")]
    assert len(errors) == 1 and sha in errors[0], err[-2000:]
