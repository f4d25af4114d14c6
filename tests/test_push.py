"""Publishing to the Hub, end to end against the loopback Hub server (tests/hub_server.py): a training
run with ``hub.push=true`` and ``hf-streamlm push`` create the repository and the branch, upload the
export (never training state), authenticate with ``HF_TOKEN`` without ever writing it down, and the
model loads back from the server with transformers."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO as ROOT
from tests.conftest import run_in_process
from tests.hub_fixtures import hub_server  # noqa: F401 - the fixture

TOKEN = "hf_PushTestToken_q7Zr41xVb93KmW"
"""A distinctive fake token: the server only accepts writes that send it, and it must appear in no output."""

TRAINING_STATE = ("*.pt", "*.pth", "*.bin", "*.pkl", "*.pickle", "optimizer*", "random_states*", "scheduler*")
EXPORT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                "hf_streamlm_config.yaml"}
TINY = ["recipe=quickstart_decoder", "data.sequence_length=32", "data.batch_size=4", "model.hidden_size=64",
        "model.num_layers=1", "model.intermediate_size=128", "tokenizer.train_samples=200", "tokenizer.vocab_size=300",
        "scheduler.total_steps=6", "scheduler.warmup_steps=1", "runtime.checkpoint.every_n_steps=3",
        "runtime.evaluation.every_n_steps=3", "runtime.evaluation.max_batches=1", "runtime.log_every_n_steps=2",
        "runtime.logging.progress_bar=false", "runtime.demo_sentences=[]"]
"""A decoder trained for 6 steps on the builtin corpus (no network), checkpointed and evaluated on the way."""


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, timeout=timeout)


def train(out: Path, *overrides: str) -> None:
    """``main`` in this process (conftest ``run_in_process``): the loopback Hub and HF_TOKEN are this process's."""
    run_in_process(*TINY, f"runtime.output_dir={out}", *overrides)


def local_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def training_state(paths) -> list[str]:
    return [p for p in paths if any(fnmatch.fnmatch(p.rsplit("/", 1)[-1], pat) for pat in TRAINING_STATE)]


def assert_branch_holds(server, repo_id: str, branch: str, export: Path) -> dict:
    """``branch`` has exactly one commit, of every file of ``export`` (byte for byte); ``main`` has none
    of them; no training state was uploaded in any commit. Returns the commit."""
    commits = server.commits(repo_id, revision=branch)
    assert len(commits) == 1, commits
    files = local_files(export)
    assert files >= EXPORT_FILES
    assert set(commits[0]["files"]) == files
    assert set(server.files(repo_id, revision=branch)) == files | {".gitattributes"}
    for name in files:
        assert (server.branch_dir(repo_id, branch) / name).read_bytes() == (export / name).read_bytes(), name
    assert server.files(repo_id, revision="main") == [".gitattributes"]  # main is untouched by branch commits
    assert server.commits(repo_id, revision="main") == []
    uploaded = [f for c in server.commits(repo_id) for f in c["files"]]
    assert training_state(uploaded) == []
    return commits[0]


