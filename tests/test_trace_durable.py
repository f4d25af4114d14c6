"""The document trace is append-only and durable (issue #25): each checkpoint records the trace's length per
rank after flushing it to disk, a resume cuts the file back to that length with one truncate (no read of the
file: the cost does not grow with it), a checkpoint without a record falls back to a streaming cut (never the
whole file in memory), and a SIGKILL at any point of the resume's cut leaves every line up to the checkpoint."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from hf_streamlm.data.trace import RECORD, DocumentTrace, read_trace, recorded_lengths
from tests.conftest import DECODER, REPO, run_in_process

DOCS = [[0, "0123456789abcdef", 0]] * 24  # ~0.6 kB a line, as a step of a few dozen documents


def line(step: int) -> bytes:
    return (json.dumps({"step": step, "docs": DOCS}, separators=(",", ":")) + "\n").encode()


def synthetic_trace(folder: Path, steps: int, partial: bool = False) -> dict[int, int]:
    """``rank-0.jsonl`` with ``steps`` lines (and a last line cut short by a kill); returns the file's length
    after each step."""
    folder.mkdir(parents=True, exist_ok=True)
    ends, size, chunk = {}, 0, []
    with (folder / "rank-0.jsonl").open("wb") as f:
        for step in range(1, steps + 1):
            data = line(step)
            chunk.append(data)
            size += len(data)
            ends[step] = size
            if len(chunk) == 4096:
                f.write(b"".join(chunk))
                chunk = []
        f.write(b"".join(chunk))
        if partial:
            f.write(line(steps + 1)[:50])
        f.flush()
        os.fsync(f.fileno())  # as a run's trace is at a checkpoint: a cut then has no dirty pages to write out
    return ends


def checkpoint_with_record(root: Path, lengths: dict[str, int]) -> Path:
    ckpt = root / "step-k"
    ckpt.mkdir(parents=True)
    (ckpt / RECORD.format(rank=0)).write_text(json.dumps(lengths))
    return ckpt


def bytes_read() -> int | None:
    """Bytes this process has read through read() calls so far (Linux ``/proc/self/io`` rchar)."""
    try:
        return int(dict(l.split(": ") for l in Path("/proc/self/io").read_text().splitlines())["rchar"])
    except OSError:
        return None


def test_resume_cut_is_one_truncate_whatever_the_size(tmp_path):
    """A 62 MB trace cut back to the length its checkpoint recorded: the same file (inode), its first bytes
    untouched, the recorded length exactly; in milliseconds, with the bytes read and the peak RSS not growing
    with the file (the old rewrite read it whole: +252 MiB RSS and 0.8 s for 62 MiB)."""
    folder = tmp_path / "trace"
    ends = synthetic_trace(folder, 100_000, partial=True)
    path = folder / "rank-0.jsonl"
    assert path.stat().st_size > 60_000_000  # the 62 MB
    keep = 90_000
    ckpt = checkpoint_with_record(tmp_path, {"rank-0.jsonl": ends[keep]})
    inode = path.stat().st_ino
    with path.open("rb") as f:
        head = f.read(1 << 20)
    rss, read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, bytes_read()

    t0 = time.perf_counter()
    DocumentTrace(folder, 0, keep, 1, ckpt)
    elapsed = time.perf_counter() - t0

    rss_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    if read is not None:
        assert bytes_read() - read < 64 * 1024, "the cut read the trace"
    assert elapsed < 0.2, f"cut took {elapsed * 1000:.1f} ms"  # 2-8 ms measured; the rewrite took 1.4 s
    assert rss_growth_kib < 8 * 1024
    assert path.stat().st_ino == inode and path.stat().st_size == ends[keep]
    with path.open("rb") as f:
        assert f.read(1 << 20) == head
    rows = read_trace(path)
    assert [r["step"] for r in rows[-3:]] == [keep - 2, keep - 1, keep] and len(rows) == keep


def test_a_checkpoint_without_a_record_is_cut_line_by_line(tmp_path):
    """A checkpoint written before the record (no ``trace_<r>.json``): the lines up to its step are kept, a last
    line cut short by a kill dropped, streamed (Python's peak allocation far below the file's 12 MB)."""
    folder = tmp_path / "trace"
    synthetic_trace(folder, 20_000, partial=True)
    legacy = tmp_path / "step-k"
    legacy.mkdir()
    assert recorded_lengths(legacy) is None
    tracemalloc.start()
    try:
        DocumentTrace(folder, 0, 12_345, 1, legacy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert [r["step"] for r in read_trace(folder / "rank-0.jsonl")] == list(range(1, 12_346))
    assert not list(folder.glob(".*"))  # no temporary file left


def test_ranks_gone_are_cut_to_their_recorded_length_and_a_fresh_start_empties(tmp_path):
    """After a resume on fewer processes, rank 0 cuts the files of the ranks gone to their recorded lengths;
    a file that no record names (another node's, a checkpoint of fewer ranks) is cut at the step; a fresh
    start (no checkpoint) empties the file."""
    folder = tmp_path / "trace"
    ends = synthetic_trace(folder, 50)
    (folder / "rank-1.jsonl").write_bytes((folder / "rank-0.jsonl").read_bytes())
    (folder / "rank-2.jsonl").write_bytes((folder / "rank-0.jsonl").read_bytes())
    ckpt = checkpoint_with_record(tmp_path, {"rank-0.jsonl": ends[30], "rank-1.jsonl": ends[30]})
    DocumentTrace(folder, 0, 30, 1, ckpt)
    for rank in range(3):
        assert [r["step"] for r in read_trace(folder / f"rank-{rank}.jsonl")] == list(range(1, 31))
    DocumentTrace(folder, 0, 0, 3, None)
    assert (folder / "rank-0.jsonl").stat().st_size == 0


KILLER = r"""
import json, os, signal, sys
from pathlib import Path
from hf_streamlm.data import trace
folder, step, ckpt, where = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if where == "truncate":  # the kill lands on the truncate itself
    trace.os.ftruncate = die
elif where == "replace":  # the streamed copy is complete, not yet renamed
    trace.os.replace = die
elif where == "copy":  # halfway through the streamed copy
    loads, n = json.loads, [0]
    def loads_then_die(s):
        n[0] += 1
        if n[0] == 500:
            die()
        return loads(s)
    trace.json.loads = loads_then_die
print("ready", flush=True)
trace.DocumentTrace(folder, 0, step, 1, None if ckpt == "-" else Path(ckpt))
print("done", flush=True)
"""


@pytest.mark.parametrize("where, recorded", [("truncate", True), ("copy", False), ("replace", False), ("random", False)])
def test_a_kill_during_the_resume_cut_loses_no_line(tmp_path, where, recorded):
    """SIGKILL to a process cutting the trace for a resume: at the truncate (recorded length), halfway through
    the streaming cut's copy, before its rename, or at a random moment (sent from outside): the trace still
    holds every line up to the checkpoint, and the next resume's cut ends it there."""
    folder = tmp_path / "trace"
    ends = synthetic_trace(folder, 2_000 if where != "random" else 40_000, partial=True)
    keep = 1_500
    ckpt = checkpoint_with_record(tmp_path, {"rank-0.jsonl": ends[keep]}) if recorded else None
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", KILLER, str(folder), str(keep), str(ckpt or "-"), where]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if where == "random":
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.1 * (os.getpid() % 7) / 7)  # during the copy (40k lines: about a second)
        proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    steps = [r["step"] for r in read_trace(folder / "rank-0.jsonl")]
    assert steps[:keep] == list(range(1, keep + 1))
    DocumentTrace(folder, 0, keep, 1, ckpt)  # the next resume
    assert [r["step"] for r in read_trace(folder / "rank-0.jsonl")] == list(range(1, keep + 1))
    assert not list(folder.glob(".*"))


