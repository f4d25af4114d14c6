"""Preemption the way launchers do it, data failures mid-run, and the decisions several ranks share.

torchrun's agent, SLURM, ``docker stop`` and a pod shutdown signal a whole process group, DataLoader
workers included: the tests here do the same (``os.killpg``), with 2 workers per process, for one
process and for a 2-process ``accelerate launch``. Stopped runs are resumed and must log the losses
of an uninterrupted run bit for bit. To keep the suite short, each uninterrupted run is made once
and serves several tests: the learning rate is constant, so a run started for 2000 steps and resumed
with ``scheduler.total_steps=REFERENCE_STEPS`` trains exactly as the reference of that length. A signal is
sent while the run waits for it after a chosen step (tests/faults.py ``hold-after-step``), so the stop lands
at that step; the one-process reference and resumes run ``main`` in the test process (conftest
``run_in_process``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, run_in_process, run_in_process_stdout, checkpoints_of
from tests.faults import Drained, release, wait_until_held
from tests.test_resume_run import command  # `accelerate launch` for 2+ processes, on a free port


REFERENCE_STEPS = 24


def tiny(shards: Path, tokenizer: Path, workers: int = 2) -> list[str]:
    """A 100k-parameter decoder on 64 x 128-token batches: a DataLoader worker uses up the documents it
    read ahead (256 at a time) in ~6 batches, so a source broken at step 3 is read again by step ~20.
    ``tokenizer``: the session's BPE of 500 tokens (conftest ``bpe_500``), not one trained per run."""
    return ["recipe=quickstart_decoder", f"data.sources=[{{path: json, data_files: '{shards}/part-*.jsonl'}}]",
            f"tokenizer.path={tokenizer}", f"data.num_workers={workers}", "data.shuffle_buffer_size=100", "data.batch_size=64",
            "data.sequence_length=128", "model.num_layers=1", "model.hidden_size=64", "model.intermediate_size=128",
            "tokenizer.vocab_size=500", "scheduler.strategy=constant", "scheduler.warmup_steps=0",
            "runtime.log_every_n_steps=1", "runtime.checkpoint.every_n_steps=5", "runtime.checkpoint.max_keep=5",
            "runtime.evaluation.every_n_steps=null", "runtime.logging.progress_bar=false", "runtime.demo_sentences=[]",
            "data.trace_documents=true"]


def start(args: list[str], processes: int = 1, module: list[str] | None = None) -> Drained:
    """In a session of its own: its process group is the launcher, the ranks' parent and their workers,
    as a container's or a SLURM step's is. ``module``: a fault of tests/faults.py instead of the run's own."""
    return Drained(command(args, processes, module), cwd=REPO, start_new_session=True)


def finish(proc: Drained, timeout: int = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout} s: {err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    return finish(start(args, processes))


def held(args: list[str], out: Path, processes: int, step: int) -> Drained:
    """The run started, and waiting after ``step`` (tests/faults.py ``hold-after-step``) for a signal or for
    ``release-after-step-<step>``: it cannot go on while the test acts."""
    proc = start([*args, f"runtime.output_dir={out}"], processes, ["-m", "tests.faults", "hold-after-step", str(step)])
    wait_until_held(proc, out, step)
    return proc


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("hf-streamlm: error:")]


