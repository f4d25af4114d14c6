"""The GPU check: the `runpod_1b` decoder shape on one GPU, bf16, sequence 2048, packed documents, in one command.

    python benchmarks/bench_gpu.py                       # on a GPU: the table, in a few minutes
    python benchmarks/bench_gpu.py --json gpu.json       # the table and the raw figures
    python benchmarks/bench_gpu.py --dry-run             # a tiny shape on the CPU (CI runs this)
    python benchmarks/bench_gpu.py --fsdp only           # only the FSDP2 check (benchmarks/gpu_fsdp.py)

Each variant trains the model of `recipe=runpod_1b` (1.11B parameters, the recipe's vocabulary) with the loop's
own pieces (`build_model`'s config, `build_optimizer`: fused AdamW on CUDA, bf16 autocast as `runtime.precision:
bf16`) on synthetic packed rows: FineWeb-sized documents (~850 tokens on average) whose `position_ids` restart and
whose `document_ids` keep attention inside each document, as `data.document_masking: true` makes them. Variants
cross the attention implementation (`model.attn_implementation`), document masking on/off and `torch.compile`
on/off; two more rows take full logits instead of the fused loss, and Muon instead of AdamW
(`optimizer.algorithm: muon`). The micro-batch is the largest of --batch-sizes that fits (found once, on the first
variant); the flash rows train at the recipe's own micro-batch (`data.batch_size`, 2 for `runpod_1b`) with document
masking, where transformers' own flash path used to run the dense kernel and let documents attend to each other.
The packed rows carry what the training collator emits for them (`hf_streamlm.data.collate.varlen_kwargs`: the
segments of the flattened batch for the flash kernels' variable-length entry point).

One table row per variant: tokens/s, MFU (against --peak-tflops, default the device's dense 16-bit peak: 989.5
for H100 SXM and H200), peak memory, the share of time waiting for the next batch (host -> device copy of pinned
memory, `non_blocking`), the attention kernel the profiler saw take the most time in one step, and for the flash
rows the flash-attn entry points transformers called in that step (`varlen` x layers: document masking reached the
kernel).

Then the FSDP2 check (`benchmarks/gpu_fsdp.py`, `--fsdp on|off|only`): the real training loop under `accelerate
launch` with `accelerate_configs/fsdp2_8gpu.yaml` on one process, trained, resumed from a checkpoint, compared with
the uninterrupted run, exported and loaded in stock `LlamaForCausalLM`; one more table row, pass or FAIL. The exit
status is 1 when it fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_streamlm.config import load_config  # noqa: E402
from hf_streamlm.data.collate import batch_to, varlen_kwargs  # noqa: E402
from hf_streamlm.train.builders import build_optimizer, estimate, hf_model_config  # noqa: E402
from hf_streamlm.train.monitor import PEAK_TFLOPS_16BIT  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_fsdp import fsdp_check, print_result  # noqa: E402

MEAN_DOCUMENT_TOKENS = 850
"""FineWeb's ~3.4 KB documents at ~4 bytes per byte-level BPE token."""

ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn|flex|sdpa|scaled_dot_product", re.I)


@dataclass
class Variant:
    attention: str
    documents: bool
    compile: bool
    full_logits: bool = False  # model.loss_chunk_size=0: the (batch, seq, vocab) logits, then the loss
    muon: bool = False  # optimizer.algorithm=muon: Muon for the blocks' matrices, AdamW for the rest
    recipe_batch: bool = False  # at the recipe's data.batch_size, not the largest that fits

    @property
    def name(self) -> str:
        name = f"{self.attention} docs={'on' if self.documents else 'off'} compile={'on' if self.compile else 'off'}"
        return name + (" logits=full" if self.full_logits else "") + (" optimizer=muon" if self.muon else "")


@dataclass
class Row:
    variant: str
    batch_size: int
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    data_wait_pct: float | None = None
    kernel: str = ""
    entry_points: str = ""  # flash rows: the flash-attn functions transformers called in one step, with counts
    note: str = ""


