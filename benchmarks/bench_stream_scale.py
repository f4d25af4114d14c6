"""The training stream at ``runpod_1b``'s data settings: state size, throughput, data wait, resume time.

    python benchmarks/bench_stream_scale.py [--docs 160000] [--batches 320] [--step-ms 50] [--workers 2]
                                            [--buffers 65536 1000] [--trace] [--json out.json]

The recipe's data settings (issue #13): a 65,536-document shuffle buffer, 2,048-token blocks, batches of
2 blocks, document masking, a 1% hold-out, ``--workers`` DataLoader workers, over FineWeb-shaped
synthetic jsonl shards (documents of ~3.4 KB on average, log-normal lengths, Zipf-distributed words;
64 shard files, written once to a cache folder and reused). The model step is a fixed ``--step-ms``
sleep: on a GPU the step costs the CPUs nothing, so the workers have the cores, as here.

Per buffer size, one run of the real ``build_train_loader``:

- ``fill_s``: time to the first batch (the buffer filling), left out of everything below;
- ``tokens_per_s`` over ``--batches`` batches after it, and its ratio to the last ``--buffers`` value
  (1,000 documents: the reference; goal >= 0.95);
- ``worst_wait_pct``: the worst window of 16 batches' time blocked on the loader (a window that
  unpickles a snapshot shows here);
- ``state_mb``: the rank's data state as a checkpoint writes it (``torch.save`` of
  ``loader.state_dict()``; goal <= 64 MB with 2 workers, <= 128 MB with 8), taken every 64 batches,
  and ``state_ms`` the training thread's time to take and write it;
- ``resume_s``: a fresh loader loaded with the last state, time to its first batch, and whether that
  batch equals the one the uninterrupted run produced next (``resume_exact``).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hf_streamlm.config import load_config
from hf_streamlm.data.pipeline import build_train_loader
from hf_streamlm.tokenizer import train_tokenizer
from hf_streamlm.data.collate import make_collator

SHARDS = 64
WINDOW = 16
CHECKPOINT_EVERY = 64


def write_corpus(folder: Path, n_docs: int, seed: int = 0) -> Path:
    """FineWeb-shaped jsonl shards: ~3.4 KB documents of Zipf-distributed pseudo-words (written once)."""
    done = folder / "DONE"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(30000)]
    probs = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    probs /= probs.sum()
    per_shard = math.ceil(n_docs / SHARDS)
    serial = 0
    for shard in range(SHARDS):
        # ~6.4 bytes per word with its space: 530 words is ~3.4 KB; log-normal like web pages.
        lengths = np.clip(rng.lognormal(math.log(430), 0.65, size=per_shard), 20, 8000).astype(int)
        ids = rng.choice(len(vocab), size=int(lengths.sum()), p=probs)
        with (folder / f"shard-{shard:03d}.jsonl").open("w") as f:
            start = 0
            for n in lengths:
                text = f"page {serial}. " + " ".join(vocab[i] for i in ids[start:start + n])
                f.write(json.dumps({"text": text, "id": serial}) + "\n")
                start += n
                serial += 1
    done.write_text(str(serial))
    return folder


def sample_texts(folder: Path, n: int) -> list[str]:
    with (folder / "shard-000.jsonl").open() as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


def state_bytes(loader) -> tuple[int, float, dict]:
    start = time.perf_counter()
    state = loader.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell(), time.perf_counter() - start, state


def run(corpus: Path, tokenizer, buffer: int, args) -> dict:
    overrides = [
        "recipe=runpod_1b", f"data.sources=[{{path: json, data_files: '{corpus}/shard-*.jsonl'}}]",
        "data.max_samples=null", f"data.shuffle_buffer_size={buffer}", f"data.num_workers={args.workers}",
        f"data.trace_documents={'true' if args.trace else 'false'}",
    ]
    config = load_config(overrides) if args.trace else load_config(overrides[:-1])
    d = config.data
    collator = functools.partial(make_collator, config, tokenizer)
    loader = build_train_loader(config, tokenizer, collator)
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    fill_s = time.perf_counter() - start

    waits, window_waits, window_start, window_wait = [], [], time.perf_counter(), 0.0
    sizes, state_times, last_state, after_state = [], [], None, None
    t0 = time.perf_counter()
    tokens = 0
    for i in range(1, args.batches + 1):
        t = time.perf_counter()
        batch = next(it)
        wait = time.perf_counter() - t
        if after_state is None and last_state is not None:
            after_state = batch  # the batch the uninterrupted stream gives right after the saved state
        waits.append(wait)
        window_wait += wait
        tokens += batch["input_ids"].numel()
        time.sleep(args.step_ms / 1000)  # the model step
        if i % WINDOW == 0:
            now = time.perf_counter()
            window_waits.append(100 * window_wait / (now - window_start))
            window_start, window_wait = now, 0.0
        if i % CHECKPOINT_EVERY == 0:
            size, seconds, state = state_bytes(loader)
            sizes.append(size)
            state_times.append(seconds)
            if i + 1 <= args.batches:
                last_state, after_state = state, None
    elapsed = time.perf_counter() - t0
    del it

    result = {
        "buffer": buffer, "workers": args.workers, "sequence_length": d.sequence_length, "batch_size": d.batch_size,
        "fill_s": fill_s, "tokens_per_s": tokens / elapsed, "worst_wait_pct": max(window_waits),
        "mean_wait_pct": 100 * sum(waits) / elapsed, "state_mb": max(sizes) / 2**20,
        "state_ms": 1000 * max(state_times), "state_share_pct": 100 * sum(state_times) / elapsed,
    }
    if last_state is not None and after_state is not None:
        resumed = build_train_loader(config, tokenizer, collator)
        resumed.load_state_dict(last_state)
        start = time.perf_counter()
        first = next(iter(resumed))
        result["resume_s"] = time.perf_counter() - start
        result["resume_exact"] = all(torch.equal(first[k], after_state[k]) for k in after_state)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=160_000)
    parser.add_argument("--batches", type=int, default=320)
    parser.add_argument("--step-ms", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--buffers", type=int, nargs="+", default=[65536, 1000])
    parser.add_argument("--trace", action="store_true", help="with data.trace_documents on")
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "hf_streamlm_bench_fineweb")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    corpus = write_corpus(args.corpus / f"docs-{args.docs}", args.docs)
    random.seed(0)
    tokenizer = train_tokenizer(sample_texts(corpus, 3000), "bpe", vocab_size=8000, min_frequency=2)
    results = [run(corpus, tokenizer, buffer, args) for buffer in args.buffers]
    reference = results[-1]["tokens_per_s"]
    for r in results:
        r["ratio"] = r["tokens_per_s"] / reference
        resume = (f", resume {r['resume_s']:.1f} s (exact: {r['resume_exact']})" if "resume_s" in r else "")
        print(f"buffer {r['buffer']:>6}, {r['workers']} workers: {r['tokens_per_s']:,.0f} tokens/s ({r['ratio']:.2f}x), "
              f"fill {r['fill_s']:.1f} s, data wait {r['mean_wait_pct']:.1f}% (worst window {r['worst_wait_pct']:.1f}%), "
              f"state {r['state_mb']:.1f} MB per rank in {r['state_ms']:.0f} ms "
              f"({r['state_share_pct']:.2f}% of the run){resume}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
