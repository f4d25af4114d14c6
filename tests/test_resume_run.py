"""Exact resume of a real training run: a run resumed from an earlier checkpoint logs the same
per-step losses as the uninterrupted run (max |delta| = 0, CPU fp32), for MicroBERT and the decoder,
with 0 and 2 DataLoader workers, and with two processes under ``accelerate launch``."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys

import pytest

from hf_streamlm.data.corpus import BUILTIN_CORPORA
from tests.conftest import REPO, run_cli


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The shipped corpus split into 4 files, so that 2 workers (or 2 ranks) each get shards."""
    root = tmp_path_factory.mktemp("shards")
    lines = gzip.open(BUILTIN_CORPORA["pydocs"], "rt").read().splitlines()
    for i in range(4):
        (root / f"part-{i}.jsonl").write_text("\n".join(lines[i::4]) + "\n")
    return root


def common(recipe: str, shards, workers: int) -> list[str]:
    return [f"recipe={recipe}", f"data.sources=[{{path: json, data_files: '{shards}/part-*.jsonl'}}]",
            f"data.num_workers={workers}", "data.shuffle_buffer_size=300", "data.batch_size=8",
            "scheduler.total_steps=10", "scheduler.warmup_steps=2", "runtime.log_every_n_steps=1",
            "runtime.checkpoint.every_n_steps=4", "runtime.checkpoint.max_keep=5", "runtime.evaluation.every_n_steps=5",
            "runtime.evaluation.max_batches=1", "runtime.logging.progress_bar=false", "runtime.demo_sentences=[]"]


def launch(args: list[str], processes: int) -> subprocess.CompletedProcess:
    if processes == 1:
        return run_cli(*args)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
           "-m", "hf_streamlm.run", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def history(run) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("tokens")) for r in rows]


@pytest.mark.parametrize(
    ("recipe", "workers", "processes"),
    [("quickstart", 0, 1), ("quickstart_decoder", 2, 1), ("quickstart", 2, 1), ("quickstart_decoder", 0, 2)],
)
def test_resumed_run_matches_uninterrupted_run(tmp_path, shards, recipe, workers, processes):
    args = common(recipe, shards, workers)
    full = tmp_path / "full"
    proc = launch(args + [f"runtime.output_dir={full}"], processes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Interrupted after step 4: only the first checkpoint survived.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for name in ("step-8", "step-10"):
        shutil.rmtree(resumed / "checkpoints" / name)
    proc = launch(args + [f"runtime.output_dir={resumed}"], processes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming from" in proc.stdout and "step-4" in proc.stdout
    assert history(resumed) == history(full)  # exact: same floats, same steps, same token counts
    assert len([r for r in history(full) if r[1] is not None]) == 10
