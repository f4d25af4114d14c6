"""A rehearsal of ``runpod_1b`` in miniature: every axis of the recipe at once, in one run of several legs.

    python benchmarks/rehearse.py [--workdir DIR] [--json FILE]

The recipe's shape, scaled down to a 2-core CPU: 2 processes x 2 DataLoader workers (``accelerate launch``,
gloo), gradient accumulation 4, micro-batch 2, 256-token blocks, document masking, the document trace, an
endless stream (pass 0 never ends here: 64 FineWeb-shaped parquet shards, far more than the run reads) served by
a loopback Hub (tests/hub_server.py: the real ``datasets``/``huggingface_hub`` clients over HTTP) and read as
two sources mixed by tokens along a data schedule (``runpod_1b_anneal``'s way; its stage boundary is crossed
between leg A's stop and leg B's failure), and
``log_every_n_steps=50`` as the recipe logs (so stops go through the step's read-back, not a logging step).
One uninterrupted reference on 2 x 2 is trained first, with a checkpoint at every step, to compare against.

The legs, one run directory:

A. 2 x 2 from scratch; a burst of 429 and 500 answers on the first shard of rank 0 (retried: nothing may change);
   a SIGTERM to the process group while rank 1 is in the middle of step A_STOP's accumulation
   (tests/faults.py ``hold-in-step``). Checkpoint, exit 0; weights and trace equal to the reference's.
B. 2 x 2 resumed (same layout); rank 0's shards start answering 429 for good while it holds after step
   B_HOLD: a read failure on one rank. Both ranks save the last completed step and exit 4 with one line
   naming rank 0; weights and trace equal to the reference's.
B2. 2 x 2 resumed once the shards answer again, for B2_STEPS steps: equal to the reference.
C. 1 x 1 (one process, no worker): an elastic resume of the 2 x 2 checkpoint, C_STEPS steps. The blocks of the
   old readers' packing content are handed over whole: each block of this leg that holds the tokens of a block the
   reference trained after the checkpoint carries the reference's ``position_ids`` (both runs record their
   micro-batches: tests/faults.py ``record-batches``).
D. 2 x 2 again: a second layout change, D_STEPS steps, mid-prelude of the first (the stream is endless).

After each leg: it ended within its timeout (no hang), each rank's data state is under ``STATE_BOUND`` bytes,
the trace holds every step once per rank (continuous: 1, 2, ... on each rank that trained it) and no document
twice in a pass; a same-layout leg equals the reference bit for bit (weights of every checkpoint it wrote, the
trace of its steps). The figures (leg times, state bytes, trace counts) are printed as a table and, with
``--json``, written as JSON; docs/resume.md quotes them. Exit status 0 when every check passed.
tests/test_rehearsal.py runs it in CI.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults import Drained, release, wait_until_held  # noqa: E402
from tests.hub_server import HubServer  # noqa: E402
from tests.test_preemption import finish  # noqa: E402
from tests.test_resume_run import command  # noqa: E402

REPO_ID = "rehearsal/fineweb"
SHARDS = 64
PER_SHARD = 100
# Bytes per rank's data state. A same-layout state is ~0.1-0.3 MB here; after a layout change each new reader also
# holds the snapshots of the old readers it took over (its origin), until the documents handed over have left its
# buffer: two changes in a row at most double that again. What must never happen is growth with the stream read.
STATE_BOUND = 2 << 20
LEG_TIMEOUT = 240  # seconds; a rank left waiting in a collective would sit until gloo's 30-minute timeout
A_STOP, B_HOLD, B2_STEPS, C_STEPS, D_STEPS = 6, 8, 3, 10, 6
REFERENCE_STEPS = 40


def shard_name(i: int) -> str:
    return f"data/CC-MAIN-2024-10/{i:03d}_00000.parquet"


def write_shards(server: HubServer) -> dict[str, int]:
    """FineWeb's columns (text, id, dump, url, date, file_path, language, language_score, token_count) in
    parquet shards with small row groups; texts made of sentences of the shipped corpus, each document distinct,
    mostly short (so that a worker reads ahead again every few steps and a fault is met soon) with a tail of long
    ones (longer than a 256-token block). Returns the document keys' shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hf_streamlm.data.corpus import BUILTIN_CORPORA
    from hf_streamlm.data.documents import document_key

    sentences = [s.strip() + "." for line in gzip.open(BUILTIN_CORPORA["pydocs"], "rt")
                 for s in json.loads(line)["text"].split(". ") if len(s.split()) > 3]
    rng = random.Random(2025)
    where = {}
    for i in range(SHARDS):
        rows = []
        for j in range(PER_SHARD):
            n = rng.randint(8, 20) if rng.random() < 0.95 else rng.randint(150, 300)  # words
            words = []
            while len(words) < n:
                words += rng.choice(sentences).split()
            text = f"<{i:03d}-{j:03d}> " + " ".join(words[:n])
            where[f"{document_key(text):016x}"] = i
            rows.append({"text": text, "id": f"<urn:uuid:{i:03d}-{j:03d}>", "dump": "CC-MAIN-2024-10",
                         "url": f"https://example.org/{i}/{j}", "date": "2024-02-21T00:00:00Z",
                         "file_path": f"s3://commoncrawl/{i}", "language": "en", "language_score": 0.9,
                         "token_count": n})
        path = server.repo_dir(REPO_ID) / shard_name(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=25)
    return where


