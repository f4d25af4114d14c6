"""FSDP2 (``torch.distributed.fsdp.fully_shard``) under ``accelerate launch --config_file
accelerate_configs/fsdp2_8gpu.yaml``: the second sharded engine, beside DeepSpeed ZeRO.

Accelerate's ``save_state`` writes the model of an FSDP run as its ``fsdp_state_dict_type`` says: a
distributed checkpoint folder (``pytorch_model_fsdp_0/``, one file per rank, ``SHARDED_STATE_DICT``) or
one full ``pytorch_model_fsdp.bin`` (``FULL_STATE_DICT``), never ``model.safetensors``. The export reads
the full weights back from there, on one process and without a process group, as it does for ZeRO
shards: at the end of training the parameters are DTensor shards spread over the ranks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

SHARDED_DIR = "pytorch_model_fsdp_0"  # accelerate's FSDP_MODEL_NAME + "_0" (the first prepared model)
FULL_FILE = "pytorch_model_fsdp.bin"


def is_fsdp_checkpoint(path: Path) -> bool:
    """A checkpoint written by ``accelerator.save_state`` under FSDP (sharded or full model file)."""
    path = Path(path)
    return (path / SHARDED_DIR / ".metadata").is_file() or (path / FULL_FILE).is_file()


def fsdp_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full weights of an FSDP checkpoint on the CPU, for any number of ranks that wrote it:
    torch's ``dcp_to_torch_save`` assembles the shards offline (no process group)."""
    path = Path(path)
    if (path / FULL_FILE).is_file():
        return torch.load(path / FULL_FILE, map_location="cpu", weights_only=True)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "model.pt"
        dcp_to_torch_save(path / SHARDED_DIR, whole)
        return torch.load(whole, map_location="cpu", weights_only=True)["model"]  # accelerate saves {"model": ...}