def variants(device: torch.device) -> list[Variant]:
    out = [
        Variant("sdpa", documents=False, compile=False),  # plain causal blocks: no mask, SDPA's flash kernel
        Variant("sdpa", documents=True, compile=False),  # documents as a dense boolean mask
        Variant("flex_attention", documents=True, compile=False),  # documents as a block mask
        Variant("sdpa", documents=False, compile=True),
        Variant("flex_attention", documents=True, compile=True),
        Variant("sdpa", documents=True, compile=False, full_logits=True),  # what the fused loss saves
        Variant("sdpa", documents=True, compile=False, muon=True),  # what Muon's Newton-Schulz steps cost
    ]
    if device.type == "cuda":
        from transformers.utils import is_flash_attn_2_available

        from transformers.utils import is_flash_attn_3_available

        if is_flash_attn_2_available():
            out.append(Variant("flash_attention_2", documents=True, compile=False, recipe_batch=True))
        if is_flash_attn_3_available():
            out.append(Variant("flash_attention_3", documents=True, compile=False, recipe_batch=True))
    return out


@contextlib.contextmanager
def flash_entry_points():
    """Count the calls of the flash-attn functions transformers loaded (`_flash_fn`: dense, `_flash_varlen_fn`: the
    segments of a flattened batch) while the block runs; yields the Counter. Nothing is counted until a flash
    forward has loaded them (the warmup steps do)."""
    from collections import Counter

    import transformers.modeling_flash_attention_utils as flash_utils

    calls: Counter = Counter()
    originals = {"dense": flash_utils._flash_fn, "varlen": flash_utils._flash_varlen_fn}

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return call

    flash_utils._flash_fn = counted("dense", originals["dense"]) if originals["dense"] else None
    flash_utils._flash_varlen_fn = counted("varlen", originals["varlen"]) if originals["varlen"] else None
    try:
        yield calls
    finally:
        flash_utils._flash_fn, flash_utils._flash_varlen_fn = originals["dense"], originals["varlen"]