def stop_by_group_signal(
    args: list[str], out: Path, processes: int, sig: signal.Signals = signal.SIGTERM, after: int = 3
) -> tuple[int, subprocess.CompletedProcess]:
    """Start, signal the process group with `sig` while rank 0 waits after step `after` (tests/faults.py
    ``hold-after-step``); the run must save at that step's boundary."""
    proc = held(args, out, processes, after)
    os.killpg(proc.pid, sig)
    result = finish(proc)
    match = re.search(rf"Stopped by {sig.name} at step (\d+); checkpoint saved in .* \(save ([\d.]+) s, ([\d.]+) s after",
                      result.stdout)
    assert match, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    print(f"stop-time save: {match.group(2)} s, {match.group(3)} s after the signal")  # for the record (-s)
    assert "killed by signal" not in result.stderr  # no DataLoader worker died of it
    step = int(match.group(1))
    assert step == after
    newest = max((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert newest.name == f"step-{step}"
    assert sorted(p.name for p in newest.glob("data_state_*.pt")) == [f"data_state_{r}.pt" for r in range(processes)]
    return step, result


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards, bpe_500) -> Path:
    """One process, 2 workers, REFERENCE_STEPS uninterrupted steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_in_process(*tiny(shards, bpe_500), f"scheduler.total_steps={REFERENCE_STEPS}", f"runtime.output_dir={out}")
    return out


def test_sigterm_then_sigint_to_the_process_group_with_two_workers_save_exit_0_and_resume_exactly(tmp_path, shards,
                                                                                                 bpe_500, reference,
                                                                                                 capsys):
    """What ``docker stop``, SLURM and a pod shutdown do (today's main: the workers die first, the run
    crashes with "DataLoader worker ... is killed by signal: Terminated" and saves nothing), then SIGINT,
    what Ctrl-C in a terminal sends to the whole foreground process group, to the resumed run: each stop
    saves and exits 0, and the run resumed from the second stop logs the reference's losses. One chain of
    runs instead of one per signal: the resume between the stops is a run that a later signal stops."""
    out = tmp_path / "run"
    args = [*tiny(shards, bpe_500), "scheduler.total_steps=2000"]
    first, result = stop_by_group_signal(args, out, 1, signal.SIGTERM)
    assert result.returncode == 0, result.stderr[-3000:]
    second, result = stop_by_group_signal(args, out, 1, signal.SIGINT, after=first + 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step-{first} (step {first})" in result.stdout  # the second run resumed from the first stop
    assert first < second < REFERENCE_STEPS
    resumed = run_in_process_stdout(capsys, *tiny(shards, bpe_500), f"scheduler.total_steps={REFERENCE_STEPS}",
                                    f"runtime.output_dir={out}")
    assert f"step-{second} (step {second})" in resumed
    assert losses(out) == losses(reference)  # max |delta| = 0 over every step


# ------------------------------------------------------------------------------------ shared decisions

@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> Path:
    """120 documents of the shipped corpus in 4 files of 60, 40, 16 and 4: whichever 2 files a rank
    gets, the two ranks' streams differ in length."""
    import gzip

    from hf_streamlm.data.corpus import BUILTIN_CORPORA

    root = tmp_path_factory.mktemp("uneven")
    lines = gzip.open(BUILTIN_CORPORA["pydocs"], "rt").read().splitlines()
    start = 0
    for i, n in enumerate((60, 40, 16, 4)):
        (root / f"part-{i}.jsonl").write_text("\n".join(lines[start : start + n]) + "\n")
        start += n
    return root


def epoch_args(shards: Path, tokenizer: Path) -> list[str]:
    return [*tiny(shards, tokenizer), "data.batch_size=8", "data.sequence_length=64", "scheduler.total_steps=null",
            "scheduler.total_epochs=1", "runtime.evaluation.every_n_steps=10", "runtime.evaluation.max_batches=1",
            "runtime.evaluation.best.max_keep=2"]


@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory, uneven_shards, bpe_500) -> Path:
    """Two processes with 2 workers each, one epoch of uneven shards, uninterrupted."""
    out = tmp_path_factory.mktemp("epochs") / "run"
    result = finish(start([*epoch_args(uneven_shards, bpe_500), f"runtime.output_dir={out}"], 2), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_epochs_with_two_processes_and_uneven_shards_agree_on_one_length(epoch_run, uneven_shards):
    """Each rank counts its own stream's steps; all run the shortest count (today's main: one rank leaves
    the loop and the other waits in a collective until killed). best/ is chosen by the main process."""
    from transformers import AutoTokenizer

    from hf_streamlm.config import load_config
    from hf_streamlm.data import build_train_blocks

    out = epoch_run
    config = load_config([f"recipe={out / 'config.yaml'}"])
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    per_rank = [sum(1 for _ in build_train_blocks(config, tokenizer, rank, 2)) // 8 for rank in (0, 1)]
    assert per_rank[0] != per_rank[1], per_rank  # the ranks' epochs really differ
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if "loss" in r) == min(per_rank)
    assert (out / "export" / "model.safetensors").is_file()

    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "best").iterdir())
    assert kept == sorted(sorted(evals, key=evals.get)[:2])
    for step in kept:  # both ranks wrote their part of each best checkpoint
        assert {p.name for p in (out / "best" / f"step-{step}").glob("data_state_*.pt")} == {
            "data_state_0.pt", "data_state_1.pt"}


