"""Tokenizer training from the stream: speed against the bare Rust trainer, and peak memory.

    python benchmarks/bench_tokenizer.py speed  [--docs 100000] [--kinds wordpiece bpe] [--repeats 2] [--json F]
    python benchmarks/bench_tokenizer.py memory [--sizes 100000 1000000] [--kind bpe] [--vocab 50000]
                                                [--docs-per-file 12500] [--json F]
    python benchmarks/bench_tokenizer.py speed --profile      # where reading the stream spends its time

Both take ``--files 8`` (jsonl files per corpus; memory: unless ``--docs-per-file``) and ``--workdir DIR``.

- speed: ``build_tokenizer(config)`` end to end (the recipe's stream over local jsonl files: open,
  filter, hold-out split, then training) against ``tokenizers``' ``Tokenizer.train_from_iterator`` on
  the same documents already in a Python list, with the same model, normalizer, pre-tokenizer and
  trainer settings (vocab, min_frequency, special tokens). The two alternate ``--repeats`` times in
  one process; the best of each gives the ratio stream / in-memory (goal <= 1.2). A third figure,
  the stream read alone (``iter_texts`` without training), shows how much of the stream side is
  spent reading. The pipeline's batched per-document stages run ``ROW_BATCH`` rows per call
  (hf_streamlm.data.sources): datasets' default 1000 made the stream 2.3-2.6x.
- memory: for each size, a fresh subprocess trains from the stream and reports its peak RSS
  (``resource.getrusage``: ``ru_maxrss``), the RSS after imports, before training, and the highest
  RSS sampled (every second) in the first and in the second half of the run. The corpus
  is the shipped pydocs corpus repeated, with the copy's counter in a separate ``id`` field, never in
  the text: the distinct words saturate, so a bounded trainer's peak must not grow with the size.

Corpora are written once to ``--workdir`` (default: a folder under the system temp dir) as
``--files`` jsonl files and reused by later runs. Nothing touches the network.
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"wordpiece": "quickstart", "wordlevel": "quickstart", "bpe": "quickstart_decoder"}


def base_texts() -> list[str]:
    from hf_streamlm.data.corpus import BUILTIN_CORPORA

    with gzip.open(BUILTIN_CORPORA["pydocs"], "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def write_corpus(workdir: Path, n_docs: int, n_files: int) -> str:
    """``n_docs`` documents (pydocs repeated; the counter only in ``id``) in ``n_files`` jsonl files;
    returns their glob. Written once per (size, files)."""
    folder = workdir / f"pydocs-{n_docs}-{n_files}"
    done = folder / "DONE"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        base = base_texts()
        lines = [json.dumps({"text": t}, ensure_ascii=False)[1:] for t in base]  # '"text": "..."}'
        files = [open(folder / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(n_files)]
        try:
            for i in range(n_docs):
                files[i % n_files].write(f'{{"id": {i}, {lines[i % len(lines)]}\n')
        finally:
            for f in files:
                f.close()
        done.write_text(str(n_docs))
    return str(folder / "part-*.jsonl")


def make_config(pattern: str, kind: str, vocab: int | None = None):
    from hf_streamlm.config import load_config

    overrides = [f"recipe={RECIPES[kind]}", f"tokenizer.kind={kind}", "tokenizer.train_samples=null",
                 f"data.sources=[{{path: json, data_files: '{pattern}'}}]"]
    if vocab:
        overrides.append(f"tokenizer.vocab_size={vocab}")
    return load_config(overrides)


def bare_train(texts: list[str], kind: str, vocab_size: int, min_frequency: int, lowercase: bool) -> None:
    """The reference: tokenizers' own trainer on an in-memory list, same settings as train_tokenizer."""
    from tokenizers import pre_tokenizers, trainers

    from hf_streamlm.tokenizer.train import WORDPIECE_PREFIX, _blank

    tok, specials = _blank(kind, lowercase)
    names = list(dict.fromkeys(specials.values()))
    if kind == "bpe":
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=names,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "wordpiece":
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=names,
                                            continuing_subword_prefix=WORDPIECE_PREFIX, show_progress=False)
    else:
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=names,
                                            show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def speed(args) -> dict:
    from hf_streamlm.data import iter_texts
    from hf_streamlm.data.sources import ROW_BATCH
    from hf_streamlm.tokenizer import build_tokenizer

    pattern = write_corpus(args.workdir, args.docs, args.files)
    results = {"docs_in_files": args.docs, "files": args.files, "cpus": os.cpu_count(),
               "stage_batch_size": ROW_BATCH, "kinds": {}}
    for kind in args.kinds:
        config = make_config(pattern, kind)
        t = config.tokenizer
        start = time.perf_counter()
        texts = list(iter_texts(config))
        read_s = time.perf_counter() - start
        if args.profile:  # the reading (training reads in a thread cProfile does not see, and is Rust)
            profiler = cProfile.Profile()
            profiler.runcall(lambda: sum(1 for _ in iter_texts(config)))
            print(f"--- {kind}: reading the stream (iter_texts), top 15 by own time")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
            continue
        best = {"stream": float("inf"), "memory": float("inf")}
        cpu = {}
        for _ in range(args.repeats):
            for side in ("stream", "memory"):
                start, c0 = time.perf_counter(), cpu_seconds()
                if side == "stream":
                    tok = build_tokenizer(config)
                else:
                    bare_train(texts, kind, t.vocab_size, t.min_frequency, t.lowercase)
                elapsed = time.perf_counter() - start
                if elapsed < best[side]:
                    best[side], cpu[side] = elapsed, cpu_seconds() - c0
        row = {"docs": len(texts), "vocab": len(tok), "stream_s": round(best["stream"], 2),
               "memory_s": round(best["memory"], 2), "ratio": round(best["stream"] / best["memory"], 3),
               "stream_cpu_s": round(cpu["stream"], 2), "memory_cpu_s": round(cpu["memory"], 2),
               "read_only_s": round(read_s, 2)}
        results["kinds"][kind] = row
        print(f"{kind}: {row['docs']:,} docs, vocab {row['vocab']:,}: stream {row['stream_s']:.2f} s "
              f"(cpu {row['stream_cpu_s']:.1f} s), in-memory train_from_iterator {row['memory_s']:.2f} s "
              f"(cpu {row['memory_cpu_s']:.1f} s), ratio {row['ratio']:.2f}x (goal <= 1.2); "
              f"reading the stream alone: {row['read_only_s']:.2f} s", flush=True)
    return results