def packed_rows(batch_size: int, length: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """One batch of packed rows: documents of exponentially distributed length (mean MEAN_DOCUMENT_TOKENS)."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.empty(batch_size, length, dtype=torch.long)
    documents = torch.empty(batch_size, length, dtype=torch.long)
    for row in range(batch_size):
        start, document = 0, 0
        while start < length:
            size = 1 + int(torch.empty(1).exponential_(1 / MEAN_DOCUMENT_TOKENS, generator=generator).item())
            end = min(length, start + size)
            positions[row, start:end] = torch.arange(end - start)
            documents[row, start:end] = document
            start, document = end, document + 1
    input_ids = torch.randint(3, vocab, (batch_size, length), generator=generator)
    segments = varlen_kwargs(np.ones((batch_size, length), dtype=np.int64), documents.numpy())
    return {"input_ids": input_ids, "labels": input_ids, "position_ids": positions, "document_ids": documents,
            **segments}


def kernel_seen(prof) -> str:
    """The attention-looking kernel (or CPU op, without a GPU) with the most self time in the profiled step."""
    best, best_time = "", -1.0
    for event in prof.key_averages():
        if not ATTENTION_KERNEL.search(event.key) or "backward" in event.key.lower():
            continue
        spent = getattr(event, "self_device_time_total", 0) or 0
        spent = spent or event.self_cpu_time_total
        if spent > best_time:
            best, best_time = event.key, spent
    return best[:80]


def run_variant(variant: Variant, config, vocab: int, batch_size: int, args, device: torch.device) -> Row:
    from transformers import AutoModelForCausalLM

    row = Row(variant.name, batch_size)
    if device.type == "cpu" and variant.attention == "flex_attention":
        row.note = "needs a GPU (no FlexAttention backward on the CPU)"
        return row
    torch.manual_seed(0)
    config.model.attn_implementation = variant.attention
    model_config = replace(config.model, loss_chunk_size=0) if variant.full_logits else config.model
    model = AutoModelForCausalLM.from_config(hf_model_config(model_config, vocab)).to(device).train()
    model.set_attn_implementation(variant.attention)
    algorithm = "muon" if variant.muon else config.optimizer.algorithm
    optimizer = build_optimizer(model, replace(config, optimizer=replace(config.optimizer, algorithm=algorithm)), device)
    forward = torch.compile(model, backend=args.compile_backend) if variant.compile else model
    length = config.data.sequence_length
    batches = [packed_rows(batch_size, length, vocab, seed) for seed in range(4)]
    if not variant.documents:  # the same tokens, one causal block per row
        batches = [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batches]
    if device.type == "cuda":
        batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def step(i: int) -> float:
        """One optimizer step; returns the seconds spent getting the batch onto the device."""
        waited = time.perf_counter()
        batch = batch_to(batches[i % len(batches)], device, non_blocking=True)
        waited = time.perf_counter() - waited
        with autocast:
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return waited

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(args.warmup):
        step(i)
    synchronize()
    start, waited = time.perf_counter(), 0.0
    for i in range(args.steps):
        waited += step(i)
    synchronize()
    elapsed = time.perf_counter() - start
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof, flash_entry_points() as entry_points:
        step(0)
        synchronize()
    row.entry_points = ", ".join(f"{name} x{n}" for name, n in sorted(entry_points.items()))

    tokens_per_s = args.steps * batch_size * length / elapsed
    row.tokens_per_s = round(tokens_per_s, 1)
    flops_per_token = estimate(config.model, vocab, length, batch_size)["flops_per_token"]
    if args.peak_tflops:
        row.mfu = round(flops_per_token * tokens_per_s / (args.peak_tflops * 1e12), 4)
    if device.type == "cuda":
        row.peak_memory_gib = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    row.data_wait_pct = round(100 * waited / elapsed, 3)
    row.kernel = kernel_seen(prof)
    return row  # the model, its optimizer and their memory go with this frame; the caller empties the CUDA cache


def largest_batch(variant: Variant, config, vocab: int, args, device: torch.device) -> tuple[int, Row]:
    """The first batch size of --batch-sizes whose step fits, with that variant's row."""
    for batch_size in args.batch_sizes:
        try:
            return batch_size, run_variant(variant, config, vocab, batch_size, args, device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"batch {batch_size}: out of memory", file=sys.stderr)
    raise SystemExit("bench_gpu: not even the smallest --batch-sizes fits")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU, fp32, a few steps")
    parser.add_argument("--recipe", default="runpod_1b", help="recipe whose model and sequence length are trained")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 12, 8, 6, 4, 2, 1],
                        help="micro-batch sizes to try, largest first")
    parser.add_argument("--warmup", type=int, default=None, help="steps before timing (default 8; dry run 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; dry run 2)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak dense 16-bit TFLOP/s of the device for MFU (default: from the device name)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; dry run aot_eager)")
    parser.add_argument("--only", nargs="*", default=None, help="run only the variants whose name contains one of these")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the table: a variant that would end past it (by the longest one so far) "
                             "is skipped, with a note, so the whole check fits one lease")
    parser.add_argument("--fsdp", choices=["on", "off", "only"], default="on",
                        help="the FSDP2 checkpoint/resume/export check after the table (on), not at all, or alone")
    parser.add_argument("--fsdp-dir", type=Path, default=None,
                        help="where the FSDP2 check's runs go (default: a temporary folder, removed after)")
    args = parser.parse_args(argv)

    overrides = [f"recipe={args.recipe}"]
    if args.dry_run:
        device = torch.device("cpu")
        overrides += ["model.preset=null", "model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
                      "model.num_key_value_heads=4", "model.intermediate_size=128",
                      "model.max_position_embeddings=128", "data.sequence_length=128"]
        args.batch_sizes = [2]
        args.warmup = 1 if args.warmup is None else args.warmup
        args.steps = 2 if args.steps is None else args.steps
        args.compile_backend = args.compile_backend or "aot_eager"
        args.bf16 = False
        vocab = 512
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu: no CUDA device; use --dry-run for the CPU check")
        device = torch.device("cuda")
        args.warmup = 8 if args.warmup is None else args.warmup
        args.steps = 20 if args.steps is None else args.steps
        args.compile_backend = args.compile_backend or "inductor"
        args.bf16 = True
        if args.peak_tflops is None:
            name = torch.cuda.get_device_name(device)
            args.peak_tflops = next((tflops for key, tflops in PEAK_TFLOPS_16BIT if key in name), None)
    config = load_config(overrides)
    if not args.dry_run:
        vocab = config.tokenizer.vocab_size
    selected = [v for v in variants(device) if not args.only or any(o in v.name for o in args.only)]
    if args.fsdp == "only":
        selected = []

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def save(rows: list[Row], fsdp) -> None:
        if args.json:
            args.json.write_text(json.dumps({"device": device_name, "rows": [asdict(r) for r in rows],
                                             "fsdp": asdict(fsdp) if fsdp else None}, indent=1))

    started = time.perf_counter()
    rows: list[Row] = []
    batch_size = None
    longest = 0.0  # the longest a variant has taken so far: the estimate for the next one
    for variant in selected:
        elapsed = time.perf_counter() - started
        if args.time_budget and elapsed + longest > args.time_budget:
            rows.append(Row(variant.name, batch_size or 0, note=f"skipped: --time-budget {args.time_budget:.0f} s"))
            continue
        if variant.recipe_batch:
            try:
                row = run_variant(variant, config, vocab, config.data.batch_size, args, device)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                row = Row(variant.name, config.data.batch_size, note="out of memory at the recipe's micro-batch")
        elif batch_size is None and not (device.type == "cpu" and variant.attention == "flex_attention"):
            batch_size, row = largest_batch(variant, config, vocab, args, device)
        else:
            try:
                row = run_variant(variant, config, vocab, batch_size or args.batch_sizes[-1], args, device)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                row = Row(variant.name, batch_size or 0, note="out of memory at this batch size")
        rows.append(row)
        save(rows, None)  # row by row: a check stopped by its lease keeps what it measured
        longest = max(longest, time.perf_counter() - started - elapsed)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{row.variant}: {row.tokens_per_s} tokens/s {row.note}", file=sys.stderr, flush=True)

    if rows:
        print_table(rows, device_name, config, args, time.perf_counter() - started)
    fsdp = None
    if args.fsdp != "off":
        with tempfile.TemporaryDirectory(prefix="bench-gpu-fsdp-") as tmp:
            fsdp = fsdp_check(args.fsdp_dir or Path(tmp), gpu=device.type == "cuda")
        print_result(fsdp)
        save(rows, fsdp)
    return 0 if fsdp is None or fsdp.ok else 1


def print_table(rows: list[Row], device_name: str, config, args, seconds: float) -> None:
    print(f"\n{device_name}, recipe={args.recipe}, sequence {config.data.sequence_length}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.steps} timed steps after {args.warmup}, "
          f"peak {args.peak_tflops or '-'} TFLOP/s, {seconds:.0f} s in all\n")
    print("| variant | micro-batch | tokens/s | MFU | peak memory (GiB) | data wait % | attention kernel | flash entry "
          "points | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        mfu = f"{100 * row.mfu:.1f}%" if row.mfu is not None else "-"
        cells = [row.variant, row.batch_size, row.tokens_per_s or "-", mfu, row.peak_memory_gib or "-",
                 row.data_wait_pct if row.data_wait_pct is not None else "-", f"`{row.kernel}`" if row.kernel else "-",
                 row.entry_points or "-", row.note]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