def assert_token_sent_and_never_written(server, outputs: list[bytes], folders: list[Path]) -> None:
    writes = [r for r in server.requests() if r.method == "POST" and r.path != "/api/validate-yaml"]
    assert {r.path.rsplit("/", 2)[-2] for r in writes} >= {"repos", "branch", "preupload", "commit"}
    assert all(r.authorization == f"Bearer {TOKEN}" for r in server.requests()), \
        {(r.method, r.path, r.authorization) for r in server.requests()}
    for text in outputs:
        assert TOKEN.encode() not in text
    for folder in folders:
        leaks = [p for p in folder.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
        assert leaks == []


def assert_same_logits(server, repo_id: str, revision: str, export: Path, cache_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pulled = AutoModelForCausalLM.from_pretrained(repo_id, revision=revision, cache_dir=cache_dir).eval()
    local = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision, cache_dir=cache_dir)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(export).get_vocab()
    ids = tokenizer("def main(): return the value", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(pulled(ids).logits, local(ids).logits)
    # The files came from the branch: recent clients list its tree (/api/models/ID/tree/BRANCH), older ones
    # (huggingface_hub 1.x) resolve each file on it (/ID/resolve/BRANCH/FILE).
    branch_reads = (f"/api/models/{repo_id}/tree/{revision}", f"/{repo_id}/resolve/{revision}/")
    assert [r.path for r in server.requests() if r.path.startswith(branch_reads)]
    assert server.unhandled == []  # every call transformers made was answered, from the branch


@pytest.fixture
def token(hub_server, monkeypatch):
    """HF_TOKEN for this process and its children; the server refuses writes without it."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub_server.required_token = TOKEN
    return TOKEN


def test_training_run_pushes_its_export_to_a_branch(hub_server, token, tmp_path, capfd, caplog):
    out = tmp_path / "run"
    capfd.readouterr()
    with caplog.at_level("DEBUG"):  # the run's log records, which in this process go to pytest's handler
        train(out, "hub.push=true", "hub.repo_id=me/tiny", "hub.revision=exp-1")
    printed = capfd.readouterr()
    assert "me/tiny" in caplog.text  # the records were captured (the push is logged)

    assert hub_server.is_private("me/tiny")  # hub.private defaults to true
    assert hub_server.branches("me/tiny") == ["main", "exp-1"]
    commit = assert_branch_holds(hub_server, "me/tiny", "exp-1", out / "export")
    assert commit["summary"] == "Upload model trained with hf_streamlm"
    assert training_state(local_files(out))  # the run has training state, none of which went up
    assert_token_sent_and_never_written(hub_server, [printed.out.encode(), printed.err.encode(), caplog.text.encode()],
                                       [out])
    assert hub_server.unhandled == []

    assert_same_logits(hub_server, "me/tiny", "exp-1", out / "export", tmp_path / "dl")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    with pytest.raises(EntryNotFoundError):  # the branch's files are not on main
        hf_hub_download("me/tiny", "config.json", cache_dir=tmp_path / "dl-main")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One offline run for the ``hf-streamlm push`` tests: export/, checkpoints/ and best/ with training state."""
    out = tmp_path_factory.mktemp("push") / "run"
    train(out)
    assert training_state(local_files(out / "checkpoints"))
    return out


def test_push_command_uploads_a_runs_export_once(hub_server, token, trained_run, tmp_path, capfd):
    from hf_streamlm.cli import main

    push = ["push", str(trained_run), "--repo-id", "me/cli", "--revision", "exp-2",
            "--commit-message", "tiny decoder, 6 steps"]
    first = run("-m", "hf_streamlm.cli", *push)  # the console script, in its own process
    assert first.returncode == 0, first.stderr.decode()[-3000:]
    assert f"Pushed {trained_run / 'export'} to me/cli (branch exp-2)" in first.stdout.decode()
    assert hub_server.is_private("me/cli")  # private by default, as hub.private
    commit = assert_branch_holds(hub_server, "me/cli", "exp-2", trained_run / "export")
    assert commit["summary"] == "tiny decoder, 6 steps"

    assert main(push) == 0  # again (in this process): the repo and the branch exist, nothing changed
    assert len(hub_server.commits("me/cli")) == 1  # no new commit
    again = capfd.readouterr()
    assert f"to me/cli (branch exp-2): {hub_server.url}/me/cli/commit/{commit['oid']}" in again.out
    assert_token_sent_and_never_written(hub_server, [first.stdout, first.stderr, again.out.encode(),
                                                     again.err.encode()], [trained_run])
    assert hub_server.unhandled == []
    assert_same_logits(hub_server, "me/cli", "exp-2", trained_run / "export", tmp_path / "dl")


def test_push_command_to_main_of_a_private_repo_that_exists(hub_server, token, trained_run, tmp_path, capfd):
    from huggingface_hub import HfApi

    from hf_streamlm.cli import main

    HfApi().create_repo("me/existing", private=True)
    export = tmp_path / "export"
    export.mkdir()
    for name in local_files(trained_run / "export"):
        (export / name).write_bytes((trained_run / "export" / name).read_bytes())
    (export / "optimizer.bin").write_bytes(b"\x80\x04 pickled optimizer state")  # strays that must stay local
    (export / "random_states_0.pkl").write_bytes(b"\x80\x04 rng")
    (export / "scheduler.pt").write_bytes(b"\x80\x04 scheduler")

    assert main(["push", str(export), "--repo-id", "me/existing", "--private"]) == 0
    assert hub_server.is_private("me/existing")
    assert hub_server.branches("me/existing") == ["main"]
    commits = hub_server.commits("me/existing", revision="main")
    assert len(commits) == 1 and set(commits[0]["files"]) == local_files(trained_run / "export")
    assert training_state(hub_server.files("me/existing")) == []
    output = capfd.readouterr()
    assert TOKEN not in output.out + output.err


def test_push_command_refuses_a_folder_without_an_export(hub_server, token, trained_run, capfd):
    from hf_streamlm.cli import main

    checkpoint = sorted((trained_run / "checkpoints").iterdir())[-1]  # training state, no export
    with pytest.raises(SystemExit) as stopped:
        main(["push", str(checkpoint), "--repo-id", "me/nothing"])
    assert stopped.value.code == 2
    err = capfd.readouterr().err
    assert "neither an export folder" in err and "hf-streamlm export" in err
    assert not hub_server.repo_dir("me/nothing", "model").exists() and hub_server.requests() == []


def test_push_with_a_wrong_token_fails_without_showing_it(hub_server, trained_run, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    from hf_streamlm.config import load_config
    from hf_streamlm.export import push_export

    hub_server.required_token = "hf_the_right_one"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(HfHubHTTPError) as err:
        push_export(trained_run, load_config(["hub.repo_id=me/denied"]))
    assert err.value.response.status_code == 401 and TOKEN not in str(err.value)
    assert not hub_server.repo_dir("me/denied", "model").exists()


def test_push_command_public_repository(hub_server, token, trained_run):
    from hf_streamlm.cli import main

    assert main(["push", str(trained_run), "--repo-id", "me/open", "--public"]) == 0
    assert not hub_server.is_private("me/open")
    assert "config.json" in hub_server.files("me/open")