def memory_child(pattern: str, kind: str, vocab: int) -> None:
    """Runs in a fresh process: train from the stream, print RSS figures as JSON."""
    import psutil

    from hf_streamlm.tokenizer import build_tokenizer

    config = make_config(pattern, kind, vocab)
    process = psutil.Process()
    before = process.memory_info().rss
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:  # RSS once a second while training: a bounded trainer's stays flat
        while not done.wait(1.0):
            samples.append(process.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    tok = build_tokenizer(config)
    seconds = time.perf_counter() - start
    done.set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    half = len(samples) // 2
    print(json.dumps({"rss_before_bytes": before, "peak_rss_bytes": peak, "seconds": round(seconds, 1),
                      "vocab": len(tok), "rss_max_first_half": max(samples[:half], default=None),
                      "rss_max_second_half": max(samples[half:], default=None)}))


def memory(args) -> dict:
    results = {"kind": args.kind, "vocab_size": args.vocab, "docs_per_file": args.docs_per_file, "sizes": {}}
    for n in args.sizes:
        files = -(-n // args.docs_per_file) if args.docs_per_file else args.files
        pattern = write_corpus(args.workdir, n, files)
        proc = subprocess.run([sys.executable, __file__, "_memory-child", pattern, args.kind, str(args.vocab)],
                              capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            sys.exit(f"memory child for {n} docs failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        results["sizes"][n] = row
        halves = ""
        if row["rss_max_first_half"] and row["rss_max_second_half"]:
            halves = (f", RSS max in the 1st/2nd half of the run {row['rss_max_first_half'] / 2**20:.0f}/"
                      f"{row['rss_max_second_half'] / 2**20:.0f} MiB")
        print(f"{n:>10,} docs: peak RSS {row['peak_rss_bytes'] / 2**20:7.1f} MiB "
              f"(after imports {row['rss_before_bytes'] / 2**20:6.1f} MiB){halves}, vocab {row['vocab']:,}, "
              f"{row['seconds']:.1f} s", flush=True)
    sizes = sorted(results["sizes"])
    if len(sizes) > 1:
        low, high = results["sizes"][sizes[0]], results["sizes"][sizes[-1]]
        grown = [row["peak_rss_bytes"] - row["rss_before_bytes"] for row in (low, high)]
        growth = grown[1] / max(1, grown[0])
        results["peak_ratio"] = round(high["peak_rss_bytes"] / low["peak_rss_bytes"], 3)
        results["training_growth_ratio"] = round(growth, 3)
        print(f"peak RSS {sizes[-1]:,} / {sizes[0]:,} docs: {results['peak_ratio']:.3f}x "
              f"(growth over the post-import RSS: {results['training_growth_ratio']:.3f}x)")
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_memory-child":
        memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hf_streamlm_bench_tokenizer",
                        help="where the corpora are written (once) and reused")
    common.add_argument("--files", type=int, default=8, help="jsonl files each corpus is split into")
    common.add_argument("--json", default=None, help="also write the results here")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", parents=[common], help="stream vs in-memory training time")
    s.add_argument("--docs", type=int, default=100_000)
    s.add_argument("--kinds", nargs="+", default=["wordpiece", "bpe"], choices=sorted(RECIPES))
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--profile", action="store_true", help="cProfile reading the stream instead of timing")
    m = sub.add_parser("memory", parents=[common], help="peak RSS at each size, fresh process per size")
    m.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    m.add_argument("--kind", default="bpe", choices=sorted(RECIPES))
    m.add_argument("--vocab", type=int, default=50_000)
    m.add_argument("--docs-per-file", type=int, default=12_500,
                   help="split each corpus into files of this many documents (same file size at every corpus size: "
                        "the json reader's buffers grow with the file, not the stream); 0: use --files")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = speed(args) if args.command == "speed" else memory(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