def test_nonfinite_skips_with_two_processes_are_one_decision(tmp_path, bpe_500):
    """A learning rate of 1e30 makes every loss after step 1 NaN on both ranks. The skip is decided once
    per step for all ranks (an all-reduce of the non-finite flag): both skip the same steps, stop after
    the same count, and write one checkpoint together, the last good state."""
    out = tmp_path / "run"
    args = ["recipe=quickstart_decoder", "model.num_layers=1", "model.hidden_size=64", "model.intermediate_size=128",
            f"tokenizer.path={bpe_500}", "data.batch_size=4", "data.sequence_length=32", "data.shuffle_buffer_size=100",
            "optimizer.learning_rate=1e30", "optimizer.max_grad_norm=null", "scheduler.strategy=constant",
            "scheduler.warmup_steps=0", "scheduler.total_steps=30", "runtime.on_nonfinite=skip",
            "runtime.max_nonfinite_skips=3", "runtime.log_every_n_steps=1", "runtime.checkpoint.every_n_steps=1000",
            "runtime.evaluation.every_n_steps=null", "runtime.logging.progress_bar=false", "runtime.demo_sentences=[]",
            f"runtime.output_dir={out}"]
    result = run(args, 2)
    assert "exitcode  : 3" in result.stderr, result.stderr[-3000:]  # the ranks' status; torchrun exits 1
    (message,) = set(errors(result))  # each rank says the same
    assert "at step 4" in message and "after 3 skipped steps in a row" in message
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skips"] for r in rows] == [0, 1, 2]
    (checkpoint,) = checkpoints_of(out)
    assert checkpoint.name == "step-3"
    assert sorted(p.name for p in checkpoint.glob("data_state_*.pt")) == ["data_state_0.pt", "data_state_1.pt"]


# ------------------------------------------------------------------------------ data failure, damage

def test_a_source_failing_mid_run_saves_the_last_step_exits_4_and_resumes_once_readable(tmp_path, shards, bpe_500,
                                                                                       reference, capsys, caplog):
    """Every file of the source is replaced by one that cannot be parsed while the run waits after step 3
    (tests/faults.py ``hold-after-step``, released by the test): the first read after that (a worker
    starting its next pass) fails. The run saves the last completed step and
    exits 4 with one line (today's main: exit 2, nothing saved since the last regular checkpoint). With
    the files back, the run
    resumes from the saved step and ends as the uninterrupted reference; a copy whose newest checkpoint
    is cut short on disk passes over it for the previous one, and ends the same."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(shards, source)
    originals = {p: p.read_bytes() for p in source.glob("part-*.jsonl")}
    args = tiny(source, bpe_500)
    out = tmp_path / "run"
    proc = held([*args, "scheduler.total_steps=2000"], out, 1, 3)  # waits after step 3 while the files change
    for path in originals:
        path.write_text('{"text": "a document cut short\\n')
    release(out, 3)
    result = finish(proc)
    assert result.returncode == 4, result.stderr[-3000:]
    assert len(errors(result)) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    step = max(s for s, _ in losses(out))
    assert "part-" in errors(result)[0] and f"training stopped after step {step}" in errors(result)[0]
    assert step < REFERENCE_STEPS
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert checkpoints[-1] == step and len(checkpoints) >= 2, checkpoints

    for path, data in originals.items():
        path.write_bytes(data)

    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    newest = damaged / "checkpoints" / f"step-{step}" / "model.safetensors"
    with open(newest, "r+b") as f:  # what a crash of the file system or a partial copy leaves
        f.truncate(newest.stat().st_size // 2)
    for run_dir, resumed_from in ((out, step), (damaged, checkpoints[-2])):
        caplog.clear()
        resumed = run_in_process_stdout(capsys, *args, f"scheduler.total_steps={REFERENCE_STEPS}",
                                        f"runtime.output_dir={run_dir}")
        assert f"step-{resumed_from} (step {resumed_from})" in resumed
        assert losses(run_dir) == losses(reference)
    assert f"skipping checkpoint {newest.parent}: model.safetensors has" in caplog.text
