"""Data-wait share of the training step: is loading overlapped with compute?

    python benchmarks/bench_data_wait.py [--steps 60] [--workers 0 2] [--json out.json]

Runs the real training entry point (``python -m hf_streamlm.run``) on the offline quickstart_decoder
recipe, with a model big enough that the step dominates (hidden 256, 4 layers, sequence 256, batch
8 on CPU), once per ``--workers`` value, and reads the loop's own ``data_wait_pct`` (time blocked on
the loader / wall time of the logging window) from ``history.jsonl``. The first logged window is left
out: it holds the workers' start-up and the first fill of the shuffle buffer. Goal: <= 1% with
worker processes (issue #7). The time per step is printed alongside so the ratio can be read as
milliseconds too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(workers: int, steps: int, workdir: Path) -> dict:
    out = workdir / f"workers-{workers}"
    args = ["recipe=quickstart_decoder", f"data.num_workers={workers}", "data.batch_size=8",
            "data.sequence_length=256", "model.max_position_embeddings=256", "model.hidden_size=256",
            "model.num_layers=4", "model.num_attention_heads=4", "model.intermediate_size=704",
            f"scheduler.total_steps={steps}", "scheduler.warmup_steps=2", "runtime.log_every_n_steps=10",
            "runtime.evaluation.every_n_steps=null", "runtime.checkpoint.every_n_steps=null",
            "runtime.logging.progress_bar=false", "runtime.logging.enable_stdout=false", "runtime.demo_sentences=[]",
            "runtime.logging.tensorboard=false", f"runtime.output_dir={out}"]
    subprocess.run([sys.executable, "-m", "hf_streamlm.run", *args], cwd=REPO, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r][1:]  # the first window holds start-up
    wait = statistics.mean(r["data_wait_pct"] for r in train)
    step_ms = statistics.mean(10 * 8 * 256 / r["tokens_per_s"] for r in train) * 1000 / 10
    return {"workers": workers, "data_wait_pct": wait, "step_ms": step_ms, "windows": len(train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(w, args.steps, Path(tmp)) for w in args.workers]
    for r in results:
        goal = " (goal <= 1%)" if r["workers"] else ""
        print(f"num_workers={r['workers']}: data wait {r['data_wait_pct']:.2f}% of step time{goal}, "
              f"{r['step_ms']:.0f} ms/step over {r['windows']} windows of 10 steps")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
