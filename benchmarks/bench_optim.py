"""Muon against AdamW at the same steps: held-out loss and time per step.

    python benchmarks/bench_optim.py [--steps 300] [--seeds 0 1] [--lrs 2e-3] [--json out.json]

Runs the real training entry point (``python -m hf_streamlm.run``) on the offline quickstart_decoder recipe
(the shipped corpus, its 2,000-token BPE trained once here), with a decoder of hidden 256, 4 layers, sequence
256, batch 8 on the CPU, once with ``optimizer.algorithm=adam_w`` and once with ``muon``, per seed and peak
learning rate (``--lrs``, a sweep), the two alternating. Same data, schedule (cosine with warm-up, the recipe's)
and weight decay: Muon scales its update to AdamW's size (``match_rms_adamw``), so the same rates apply to both.
With several rates, each optimizer is also compared at its own best one (by the mean over seeds). It reads the loop's own
``history.jsonl``: the final held-out loss (``eval_loss``, the same batches for both) and the time per step
from ``tokens_per_s`` (the first logged window, start-up, left out). Reported: the held-out loss of each and
their difference, and the step-time ratio muon / adam_w (on a GPU the Newton-Schulz iterations are a few percent
of a 1B step; on these small CPU matrices they weigh more).
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
BATCH, SEQUENCE = 8, 256


def train(algorithm: str, seed: int, steps: int, lr: float, tokenizer: Path, workdir: Path) -> dict:
    out = workdir / f"{algorithm}-{seed}-lr{lr:g}"
    args = ["recipe=quickstart_decoder", f"optimizer.algorithm={algorithm}", f"optimizer.learning_rate={lr}",
            f"runtime.seed={seed}", f"tokenizer.path={tokenizer}", f"data.batch_size={BATCH}",
            f"data.sequence_length={SEQUENCE}", f"model.max_position_embeddings={SEQUENCE}", "model.hidden_size=256",
            "model.num_layers=4", "model.num_attention_heads=4", "model.intermediate_size=704",
            f"scheduler.total_steps={steps}", f"scheduler.warmup_steps={steps // 20}", "scheduler.min_lr=0",
            "runtime.log_every_n_steps=10", f"runtime.evaluation.every_n_steps={steps}",
            "runtime.evaluation.max_batches=16", "runtime.checkpoint.every_n_steps=null",
            "runtime.logging.progress_bar=false", "runtime.logging.enable_stdout=false", "runtime.demo_sentences=[]",
            "runtime.logging.tensorboard=false", f"runtime.output_dir={out}"]
    subprocess.run([sys.executable, "-m", "hf_streamlm.run", *args], cwd=REPO, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r][1:]
    step_ms = statistics.median(10 * BATCH * SEQUENCE / r["tokens_per_s"] for r in train_rows) * 1000 / 10
    return {"algorithm": algorithm, "seed": seed, "eval_loss": [r for r in rows if "eval_loss" in r][-1]["eval_loss"],
            "train_loss": train_rows[-1]["loss"], "step_ms": step_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3],
                        help="peak learning rates, each run for both (the recipe's is 2e-3)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "tokenizer"
        subprocess.run([sys.executable, "-m", "hf_streamlm.cli", "tokenizer", "recipe=quickstart_decoder",
                        "tokenizer.vocab_size=2000", "--output", str(tokenizer)], cwd=REPO, check=True,
                       capture_output=True)
        results = [{**train(algorithm, seed, args.steps, lr, tokenizer, Path(tmp)), "lr": lr}
                   for lr in args.lrs for seed in args.seeds for algorithm in ("adam_w", "muon")]
    for r in results:
        print(f"{r['algorithm']:>6} lr {r['lr']:g} seed {r['seed']}: eval loss {r['eval_loss']:.4f}, "
              f"train loss {r['train_loss']:.4f}, {r['step_ms']:.0f} ms/step")
    summary = {}
    for lr in args.lrs:
        by = {a: [r for r in results if r["algorithm"] == a and r["lr"] == lr] for a in ("adam_w", "muon")}
        gaps = [m["eval_loss"] - a["eval_loss"] for a, m in zip(by["adam_w"], by["muon"])]
        times = [m["step_ms"] / a["step_ms"] for a, m in zip(by["adam_w"], by["muon"])]
        summary[lr] = {"eval_loss_gap": gaps, "step_time_ratio": statistics.median(times)}
        print(f"lr {lr:g}, after {args.steps} steps: eval loss muon - adam_w = "
              f"{', '.join(f'{g:+.4f}' for g in gaps)} (mean {statistics.mean(gaps):+.4f}); "
              f"step time muon / adam_w = {statistics.median(times):.3f}")
    best = {}
    for a in ("adam_w", "muon"):
        means = {lr: statistics.mean(r["eval_loss"] for r in results if r["algorithm"] == a and r["lr"] == lr)
                 for lr in args.lrs}
        best[a] = min(means.items(), key=lambda item: item[1])
    if len(args.lrs) > 1:
        print(f"each at its best rate: adam_w {best['adam_w'][1]:.4f} (lr {best['adam_w'][0]:g}), muon "
              f"{best['muon'][1]:.4f} (lr {best['muon'][0]:g}): muon - adam_w = "
              f"{best['muon'][1] - best['adam_w'][1]:+.4f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "by_lr": summary, "best": best}, indent=2))


if __name__ == "__main__":
    main()
