"""What the loss-spike check (runtime.spikes) costs per optimizer step.

    python benchmarks/bench_spikes.py [--steps 60] [--repeats 3] [--decisions 2000] [--json out.json]

Two measurements, both on this machine's CPU, with one intra-op thread:

1. **The decision alone.** ``NonFiniteGuard.decide`` (the step's one read-back, hf_streamlm.train.monitor) with
   ``runtime.spikes`` off and on, a full window of 128 steps (the most work the rule does: a mean and a standard
   deviation over 128 losses and 128 gradient norms), timed over ``--decisions`` calls: CPU microseconds per step.
2. **Whole runs.** The real training entry point (``hf_streamlm.run``'s ``main``, in this process) on the offline
   quickstart_decoder recipe (hidden 128, 2 layers, batch 8 x 128 tokens), ``--steps`` steps with spikes off and
   on, alternated ``--repeats`` times; ``runtime.spikes.min_steps=2`` so that every step from the third is judged.
   Reported: the process CPU time of each run and the ratio on/off (medians), and the difference per step. Setup
   (data, model, export) is in both runs alike; the difference per step is the check's cost undiluted.

The check adds no read-back and no collective: what it costs is host arithmetic on values the step reads back
anyway. On a GPU that arithmetic runs while nothing waits for it but the next step's launch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def decision_cost(decisions: int) -> dict[str, float]:
    """CPU microseconds per ``decide`` call, spikes off and on (window full)."""
    import torch
    from accelerate import Accelerator

    from hf_streamlm.config import load_config
    from hf_streamlm.train.monitor import NonFiniteGuard

    accelerator = Accelerator(cpu=True)
    result = {}
    for enabled in (False, True):
        config = load_config(["recipe=quickstart_decoder", f"runtime.spikes.enabled={str(enabled).lower()}"])
        guard = NonFiniteGuard(config, accelerator)
        losses = 3.0 + 0.01 * torch.randn(decisions + 128)
        norms = 1.0 + 0.05 * torch.randn(decisions + 128)
        for i in range(128):  # fill the window (not timed)
            guard.add_loss(losses[i])
            guard.decide(norms[i])
        t0 = time.process_time()
        for i in range(128, decisions + 128):
            guard.add_loss(losses[i])
            guard.decide(norms[i])
        result["on" if enabled else "off"] = (time.process_time() - t0) / decisions * 1e6
    return result


def run_args(out: Path, steps: int, enabled: bool, tokenizer: Path) -> list[str]:
    return ["recipe=quickstart_decoder", f"tokenizer.path={tokenizer}", "data.batch_size=8", "data.sequence_length=128", "model.hidden_size=128",
            "model.num_layers=2", "model.intermediate_size=352", f"scheduler.total_steps={steps}",
            "scheduler.warmup_steps=2", f"runtime.log_every_n_steps={steps}", "runtime.evaluation.every_n_steps=null",
            "runtime.checkpoint.every_n_steps=null", "runtime.logging.progress_bar=false",
            "runtime.logging.enable_stdout=false", "runtime.logging.tensorboard=false", "runtime.demo_sentences=[]",
            f"runtime.spikes.enabled={str(enabled).lower()}", "runtime.spikes.min_steps=2", "runtime.resume=never",
            f"runtime.output_dir={out}"]


def run_cost(steps: int, repeats: int, workdir: Path) -> dict[str, object]:
    """Process CPU seconds of whole runs, spikes off and on, alternated."""
    from accelerate.state import AcceleratorState

    from hf_streamlm.config import load_config
    from hf_streamlm.run import main
    from hf_streamlm.tokenizer.train import build_tokenizer

    tokenizer = workdir / "tokenizer"  # trained once (the recipe's), outside the timed runs
    build_tokenizer(load_config(["recipe=quickstart_decoder"])).save_pretrained(tokenizer)
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(repeats):
        for enabled in (False, True):
            name = "on" if enabled else "off"
            AcceleratorState._reset_state(reset_partial_state=True)
            t0 = time.process_time()
            main(run_args(workdir / f"{name}-{r}", steps, enabled, tokenizer))
            cpu[name].append(time.process_time() - t0)
    off, on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
    return {"cpu_s": cpu, "ratio_on_off": on / off, "per_step_ms": (on - off) / steps * 1e3,
            "step_cpu_ms_off": off / steps * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per training run")
    parser.add_argument("--repeats", type=int, default=3, help="runs with spikes off and on, alternated")
    parser.add_argument("--decisions", type=int, default=2000, help="decide() calls timed, each way")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures there")
    args = parser.parse_args()
    import logging

    import torch

    # One intra-op thread: on a shared machine, idle OpenMP threads spin and bill CPU time that is not the run's work.
    torch.set_num_threads(1)

    logging.disable(logging.WARNING)  # the runs' own lines
    decision = decision_cost(args.decisions)
    print(f"decision alone: {decision['off']:.1f} us (spikes off), {decision['on']:.1f} us (on, window of 128 full): "
          f"+{decision['on'] - decision['off']:.1f} us CPU per optimizer step")
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_cost(args.steps, args.repeats, Path(tmp))
    print(f"whole runs ({args.steps} steps, median of {args.repeats}): CPU {statistics.median(runs['cpu_s']['off']):.2f} s "
          f"off, {statistics.median(runs['cpu_s']['on']):.2f} s on; ratio on/off {runs['ratio_on_off']:.4f}; "
          f"{runs['per_step_ms']:+.3f} ms per step of {runs['step_cpu_ms_off']:.1f} ms CPU")
    if args.json:
        args.json.write_text(json.dumps({"decision_us": decision, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
