"""The FSDP2 part of the GPU check (`bench_gpu.py`): the project's real training loop under
`accelerate launch --config_file accelerate_configs/fsdp2_8gpu.yaml --num_processes 1`, through checkpoint,
exact resume and export.

Why on the GPU machine: Accelerate 1.15 turns its FSDP plugin on only for a GPU-like launch. A CPU launch is
`MULTI_CPU` (accelerate/state.py, `PartialState._prepare_backend`: `DistributedType.MULTI_CPU` only when
`cpu` is set), and `AcceleratorState.__init__` sets `DistributedType.FSDP` only inside its branch for
`MULTI_GPU`/`MULTI_XPU`/`MULTI_NPU`/... (MULTI_CPU is not in that list); `accelerate launch` itself runs the
FSDP launcher only `if args.use_fsdp and not args.cpu` (accelerate/commands/launch.py). One process on one GPU
is enough to run every FSDP2 code path of the loop: `fully_shard` per decoder layer over a mesh of one, DTensor
parameters, Accelerate's sharded `save_state`/`load_state` (distributed checkpoint), the export read back from it.

Four runs of a tiny decoder (quickstart_decoder's shape, untied head like runpod_1b), bf16 on a GPU:
1. uninterrupted: 6 optimizer steps, a checkpoint at steps 3 and 6, export at the end;
2. the same again (GPU only): the device's own repeatability, the noise floor of the comparison;
3. resumed: a new run directory, `runtime.resume=<run 1>/checkpoints/step-3`, trains steps 4-6 and exports;
then the resumed losses are compared with the uninterrupted ones (exact when the device repeats itself
exactly, else within 4x its own run-to-run difference), and both exports load in stock `LlamaForCausalLM`.

`--dry-run` runs the same commands on the CPU with `--cpu` (no FSDP there, see above: the checkpoint then holds
`model.safetensors`, and the row says so), run 2 skipped (the CPU repeats itself exactly).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "accelerate_configs" / "fsdp2_8gpu.yaml"
TOTAL_STEPS, CHECKPOINT_STEP = 6, 3

RUN = [
    "recipe=quickstart_decoder", "model.tie_word_embeddings=false", f"scheduler.total_steps={TOTAL_STEPS}",
    "scheduler.warmup_steps=1", "runtime.log_every_n_steps=1", f"runtime.checkpoint.every_n_steps={CHECKPOINT_STEP}",
    "runtime.checkpoint.max_keep=3", "runtime.evaluation.every_n_steps=null", "runtime.logging.progress_bar=false",
    "runtime.logging.tensorboard=false", "runtime.demo_sentences=[]", "data.shuffle_buffer_size=200",
    "data.batch_size=8", "data.sequence_length=128",
]


@dataclass
class FsdpResult:
    engine: str = ""
    """What wrote the step-3 checkpoint: FSDP2 (a distributed-checkpoint folder) or a plain model file."""
    resumed_steps: list[int] = field(default_factory=list)
    max_loss_delta: float | None = None
    """max |loss| difference, resumed run against the uninterrupted one, over the resumed steps."""
    repeat_loss_delta: float | None = None
    """max |loss| difference between two uninterrupted runs (GPU only): the device's own noise."""
    max_export_delta: float | None = None
    """max |weight| difference between the two exports."""
    stock_load: str = ""
    seconds: float = 0.0
    ok: bool = False
    note: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], out: Path, gpu: bool, log: Path) -> None:
    """One real run of `python -m hf_streamlm.run` under `accelerate launch` with the FSDP2 config."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
               "--num_processes", "1", "--main_process_port", str(free_port())]
    if not gpu:
        command.append("--cpu")
    command += ["-m", "hf_streamlm.run", *RUN, *args, f"runtime.output_dir={out}"]
    started = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=120 if gpu else 600,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)})
    if proc.returncode != 0:
        raise RuntimeError(f"run {out.name} failed (rc {proc.returncode}):\n{log.read_text()[-3000:]}")
    print(f"FSDP2 check: run {out.name} done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def fsdp_check(work: Path, gpu: bool) -> FsdpResult:
    """Train, resume from the step-3 checkpoint, compare, load the exports in stock transformers."""
    started = time.perf_counter()
    try:
        result = run_check(work, gpu)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(error, file=sys.stderr)  # the failed run's log tail
        result = FsdpResult(note=str(error).splitlines()[0])
    result.seconds = round(time.perf_counter() - started, 1)
    return result


def run_check(work: Path, gpu: bool) -> FsdpResult:
    from transformers import LlamaForCausalLM

    from hf_streamlm.config import load_config
    from hf_streamlm.tokenizer.train import build_tokenizer
    from hf_streamlm.train.fsdp import SHARDED_DIR, is_fsdp_checkpoint

    result = FsdpResult()
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        build_tokenizer(load_config(["recipe=quickstart_decoder", "tokenizer.vocab_size=800",
                                     "tokenizer.train_samples=300"])).save_pretrained(tokenizer)
    common = [f"tokenizer.path={tokenizer}", f"runtime.precision={'bf16' if gpu else 'fp32'}"]
    first, again, resumed = work / "uninterrupted", work / "repeat", work / "resumed"
    launch(common, first, gpu, work / "uninterrupted.log")
    checkpoint = first / "checkpoints" / f"step-{CHECKPOINT_STEP}"
    if is_fsdp_checkpoint(checkpoint):
        result.engine = f"FSDP2 ({len(list((checkpoint / SHARDED_DIR).glob('*.distcp')))} shard files)"
    else:
        result.engine = "no FSDP (plain model.safetensors): Accelerate runs a CPU launch as MULTI_CPU/NO"
    if gpu:
        launch(common, again, gpu, work / "repeat.log")
        result.repeat_loss_delta = max(abs(a - b) for a, b in zip(losses(first).values(), losses(again).values()))
    launch([*common, f"runtime.resume={checkpoint}"], resumed, gpu, work / "resumed.log")

    reference, after = losses(first), losses(resumed)
    result.resumed_steps = sorted(s for s in after if s > CHECKPOINT_STEP)
    if result.resumed_steps != list(range(CHECKPOINT_STEP + 1, TOTAL_STEPS + 1)):
        result.note = f"the resumed run logged steps {sorted(after)}, not {CHECKPOINT_STEP + 1}..{TOTAL_STEPS}"
        return result
    result.max_loss_delta = max(abs(reference[s] - after[s]) for s in result.resumed_steps)

    exports = []
    for run in (first, resumed):
        model, info = LlamaForCausalLM.from_pretrained(run / "export", output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"]:
            result.stock_load = f"{run.name}: missing {info['missing_keys']}, unexpected {info['unexpected_keys']}"
            return result
        exports.append(model.state_dict())
    ids = torch.arange(3, 35).unsqueeze(0)
    with torch.no_grad():
        finite = bool(torch.isfinite(model(input_ids=ids).logits).all())
    result.stock_load = f"LlamaForCausalLM, all keys, logits {'finite' if finite else 'NOT FINITE'}"
    result.max_export_delta = max((exports[0][k].float() - exports[1][k].float()).abs().max().item() for k in exports[0])

    noise = result.repeat_loss_delta or 0.0
    fsdp_ok = result.engine.startswith("FSDP2") or not gpu
    result.ok = fsdp_ok and finite and result.max_loss_delta <= 4 * noise
    if not fsdp_ok:
        result.note = "the GPU run did not write an FSDP checkpoint"
    elif result.max_loss_delta > 4 * noise:
        result.note = f"resumed losses differ by {result.max_loss_delta:.3g} (device noise {noise:.3g})"
    return result


def print_result(result: FsdpResult) -> None:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3g}"

    print("\n| FSDP2 check | engine | steps resumed | max abs loss delta (resumed, repeat) | max abs export delta "
          "| stock load | seconds | note |")
    print("|---|---|---|---|---|---|---|---|")
    steps = f"{result.resumed_steps[0]}-{result.resumed_steps[-1]}" if result.resumed_steps else "-"
    print(f"| {'pass' if result.ok else 'FAIL'} | {result.engine} | {steps} | {fmt(result.max_loss_delta)}, "
          f"{fmt(result.repeat_loss_delta)} | {fmt(result.max_export_delta)} | {result.stock_load or '-'} "
          f"| {result.seconds} | {result.note} |")