# The anneal (recipes/runpod_1b_anneal.yaml) in miniature: two sources of the repository (shards 000-029 and
# 030-063), mixed by tokens along a schedule whose stage boundary falls inside step BOUNDARY_STEP (4,096 tokens a
# step), after leg A's stop: the preempted, failed and elastic legs all cross it or train past it.
BOUNDARY_STEP = 9
SOURCES = (f"[{{path: {REPO_ID}, data_files: 'data/CC-MAIN-2024-10/0[0-2]*.parquet', label: web}}, "
           f"{{path: {REPO_ID}, data_files: 'data/CC-MAIN-2024-10/0[3-6]*.parquet', label: edu}}]")
SCHEDULE = (f"[{{until: {BOUNDARY_STEP * 4096 - 2048}, weights: {{web: 0.8, edu: 0.2}}}}, "
            "{until: 1.0, weights: {web: 0.3, edu: 0.7}}]")


def run_args(out: Path, *extra: str) -> list[str]:
    return ["recipe=quickstart_decoder", f"data.sources={SOURCES}", "data.mix_by=tokens", f"data.schedule={SCHEDULE}",
            "data.num_workers=2",
            "data.gradient_accumulation_steps=4", "data.batch_size=2", "data.sequence_length=256",
            "data.document_masking=true", "data.shuffle_buffer_size=256", "data.block_shuffle_size=16",
            "data.eval_holdout=0", "data.retries=2",
            "data.retry_backoff=0", "data.trace_documents=true", "tokenizer.vocab_size=1000",
            "tokenizer.train_samples=400", "model.num_layers=1", "model.hidden_size=64", "model.intermediate_size=128",
            "model.num_attention_heads=2", "model.num_key_value_heads=1", "scheduler.strategy=constant",
            "scheduler.warmup_steps=0", "runtime.log_every_n_steps=50", "runtime.checkpoint.every_n_steps=1000",
            "runtime.checkpoint.max_keep=100", "runtime.evaluation.every_n_steps=null",
            "runtime.logging.progress_bar=false", "runtime.logging.tensorboard=false", "runtime.demo_sentences=[]",
            f"runtime.output_dir={out}", *extra]


