"""Checkpoints on the Hub during training and resumes from them (hf_streamlm.train.hub_sync), against the loopback
Hub (tests/hub_server.py) made slow and unreliable: latency before every answer, a 429 with ``Retry-After``, a 500
and a connection dropped after the commit's body was sent.

- A run pushes each checkpoint as one commit (its step in the message, a branch ``step-<N>``, its manifest), the
  retries ride out the faults, and the pushes change nothing in the training (the run is the reference below).
- A run killed with SIGKILL after its checkpoint was pushed, its run directory deleted, resumes with
  ``runtime.resume=hub:<repo>`` past incomplete checkpoints on the Hub, and logs the reference's losses and
  document trace bit for bit (CPU fp32).
- Under a 2-process launch with every commit held by the Hub, both ranks train to the end and rank 1 exits before
  any commit is answered: no rank waits on an upload; rank 0 alone pushes (one commit per checkpoint).
- Coalescing: a Hub slower than the checkpoints gets the newest ordinary save and every milestone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from hf_streamlm.data.trace import read_trace
from tests.conftest import DECODER, REPO, run_in_process
from tests.faults import Drained, wait_until_held
from tests.hub_fixtures import serve
from tests.hub_server import HubServer
from tests.test_resume_run import free_port

STEPS = 6


class SlowHub(HubServer):
    """The loopback Hub, ``latency`` seconds before every answer; while ``gate`` is clear, commits wait for it."""

    def __init__(self, root: Path, latency: float = 0.0):
        super().__init__(root)
        self.latency, self.gate = latency, threading.Event()
        self.gate.set()
        hub = self

        class Handler(self._httpd.RequestHandlerClass):
            def _dispatch(self, method: str) -> None:
                time.sleep(hub.latency)
                if method == "POST" and "/commit/" in self.path:
                    hub.gate.wait(300)
                super()._dispatch(method)

        self._httpd.RequestHandlerClass = Handler

    def stop(self) -> None:
        self.gate.set()
        super().stop()


@pytest.fixture
def slow_hub(tmp_path, monkeypatch):
    yield from serve(SlowHub(tmp_path / "hub", latency=0.05), tmp_path, monkeypatch)


def args(bpe_800: Path, out: Path, repo: str, *more: str) -> list[str]:
    return [*DECODER, f"tokenizer.path={bpe_800}", f"scheduler.total_steps={STEPS}", "runtime.log_every_n_steps=1",
            f"runtime.evaluation.every_n_steps={STEPS}", "data.trace_documents=true", f"runtime.output_dir={out}",
            "hub.push=true", f"hub.repo_id={repo}", "hub.min_commit_interval=0", "hub.retry_backoff=0.1", *more]


def unreliable(server: HubServer, repo: str) -> None:
    """The next commits to ``repo``: a 429 asking to wait 1 s, a 500, a connection dropped after the body was sent."""
    commit = f"/api/models/{repo}/commit/main"
    server.fail_with(commit, 429, retry_after="1", methods=("POST",))
    server.fail_with(commit, 500, methods=("POST",))
    server.drop_connection(commit, methods=("POST",))


def history(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("tokens"), r.get("lr")) for r in rows]


def commit_steps(server: HubServer, repo: str) -> list[int | None]:
    """The step of each commit to ``repo`` (None: the final export's own commit)."""
    steps = []
    for c in server.commits(repo):
        summary = c["summary"] or ""
        steps.append(int(summary.rsplit("(step ", 1)[1].rstrip(")")) if "(step " in summary else None)
    return steps


def test_pushes_survive_a_faulty_hub_then_a_killed_run_resumes_from_the_hub_exactly(slow_hub, bpe_800, tmp_path):
    # The reference: every checkpoint a milestone (hub.keep_every_n_steps=2), so every one is pushed.
    ref = tmp_path / "ref"
    unreliable(slow_hub, "me/ref")
    run_in_process(*args(bpe_800, ref, "me/ref", "hub.strategy=all_checkpoints", "hub.keep_every_n_steps=2",
                         "runtime.checkpoint.max_keep=3"))
    commits = slow_hub.commits("me/ref")
    assert commit_steps(slow_hub, "me/ref") in ([2, 4, 6], [2, 4, 6, None]), [c["summary"] for c in commits]
    faults = [r.fault for r in slow_hub.requests() if r.path == "/api/models/me/ref/commit/main"]
    assert faults[:4] == ["status", "status", "drop", None], faults  # each retried, one commit each
    assert set(slow_hub.branches("me/ref")) == {"main", "step-2", "step-4", "step-6"}
    hub_files = slow_hub.repo_dir("me/ref", "model")
    for step in (2, 4, 6):  # every file of the checkpoint, its manifest included, byte for byte
        local = ref / "checkpoints" / f"step-{step}"
        names = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
        assert "manifest.json" in names and set(json.loads((local / "manifest.json").read_text())) < names
        for name in names:
            assert (hub_files / "checkpoints" / f"step-{step}" / name).read_bytes() == (local / name).read_bytes()
    assert (hub_files / "model.safetensors").read_bytes() == (ref / "export" / "model.safetensors").read_bytes()
    assert not (ref / ".hub-pending").exists() and slow_hub.unhandled == []

    # The same run, killed (SIGKILL to its process group) once step 4's checkpoint is on the Hub.
    killed = tmp_path / "killed"
    unreliable(slow_hub, "me/killed")
    proc = Drained([sys.executable, "-m", "tests.faults", "hold-after-step", "5",
                    *args(bpe_800, killed, "me/killed", "hub.strategy=checkpoint")],
                   cwd=REPO, start_new_session=True)
    try:
        wait_until_held(proc, killed, 5)
        deadline = time.monotonic() + 60
        while "step-4" not in slow_hub.branches("me/killed"):  # the commit of step 4, then its branch
            assert time.monotonic() < deadline, proc.read["stderr"][-3000:]
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    repo = slow_hub.repo_dir("me/killed", "model")
    assert sorted(p.name for p in (repo / "checkpoints").iterdir()) == ["step-4"]  # strategy checkpoint: the newest
    # Incomplete checkpoints newer than step 4 (a partial upload): no state file; a file short of its manifest.
    (repo / "checkpoints" / "step-7").mkdir()
    (repo / "checkpoints" / "step-7" / "model.safetensors").write_bytes(b"partial")
    shutil.copytree(repo / "checkpoints" / "step-4", repo / "checkpoints" / "step-8")
    (repo / "checkpoints" / "step-8" / "model.safetensors").write_bytes(b"cut short")
    shutil.rmtree(killed)  # an empty machine

    # The same command (runtime.resume=auto): no checkpoint in the run directory, hub.repo_id set: from the Hub.
    unreliable(slow_hub, "me/killed")
    run_in_process(*args(bpe_800, killed, "me/killed", "hub.strategy=checkpoint"))
    assert history(killed) == [row for row in history(ref) if row[0] > 4]
    assert read_trace(killed / "trace" / "rank-0.jsonl") == [r for r in read_trace(ref / "trace" / "rank-0.jsonl")
                                                             if r["step"] > 4]
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["checkpoint"] == "step-6"
    assert 6 in commit_steps(slow_hub, "me/killed")  # the resumed run pushes on

    # runtime.resume=hub:<repo>@<revision>: the checkpoint of that commit (the branch step-4 made).
    from hf_streamlm.config import load_config
    from hf_streamlm.train.hub_sync import resume_choice

    config = load_config(args(bpe_800, tmp_path / "again", "me/killed", "runtime.resume=hub:me/killed@step-4"))
    found, refusal = resume_choice(config, tmp_path / "again" / "checkpoints")
    assert refusal is None and found == tmp_path / "again" / "checkpoints" / "step-4"
    on_branch = slow_hub.branch_dir("me/killed", "step-4") / "checkpoints" / "step-4"
    assert sorted(p.name for p in (repo / "checkpoints").iterdir()) == ["step-6"]  # main moved on
    assert (found / "model.safetensors").read_bytes() == (on_branch / "model.safetensors").read_bytes()
    config.runtime.resume = "hub:me/absent"
    assert "no such repository" in resume_choice(config, tmp_path / "absent")[1]


def test_two_processes_train_to_the_end_while_the_hub_holds_every_commit(slow_hub, bpe_800, tmp_path):
    import psutil

    out = tmp_path / "run"
    slow_hub.gate.clear()  # no commit is answered until the training has ended on both ranks
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "hf_streamlm.run",
           *args(bpe_800, out, "me/two", "hub.strategy=all_checkpoints")]
    proc = Drained(cmd, cwd=REPO, start_new_session=True)
    try:
        ranks: dict[str, psutil.Process] = {}
        deadline = time.monotonic() + 240
        while not (out / "export" / "config.json").is_file():  # the end: last step, checkpoint, export
            assert proc.poll() is None and time.monotonic() < deadline, proc.read["stderr"][-3000:]
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    rank = child.environ().get("RANK")
                except psutil.Error:
                    continue
                if rank is not None and "hf_streamlm.run" in child.cmdline():
                    ranks.setdefault(rank, child)
            time.sleep(0.1)
        assert set(ranks) == {"0", "1"}
        ranks["1"].wait(60)  # rank 1 is done while every commit is still held
        assert ranks["0"].is_running() and slow_hub.commits("me/two") == []
        assert [r["step"] for r in read_trace(out / "trace" / "rank-1.jsonl")] == list(range(1, STEPS + 1))
    finally:
        slow_hub.gate.set()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    steps = commit_steps(slow_hub, "me/two")
    assert steps[-1] in (6, None) and len(steps) == len(set(steps)), steps  # one process pushed, once each
    assert 6 in steps


