"""The GPUs ``plan`` knows: memory, dense 16-bit peak, and the MFU that turns FLOPs into time.

The MFU is a measured one where a calibration file gives it (``plan_calibration.json``, written from the GPU
check's results), else an anchor: a published figure for a ~1B decoder at sequence 2048 on that GPU, listed in
docs/performance.md#mfu-anchors and labelled as an anchor wherever it is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hf_streamlm.config import ConfigError


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: int
    """Bytes, as ``nvidia-smi --query-gpu=memory.total`` reports them."""
    peak_flops: float
    """Dense (no sparsity) bf16/fp16 tensor-core FLOP/s, from the vendor's data sheet (as the loop's MFU uses)."""


MIB = 2**20
GPUS = {
    "h100-80gb": Gpu("NVIDIA H100 80GB HBM3 (SXM)", 81_559 * MIB, 989.5e12),
    "h200-141gb": Gpu("NVIDIA H200 141GB", 143_771 * MIB, 989.5e12),
    "a100-80gb": Gpu("NVIDIA A100 80GB (SXM)", 81_920 * MIB, 312e12),
    "a100-40gb": Gpu("NVIDIA A100 40GB (SXM)", 40_960 * MIB, 312e12),
    "l40s-48gb": Gpu("NVIDIA L40S 48GB", 46_068 * MIB, 362.05e12),
}

RESERVED = 1 * 2**30
"""Bytes per process not available to tensors: the CUDA context, cuBLAS workspaces, NCCL buffers. An assumption
(typically 0.5-1 GiB), not a measurement."""

ANCHOR_SOURCE = ("llm-foundry scripts/train/benchmarking/README.md, MPT-1b (1.3B), sequence 2048, 8 GPUs, "
                 "FSDP FULL_SHARD, bf16, flash attention, no activation checkpointing")
MFU_ANCHORS = {
    "h100-80gb": (0.4182, "MPT-1b on 8 x H100 80GB, micro-batch 14"),
    "h200-141gb": (0.4182, "the H100 row: same compute die, no published 1B row for H200"),
    "a100-80gb": (0.5986, "MPT-1b on 8 x A100 80GB, micro-batch 14"),
    "a100-40gb": (0.5623, "MPT-1b on 8 x A100 40GB, micro-batch 8"),
    "l40s-48gb": (0.4182, "no published row for L40S: the lowest anchor (H100's)"),
}
"""GPU -> (MFU, what it is). Published figures, not measured by this project: see docs/performance.md#mfu-anchors."""

CALIBRATION_FILE = "plan_calibration.json"
"""Read from the current directory unless ``--calibration`` names another file."""


@dataclass(frozen=True)
class Calibration:
    mfu: float
    source: str
    memory_ratio: float | None = None
    """Measured peak (``torch.cuda.max_memory_reserved``) / the traced storage peak of the same step, where the
    GPU check recorded both; multiplies the traced peaks."""


def gpu(name: str) -> Gpu:
    if name not in GPUS:
        raise ConfigError(f"--gpu '{name}' is not known; choose one of {', '.join(GPUS)}")
    return GPUS[name]


def read_calibration(path: str | Path | None, gpu_name: str) -> Calibration | None:
    """The measured MFU (and memory ratio) for ``gpu_name`` from a calibration file, or None when there is no
    file (``path`` None: ``plan_calibration.json`` here, if present) or it has no entry for that GPU.

    The file: ``{"gpus": {"h100-80gb": {"mfu": 0.47, "memory_ratio": 1.06, "source": "bench_gpu.py, ..."}}}``.
    """
    file = Path(path) if path is not None else Path(CALIBRATION_FILE)
    if not file.is_file():
        if path is not None:
            raise ConfigError(f"--calibration {file}: no such file")
        return None
    try:
        entry = (json.loads(file.read_text()).get("gpus") or {}).get(gpu_name)
    except (json.JSONDecodeError, AttributeError) as err:
        raise ConfigError(f"calibration file {file} is not the expected JSON ({{\"gpus\": {{NAME: {{\"mfu\": ...}}}}}}): "
                          f"{err}") from None
    if entry is None:
        return None
    mfu, ratio = entry.get("mfu"), entry.get("memory_ratio")
    if not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        raise ConfigError(f"calibration file {file}: gpus.{gpu_name}.mfu must be a number in (0, 1], got {mfu!r}")
    if ratio is not None and (not isinstance(ratio, (int, float)) or ratio <= 0):
        raise ConfigError(f"calibration file {file}: gpus.{gpu_name}.memory_ratio must be a positive number")
    return Calibration(float(mfu), str(entry.get("source") or file), None if ratio is None else float(ratio))