class Rehearsal:
    def __init__(self, root: Path):
        self.root = root
        self.server = HubServer(root / "hub").start()
        self.where = write_shards(self.server)
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
        env.update(HF_ENDPOINT=self.server.url, HF_TOKEN="hf_local_test_token", HF_HOME=str(root / "hf_home"),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_UPDATE_DOWNLOAD_COUNTS="0",
                   TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        self.env = env
        self.out = root / "run"
        self.reference = root / "reference"
        self.legs: list[dict] = []

    # -- running ----------------------------------------------------------------------------------

    def start(self, out: Path, processes: int, extra: list[str], fault: list[str] | None = None,
              rank: int = 0) -> Drained:
        module = ["-m", "tests.faults", *fault] if fault else None
        return Drained(command(run_args(out, *extra), processes, module), cwd=REPO, start_new_session=True,
                       env={**self.env, "TESTS_FAULTS_RANK": str(rank)})

    def finish(self, proc: Drained, name: str) -> subprocess.CompletedProcess:
        try:
            return finish(proc, LEG_TIMEOUT)
        except AssertionError as err:  # still running: a hang (the whole process group was killed)
            raise AssertionError(f"leg {name}: {err}") from None

    # -- checks -----------------------------------------------------------------------------------

    def checkpoint(self, run: Path, step: int) -> Path:
        return run / "checkpoints" / f"step-{step}"

    def newest(self, run: Path) -> int:
        return max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))

    def same_weights(self, step: int) -> None:
        from safetensors.torch import load_file

        ours = load_file(self.checkpoint(self.out, step) / "model.safetensors")
        theirs = load_file(self.checkpoint(self.reference, step) / "model.safetensors")
        differ = [k for k in theirs if not (ours[k] == theirs[k]).all()]
        assert ours.keys() == theirs.keys() and not differ, f"step {step}: weights differ from the reference: {differ}"

    def trace(self, run: Path) -> dict[tuple[int, int], list]:
        rows = {}
        for path in sorted((run / "trace").glob("rank-*.jsonl")):
            rank = int(path.stem.split("-")[1])
            steps = []
            for line in path.read_text().splitlines():
                row = json.loads(line)
                steps.append(row["step"])
                rows[(rank, row["step"])] = row["docs"]
            assert steps == sorted(set(steps)), f"rank {rank}'s trace repeats or reorders steps: {steps}"
        return rows

    def same_trace(self, first: int, last: int) -> None:
        ours, theirs = self.trace(self.out), self.trace(self.reference)
        for rank in (0, 1):
            for step in range(first, last + 1):
                assert ours.get((rank, step)) == theirs.get((rank, step)), f"rank {rank} step {step}: other documents"

    def audit(self, name: str, processes: int, workers: int, seconds: float, result: subprocess.CompletedProcess) -> dict:
        """The checks of every leg; returns its figures."""
        step = self.newest(self.out)
        rows = self.trace(self.out)
        trained = sorted({s for _, s in rows})
        assert trained == list(range(1, step + 1)), f"leg {name}: steps traced {trained[:3]}...{trained[-3:]}, " \
                                                    f"not 1..{step}"
        per_pass: dict[int, Counter] = {}
        for docs in rows.values():
            for source, key, epoch in docs:
                assert key in self.where, f"leg {name}: traced document {key} is in no shard"
                assert (self.where[key] >= 30) == source, f"leg {name}: document {key} traced as source {source}"
                per_pass.setdefault(epoch, Counter())[key] += 1
        repeated = {e: [k for k, n in c.items() if n > 1] for e, c in per_pass.items()}
        assert not any(repeated.values()), f"leg {name}: documents trained twice in a pass: {repeated}"
        assert set(per_pass) == {0}, f"leg {name}: the stream is endless, yet passes {sorted(per_pass)} were traced"
        ckpt = self.checkpoint(self.out, step)
        states = {p.name: p.stat().st_size for p in sorted(ckpt.glob("data_state_*.pt"))}
        assert len(states) == processes, f"leg {name}: {len(states)} data states in {ckpt.name}"
        assert max(states.values()) < STATE_BOUND, f"leg {name}: data state {states} over {STATE_BOUND} bytes"
        figures = {"leg": name, "layout": f"{processes}x{workers}", "seconds": round(seconds, 1),
                   "last_step": step, "exit": result.returncode, "state_bytes": max(states.values()),
                   "documents_traced": sum(per_pass[0].values())}
        self.legs.append(figures)
        print(f"[rehearsal] leg {name}: {figures}", flush=True)
        return figures

    # -- legs -------------------------------------------------------------------------------------

    def run_reference(self) -> None:
        t0 = time.monotonic()
        result = self.finish(self.start(self.reference, 2, [f"scheduler.total_steps={REFERENCE_STEPS}",
                                                           "runtime.checkpoint.every_n_steps=1"],
                                        ["record-batches", "0"]), "reference")
        assert result.returncode == 0, f"reference: exit {result.returncode}: {result.stderr[-3000:]}"
        print(f"[rehearsal] reference: {REFERENCE_STEPS} steps in {time.monotonic() - t0:.1f} s", flush=True)

    def leg_a(self) -> None:
        """Burst of 429/500 on rank 0's first shard; group SIGTERM mid-accumulation at step A_STOP."""
        burst = shard_name(0)
        self.server.fail_with(burst, 429, times=2, repo=REPO_ID)
        self.server.fail_with(burst, 500, times=2, repo=REPO_ID)
        t0 = time.monotonic()
        proc = self.start(self.out, 2, ["scheduler.total_steps=1000"], ["hold-in-step", str(A_STOP)], rank=1)
        wait_until_held(proc, self.out, A_STOP, "in")
        os.killpg(proc.pid, signal.SIGTERM)
        result = self.finish(proc, "A")
        self.server.clear_faults()
        assert f"Stopped by SIGTERM at step {A_STOP}; checkpoint saved" in result.stdout, \
            f"leg A: {result.stdout[-2000:]} {result.stderr[-3000:]}"
        assert self.server.count(burst) >= 5, f"leg A: the burst was not met ({self.server.count(burst)} requests)"
        # torchrun's agent passes the SIGTERM on to each rank's group, and SIGKILLs 30 s later: no rank needed that.
        assert "killed by signal" not in result.stderr and "Unable to shutdown process" not in result.stderr
        self.audit("A: burst of 429/500, group SIGTERM mid-accumulation", 2, 2, time.monotonic() - t0, result)
        self.same_weights(A_STOP)
        self.same_trace(1, A_STOP)

    def leg_b(self) -> int:
        """Same-layout resume; rank 0's shards answer 429 for good after step B_HOLD (the Hub's rate limit, on the
    one rank that reads them)."""
        t0 = time.monotonic()
        proc = self.start(self.out, 2, ["scheduler.total_steps=1000"], ["hold-after-step", str(B_HOLD)], rank=0)
        wait_until_held(proc, self.out, B_HOLD)
        for i in range(0, SHARDS, 2):  # rank 0 of 2 reads the even shards (datasets splits files round-robin)
            self.server.fail_with(shard_name(i), 429, times=None, repo=REPO_ID)
        release(self.out, B_HOLD)
        result = self.finish(proc, "B")
        ended = time.time()
        self.server.clear_faults()
        assert "exitcode  : 4" in result.stderr, f"leg B: {result.stderr[-3000:]}"
        # The first rank to give up logs when; every rank must be out within seconds of it (no collective waits).
        seen = re.findall(r"^(\S+ \S+) hf_streamlm.train.stops: data failure after", result.stderr, re.M)
        assert seen, f"leg B: no data failure logged: {result.stderr[-3000:]}"
        first = min(datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp() for t in seen)
        out_after = ended - first
        assert out_after < 60, f"leg B: the ranks took {out_after:.0f} s to stop after the failure"
        lines = {line for line in result.stderr.splitlines() if line.startswith("hf-streamlm: error:")}
        assert len(lines) == 1 and "rank 0: " in next(iter(lines)), f"leg B: {lines}"
        figures = self.audit("B: resume 2x2, read failure on rank 0", 2, 2, time.monotonic() - t0, result)
        figures["out_after_failure_s"] = round(out_after, 1)
        failed_at = figures["last_step"]
        print(f"[rehearsal] leg B failed at step {failed_at}", flush=True)
        assert failed_at > B_HOLD and f"training stopped after step {failed_at}" in next(iter(lines))
        assert failed_at + B2_STEPS <= REFERENCE_STEPS, f"leg B: failed at step {failed_at}, past the reference"
        self.same_weights(failed_at)
        self.same_trace(1, failed_at)
        return failed_at

    def leg_b2(self, failed_at: int) -> int:
        end = failed_at + B2_STEPS
        t0 = time.monotonic()
        result = self.finish(self.start(self.out, 2, [f"scheduler.total_steps={end}"]), "B2")
        assert result.returncode == 0 and f"(step {failed_at})" in result.stdout, f"leg B2: {result.stderr[-3000:]}"
        self.audit("B2: resume 2x2 once readable", 2, 2, time.monotonic() - t0, result)
        self.same_weights(end)
        self.same_trace(1, end)
        return end

    def handed_over_blocks(self, start: int) -> dict[tuple[int, int], int]:
        """The blocks of this run's newest leg (recorded: ``batches-rank0.npz``, one process) that hold the tokens of
        a block the reference trained after step ``start`` (the old readers' packing content, handed over): each
        must carry the reference's positions. Returns how many there are per old reader (rank, worker)."""
        import numpy as np

        trained = {}
        for rank in (0, 1):
            ref = np.load(self.reference / f"batches-rank{rank}.npz")  # micro-batches: 4 per step and rank
            for j in range(start * 4, len(ref["input_ids"])):
                for row, pos in zip(ref["input_ids"][j], ref["position_ids"][j]):
                    trained[row.tobytes()] = pos, (rank, j % 2)  # batch j of a rank comes from worker j mod 2
        leg = np.load(self.out / "batches-rank0.npz")
        found: Counter = Counter()
        for row, pos in zip(*(leg[k].reshape(-1, leg[k].shape[-1]) for k in ("input_ids", "position_ids"))):
            if (want := trained.get(row.tobytes())) is not None:
                assert (want[0] == pos).all(), f"a block handed over by {want[1]} carries other positions"
                found[want[1]] += 1
        return dict(found)

    def leg_elastic(self, name: str, start: int, steps: int, processes: int, workers: int, record: bool = False) -> int:
        end = start + steps
        t0 = time.monotonic()
        extra = [f"scheduler.total_steps={end}", f"data.num_workers={workers}"]
        result = self.finish(self.start(self.out, processes, extra, ["record-batches", "0"] if record else None), name)
        assert result.returncode == 0, f"leg {name}: {result.stderr[-3000:]}"
        assert "resumed " in result.stdout and f"-> {processes}x{workers}" in result.stdout, \
            f"leg {name}: no elastic resume line: {result.stdout[-1500:]}"
        figures = self.audit(name, processes, workers, time.monotonic() - t0, result)
        if record:
            # Each old reader hands over the blocks it would have made next, whole, one old reader after the other
            # (~40 blocks each here, more than this leg trains of the last ones): found in this leg with the
            # reference's tokens and positions. Appended one document after the other, as before issue 25, only the
            # first old reader's blocks kept their cut; the next ones' fell across block boundaries.
            found = self.handed_over_blocks(start)
            figures["handed_over_blocks"] = {f"{rank}x{worker}": n for (rank, worker), n in sorted(found.items())}
            assert len(found) >= 2, f"leg {name}: blocks of the old readers found whole, by (rank, worker): {found}"
        return end


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rehearsal-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        rehearsal = Rehearsal(root)
        t0 = time.monotonic()
        try:
            rehearsal.run_reference()
            rehearsal.leg_a()
            failed_at = rehearsal.leg_b()
            end = rehearsal.leg_b2(failed_at)
            end = rehearsal.leg_elastic("C: elastic 2x2 -> 1x1", end, C_STEPS, 1, 0, record=True)
            rehearsal.leg_elastic("D: elastic 1x1 -> 2x2 (second change)", end, D_STEPS, 2, 2)
        except AssertionError as err:
            print(f"[rehearsal] FAILED: {err}", flush=True)
            return 1
        finally:
            rehearsal.server.stop()
        total = time.monotonic() - t0
        b = next(leg for leg in rehearsal.legs if "out_after_failure_s" in leg)
        c = next(leg for leg in rehearsal.legs if "handed_over_blocks" in leg)
        print(f"\nleg B: every rank out {b['out_after_failure_s']} s after the first rank gave up on its source")
        print(f"leg C: blocks handed over whole, with the reference's tokens and positions, by old reader (rank x "
              f"worker): {c['handed_over_blocks']}")
        print("\n| leg | layout | seconds | last step | exit | data state per rank (bytes) | documents traced |")
        print("|---|---|---|---|---|---|---|")
        for leg in rehearsal.legs:
            print(f"| {leg['leg']} | {leg['layout']} | {leg['seconds']} | {leg['last_step']} | {leg['exit']} | "
                  f"{leg['state_bytes']:,} | {leg['documents_traced']:,} |")
        print(f"\nrehearsal passed in {total:.0f} s")
        if args.json:
            args.json.write_text(json.dumps({"legs": rehearsal.legs, "seconds": round(total, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