def test_a_slow_hub_gets_the_newest_save_and_every_milestone(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hf_streamlm.config import load_config
    from hf_streamlm.train import hub_sync

    release, pushed = threading.Event(), []

    def push(self, upload):
        release.wait(30)
        pushed.append(upload.step)

    monkeypatch.setattr(hub_sync.HubPusher, "_push", push)
    config = load_config(["hub.push=true", "hub.repo_id=me/x", "hub.min_commit_interval=0"])
    pusher = hub_sync.HubPusher(config, SimpleNamespace(device=None), tmp_path, None, None)
    milestones = {3: "best", 5: "every 5"}
    for step in range(1, 9):
        pusher._put(hub_sync.Upload(step, milestone=milestones.get(step)))
        if step == 1:
            while pusher.busy is None:  # step 1's push has started: it goes through
                time.sleep(0.01)
    release.set()
    assert pusher.finish() == []
    assert pushed == [1, 3, 5, 8] and pusher.dropped == ["step-2", "step-4", "step-6", "step-7"]


def test_offline_auto_starts_afresh_and_a_hub_resume_says_why(tmp_path):
    """HF_HUB_OFFLINE (the suite's default): ``auto`` with hub.repo_id set does not look on the Hub and does not
    retry; ``hub:`` refuses in one line."""
    from hf_streamlm.config import load_config
    from hf_streamlm.train.hub_sync import resume_choice

    start = time.monotonic()
    assert resume_choice(load_config(["hub.repo_id=me/x"]), tmp_path / "checkpoints") == (None, None)
    found, refusal = resume_choice(load_config(["runtime.resume=hub:me/x"]), tmp_path / "checkpoints")
    assert found is None and "HF_HUB_OFFLINE is set" in refusal
    assert time.monotonic() - start < 5