def test_checkpoints_record_the_fsynced_trace_and_a_resume_appends(tmp_path, bpe_800, monkeypatch):
    """A real run (decoder, trace on, a checkpoint every 2 steps): each checkpoint's ``trace_0.json`` holds the
    trace's length at its step, and the trace file was flushed to disk (fsync) before the checkpoint's
    ``trainer_state.json``. A run killed after step 6 before its checkpoint (lines 5-6 written; step-6 removed)
    resumes from step 4: the same file (inode), its bytes up to step 4 untouched, cut there, steps 5-6 appended
    again, the whole file equal to the uninterrupted run's (exact resume)."""
    out = tmp_path / "run"
    args = [*DECODER, f"tokenizer.path={bpe_800}", "data.trace_documents=true", "scheduler.total_steps=6",
            "runtime.checkpoint.max_keep=5", "runtime.evaluation.every_n_steps=null", f"runtime.output_dir={out}"]
    synced: list[str] = []
    fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    run_in_process(*args)
    monkeypatch.setattr(os, "fsync", fsync)
    path = out / "trace" / "rank-0.jsonl"
    full = path.read_bytes()
    rows = full.splitlines(keepends=True)
    assert [json.loads(r)["step"] for r in rows] == list(range(1, 7))
    for step in (2, 4, 6):
        record = json.loads((out / "checkpoints" / f"step-{step}" / "trace_0.json").read_text())
        assert record == {"rank-0.jsonl": len(b"".join(rows[:step]))}
        state = next(i for i, p in enumerate(synced) if p.endswith(f".tmp-step-{step}/trainer_state.json"))
        assert any(p == str(path) for p in synced[:state]), f"trace not flushed before step {step}'s checkpoint"

    import shutil

    shutil.rmtree(out / "checkpoints" / "step-6")
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step-4", "step": 4}))
    shutil.rmtree(out / "export")
    inode = path.stat().st_ino
    run_in_process(*args)
    assert path.stat().st_ino == inode
    assert path.read_bytes() == full
