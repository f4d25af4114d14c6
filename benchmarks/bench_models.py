"""Training-step speed of the project's model classes vs stock transformers classes of identical
dimensions and weights (SDPA attention), CPU fp32, as a ratio measured in one run.

    python benchmarks/bench_models.py [--repeats 15] [--json out.json] [--cases decoder] [--threads 1 --clock cpu]

A step is forward + backward + AdamW step. The two models alternate (A B A B ...) so machine noise
hits both alike; the ratio of medians is reported (project / stock: below 1.0 means faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_streamlm.models.decoder import DecoderConfig, DecoderForCausalLM
from hf_streamlm.models.export_formats import to_native
from hf_streamlm.models.microbert import MicroBertConfig, MicroBertForMaskedLM

CASES = {
    "microbert": (
        lambda: MicroBertForMaskedLM(MicroBertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4,
                                                     num_attention_heads=4, max_position_embeddings=128,
                                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        16, 128,
    ),
    "decoder": (
        lambda: DecoderForCausalLM(DecoderConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4,
                                                 num_attention_heads=8, num_key_value_heads=4,
                                                 max_position_embeddings=256)),
        8, 256,
    ),
}


CLOCK = time.perf_counter
"""Wall time; `--clock cpu` takes the process's CPU time instead (`time.process_time`), which a busy, shared machine
hardly moves: time spent waiting for a core is not counted (with --threads 1 the whole step runs on one thread)."""


def step_time(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    start = CLOCK()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return CLOCK() - start


def bench(name: str, repeats: int) -> dict:
    make, batch_size, seq = CASES[name]
    torch.manual_seed(0)
    ours = make().train()
    ours.config._attn_implementation = "sdpa"
    stock = to_native(ours).train()
    stock.set_attn_implementation("sdpa")
    ids = torch.randint(5, 8000, (batch_size, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if name == "microbert":
        labels[torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) > 0.15] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    models = {"ours": ours, "stock": stock}
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    for key in models:  # warm-up: allocator, kernels, optimizer state
        for _ in range(2):
            step_time(models[key], optims[key], batch)
    times: dict[str, list[float]] = {"ours": [], "stock": []}
    for _ in range(repeats):
        for key in ("ours", "stock"):
            times[key].append(step_time(models[key], optims[key], batch))
    ours_s, stock_s = statistics.median(times["ours"]), statistics.median(times["stock"])
    # Each pair ran back to back: the median of the pairs' ratios follows a machine whose speed drifts.
    pair_ratio = statistics.median(a / b for a, b in zip(times["ours"], times["stock"]))
    return {
        "case": name,
        "stock_class": type(stock).__name__,
        "tokens_per_step": batch_size * seq,
        "ours_median_s": round(ours_s, 4),
        "stock_median_s": round(stock_s, 4),
        "ratio_ours_over_stock": round(ours_s / stock_s, 3),
        "median_pair_ratio": round(pair_ratio, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"which to run, of {', '.join(CASES)} (default all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default torch's); 1 keeps a shared, busy machine's noise down")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time (default) or the process's CPU time, for a shared, busy machine")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [bench(name, args.repeats) for name in args.cases]
    for r in results:
        print(f"{r['case']:<10} vs {r['stock_class']:<17} ours {r['ours_median_s']*1e3:8.1f} ms  "
              f"stock {r['stock_median_s']*1e3:8.1f} ms  ratio {r['ratio_ours_over_stock']:.3f}  "
              f"(median of pairs {r['median_pair_ratio']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
