"""A real two-machine launch on one host: two ``accelerate launch --num_machines 2 --machine_rank 0|1
--main_process_ip 127.0.0.1`` commands (one process each, CPU, gloo) train one model together, read
disjoint documents, checkpoint, and a second pair of launches resumes from the checkpoint with exactly
the per-step losses of the uninterrupted run. As on a real cluster, both machines run the same command
but for ``--machine_rank``; here they also share the run directory (a network volume on a cluster).

No ``runtime.output_dir`` is given: the run lands in ``runs/<runtime.experiment>/`` under the working
directory, the default layout of a named experiment (seed 004's ``runs/runpod-1b-streaming/``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from hf_streamlm.data.trace import read_trace
from tests.conftest import REPO

EXPERIMENT = "two-machines"
N_FILES = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_args(shards: Path, tokenizer: Path) -> list[str]:
    return ["recipe=quickstart_decoder", f"runtime.experiment={EXPERIMENT}",
            f"data.sources=[{{path: json, data_files: '{shards}/part-*.jsonl'}}]", "data.shuffle_buffer_size=100",
            "data.batch_size=4", "data.sequence_length=64", "model.num_layers=1", "model.hidden_size=64",
            "model.intermediate_size=128", f"tokenizer.path={tokenizer}", "scheduler.total_steps=6",
            "scheduler.warmup_steps=1", "runtime.log_every_n_steps=1", "runtime.checkpoint.every_n_steps=3",
            "runtime.checkpoint.max_keep=5", "runtime.evaluation.every_n_steps=3", "runtime.evaluation.max_batches=1",
            "runtime.logging.progress_bar=false", "runtime.demo_sentences=[]", "data.trace_documents=true"]


def launch_two_machines(args: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """``accelerate launch`` once per machine, as each machine of a cluster would run it."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(REPO / "accelerate_configs" / "cpu_2proc.yaml"),
               "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "-m", "hf_streamlm.run", *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def history(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("tokens")) for r in rows]


def documents_by_rank(run: Path, shards: Path) -> list[set[int]]:
    """The files each rank's trained documents came from: the keys in its document trace
    (``data.trace_documents``), looked up in the shard files."""
    file_of = {}
    for i in range(N_FILES):
        for line in (shards / f"part-{i}.jsonl").read_text().splitlines():
            text = json.loads(line)["text"]
            file_of[hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()] = i
    files = []
    for rank in (0, 1):
        keys = [doc[1] for row in read_trace(run / "trace" / f"rank-{rank}.jsonl") for doc in row["docs"]]
        assert keys, f"rank {rank} traced no documents"
        files.append({file_of[key] for key in keys})
    return files


def test_two_machines_train_together_on_disjoint_data_and_resume_exactly(tmp_path, shards, bpe_500):
    args = recipe_args(shards, bpe_500)
    full_cwd, resumed_cwd = tmp_path / "full", tmp_path / "resumed"
    full_cwd.mkdir()
    for proc in launch_two_machines(args, full_cwd):
        assert proc.returncode == 0, proc.stderr[-3000:]
    run = full_cwd / "runs" / EXPERIMENT  # the default output directory of a named experiment
    assert (run / "config.yaml").is_file() and (run / "export" / "model.safetensors").is_file()

    # One model trained by two processes: each logged step counts both machines' tokens ...
    rows = history(run)
    train_rows = [r for r in rows if r[1] is not None]
    assert [r[0] for r in train_rows] == list(range(1, 7))
    assert train_rows[0][3] == 2 * 4 * 64  # 2 ranks x batch 4 x 64 tokens
    # ... and each rank wrote its own data state into every checkpoint.
    checkpoint = run / "checkpoints" / "step-3"
    assert {p.name for p in checkpoint.glob("data_state_*.pt")} == {"data_state_0.pt", "data_state_1.pt"}

    # Disjoint data: the two machines' documents come from different shard files.
    files0, files1 = documents_by_rank(run, shards)
    assert files0.isdisjoint(files1), (files0, files1)

    # Machines restarted after step 3 (the later checkpoints lost): the second pair of launches resumes
    # from step-3 and logs exactly what the uninterrupted run logged.
    shutil.copytree(full_cwd, resumed_cwd)
    resumed = resumed_cwd / "runs" / EXPERIMENT
    shutil.rmtree(resumed / "checkpoints" / "step-6")
    results = launch_two_machines(args, resumed_cwd)
    for proc in results:
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming from" in results[0].stdout and "step-3" in results[0].stdout
    assert history(resumed) == rows  # max |delta loss| = 0: same floats, steps and token counts
    for rank in (0, 1):  # and the same documents at the same steps on each machine
        trace = f"trace/rank-{rank}.jsonl"
        assert read_trace(resumed / trace) == read_trace(run / trace)
