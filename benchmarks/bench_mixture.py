"""What a data schedule costs: the training stream with two sources mixed at packing along ``data.schedule``
(``hf_streamlm.data.mixture``: each source read, shuffled and tokenized on its own) against the same documents as
one source, in the same process, alternating A B A B.

    python benchmarks/bench_mixture.py [--docs 40000] [--repeats 3] [--workers 0] [--json out.json]

Both sides read the shipped pydocs corpus repeated (each copy prefixed with its serial, so no two documents are
equal) from the same jsonl files, with the quickstart recipe's settings (shuffle buffer, blocks of 128, batches of
16) and a WordPiece tokenizer trained on pydocs: side A as one source (``datasets`` reads the files), side B as two
sources (the even and the odd files) mixed by tokens with a stage boundary halfway. Printed: blocks per second of
each, the median ratio B / A over the repeats, and the pickled data state of each after the pass.
"""

from __future__ import annotations

import argparse
import functools
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_pipeline import base_texts, write_corpus  # noqa: E402
from hf_streamlm.config import load_config  # noqa: E402
from hf_streamlm.data.collate import make_collator  # noqa: E402
from hf_streamlm.data.pipeline import build_train_loader  # noqa: E402
from hf_streamlm.tokenizer import train_tokenizer  # noqa: E402


def configs(files: list[str], blocks: int, workers: int):
    common = ["recipe=quickstart", "data.eval_holdout=0", f"data.num_workers={workers}",
              f"scheduler.total_steps={blocks // 16}"]
    one = load_config([*common, f"data.sources=[{{path: json, data_files: {json.dumps(files)}}}]"])
    sources = (f"[{{path: json, data_files: {json.dumps(files[0::2])}, label: a}}, "
               f"{{path: json, data_files: {json.dumps(files[1::2])}, label: b}}]")
    mixed = load_config([*common, f"data.sources={sources}", "data.mix_by=tokens",
                         "data.schedule=[{until: 0.5, weights: {a: 0.7, b: 0.3}}, {until: 1.0, weights: {a: 0.3, b: 0.7}}]"])
    return one, mixed


def run(config, tokenizer, blocks: int) -> tuple[float, int]:
    """Seconds for ``blocks`` blocks through the training stream, and the pickled data state's bytes after."""
    start = time.perf_counter()
    loader = build_train_loader(config, tokenizer, functools.partial(make_collator, config, tokenizer))
    seen = 0
    for batch in loader:
        seen += batch["input_ids"].shape[0]
        if seen >= blocks:
            break
    seconds = time.perf_counter() - start
    return seconds, len(pickle.dumps(loader.state_dict()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=40_000, help="documents in the corpus")
    parser.add_argument("--blocks", type=int, default=8_000, help="128-token blocks each side makes per pass")
    parser.add_argument("--repeats", type=int, default=3, help="A B pairs; the median ratio counts")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (data.num_workers)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    base = base_texts()
    tokenizer = train_tokenizer(base, "wordpiece", vocab_size=8000)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_corpus(Path(tmp), args.docs, base, 8)
        one, mixed = configs(files, args.blocks, args.workers)
        ratios, rows = [], []
        for r in range(args.repeats):
            a, a_state = run(one, tokenizer, args.blocks)
            b, b_state = run(mixed, tokenizer, args.blocks)
            ratios.append(a / b)
            rows.append({"one_source_blocks_per_s": round(args.blocks / a), "mixed_blocks_per_s": round(args.blocks / b),
                         "one_source_state_bytes": a_state, "mixed_state_bytes": b_state})
            print(f"repeat {r}: one source {args.blocks / a:,.0f} blocks/s, mixed {args.blocks / b:,.0f} blocks/s "
                  f"(B/A {a / b:.3f}); state {a_state:,} vs {b_state:,} bytes", flush=True)
    result = {"median_mixed_over_one_source": round(statistics.median(ratios), 3), "repeats": rows,
              "docs": args.docs, "blocks": args.blocks, "workers": args.workers}
    print(f"median throughput, mixed / one source: {result['median_mixed_over_one_source']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
