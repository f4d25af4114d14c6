"""A collated batch on its way to the device, with nothing that makes the host wait for the GPU.

The CPU runs ahead of the GPU only while no step reads a device value back (``.item()``, ``int()``,
``bool()`` on a CUDA tensor wait for every kernel queued before them). So what the loop needs to know
about a batch is read here, from the collator's CPU tensors, before the copy:

- the token count (for tokens/s and MFU), a host sum instead of ``int(mask.sum())`` on the device;
- whether the batch has padding at all: the training stream packs full blocks, and an all-ones
  ``attention_mask`` is dropped so that the forward has no mask to inspect (the models would otherwise
  test ``mask.all()`` on the device to give SDPA its mask-free, fastest kernel);
- the copy itself is ``non_blocking``: from the pinned memory the DataLoader hands out on CUDA
  (``pin_memory``), it overlaps with the kernels still running instead of stalling the host.
"""

from __future__ import annotations

import torch

from hf_streamlm.data.collate import batch_to


def host_tokens(mask: torch.Tensor) -> int:
    """Real (non-padding) tokens of a CPU ``attention_mask``, summed by numpy: a host count that issues
    no tensor operation, so it cannot be, or later turn into, a device read-back."""
    return int(mask.numpy().sum())


def to_device(batch: dict, device: torch.device) -> tuple[dict, int]:
    """``batch`` on ``device`` and its token count. A mask without padding is left out (the models then
    take the plain causal or bidirectional pattern, which is what an all-ones mask means)."""
    mask = batch.get("attention_mask")
    tokens = host_tokens(mask) if mask is not None else batch["input_ids"].numel()
    if mask is not None and tokens == mask.numel():
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch_to(batch, device, non_blocking=True), tokens
