"""Small helpers the loop calls: run length, MFU, and the non-finite loss guard."""

from __future__ import annotations

import logging
import math

import torch

from hf_streamlm.config import Config
from hf_streamlm.train.spikes import SpikeWindow

logger = logging.getLogger(__name__)

# Dense (no sparsity) peak TFLOP/s per device for bf16/fp16 tensor-core math, from the vendors'
# data sheets. Matched against torch.cuda.get_device_name() in order; the first hit wins.
PEAK_TFLOPS_16BIT = (
    ("H200", 989.5),
    ("H100 PCIe", 756.0),
    ("H100", 989.5),  # SXM / HBM3
    ("GH200", 989.5),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A6000", 154.8),
    ("4090", 165.2),
    ("3090", 71.0),
    ("V100", 125.0),
)


class NonFiniteError(RuntimeError):
    """Training stopped on a NaN/inf loss or gradient norm; the last good state was saved."""


def total_steps_for(config: Config, tokens_per_step: int, count_epoch_steps) -> int:
    """Optimizer steps of the run: from the token budget, else total_steps, else total_epochs passes
    (``count_epoch_steps()`` reads the stream once to size an epoch)."""
    s = config.scheduler
    if s.total_tokens:
        return math.ceil(s.total_tokens / tokens_per_step)
    if s.total_steps:
        return s.total_steps
    return s.total_epochs * count_epoch_steps()


def peak_flops(config: Config, device: torch.device) -> float | None:
    """Peak FLOP/s of one device for MFU: ``runtime.logging.peak_tflops``, else the table for a known
    GPU at 16-bit precision, else None (CPU, fp32, unknown device: MFU is not logged)."""
    if config.runtime.logging.peak_tflops:
        return config.runtime.logging.peak_tflops * 1e12
    if device.type != "cuda" or config.runtime.precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS_16BIT:
        if key in name:
            return tflops * 1e12
    return None


class NonFiniteGuard:
    """Decides, once per optimizer step, whether the step's loss and gradient norm are finite.

    ``skip``: the update is dropped (weights and optimizer state unchanged), the step is counted;
    after ``max_nonfinite_skips`` skipped steps in a row, or with ``stop``, :meth:`check` says stop.
    All ranks reach the same decision (the flag is summed over processes).

    With ``runtime.spikes``, the step's mean loss and gradient norm travel in the same read-back and a
    :class:`~hf_streamlm.train.spikes.SpikeWindow` (``spike_window``: a checkpoint's) judges them: ``spike`` is then
    what made the step a spike, or None."""

    def __init__(self, config: Config, accelerator, spike_window: dict | None = None):
        self.mode = config.runtime.on_nonfinite
        self.patience = config.runtime.max_nonfinite_skips
        self.fp16 = config.runtime.precision == "fp16"
        # DeepSpeed steps inside backward(), before this guard can veto the update: skip becomes stop.
        if accelerator.distributed_type == "DEEPSPEED" and self.mode == "skip":
            self.patience = 1
        self.accelerator = accelerator
        self.in_a_row = 0
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        self.spikes = SpikeWindow(config.runtime.spikes, spike_window) if config.runtime.spikes.enabled else None
        self.spike: dict | None = None
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=accelerator.device)
        self.micro = 0

    def add_loss(self, loss: torch.Tensor) -> None:
        self.bad_loss |= ~torch.isfinite(loss.detach())
        if self.spikes is not None:  # summed on the device: read back with the verdict, at the step's end
            self.loss_sum += loss.detach().float()
            self.micro += 1

    def check(self, grad_norm: torch.Tensor | float | None) -> bool:
        """True when the optimizer may step. Resets the loss flag for the next step."""
        return self.decide(grad_norm)[0]

    def decide(self, grad_norm: torch.Tensor | float | None, stop_requested: bool = False) -> tuple[bool, bool]:
        """``(update, stop)`` for this optimizer step, the same on every rank: whether the optimizer may step,
        and whether any rank asked to stop (``stop_requested``: a signal arrived on this one).

        The two flags travel in one tensor and are read back once: the one place per optimizer step where
        the host waits for the GPU (a step that logs reads its loss too). Micro-steps read nothing back."""
        bad = self.bad_loss.clone()
        # fp16: an inf gradient norm with a finite loss is the loss scaler's business (it skips the
        # step and lowers the scale), not divergence.
        if grad_norm is not None and not self.fp16:
            bad |= ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device)).reshape(())
        self.bad_loss.zero_()
        if self.spikes is not None:
            return self._decide_with_spikes(bad, grad_norm, stop_requested)
        if self.accelerator.num_processes > 1:
            # Both flags in one integer, summed over the ranks: bad + (world + 1) x stop, so the sum is
            # (bad ranks) + (world + 1) x (stopping ranks) and one scalar read says both.
            world = self.accelerator.num_processes
            code = bad.to(torch.int64) + (world + 1) * int(stop_requested)
            total = int(self.accelerator.reduce(code.reshape(1), reduction="sum"))
            is_bad, stop = total % (world + 1) > 0, total // (world + 1) > 0
        else:
            is_bad, stop = bool(bad), stop_requested
        self.in_a_row = self.in_a_row + 1 if is_bad else 0
        return not is_bad, stop

    def _decide_with_spikes(self, bad: torch.Tensor, grad_norm, stop_requested: bool) -> tuple[bool, bool]:
        """:meth:`decide` with the spike check: (bad ranks, stopping ranks, mean loss, grad norm) summed over the ranks
        in one all-reduce, read back in one copy; every rank then judges the same numbers with the same window."""
        world = self.accelerator.num_processes
        norm = bad.new_zeros((), dtype=torch.float32)
        if grad_norm is not None:
            norm = torch.as_tensor(grad_norm, device=bad.device).reshape(()).float()
        flag = bad.new_zeros((), dtype=torch.float32) + float(stop_requested)  # a scalar operand: no copy to the device
        payload = torch.stack([bad.float(), flag, self.loss_sum / max(self.micro, 1), norm])
        self.loss_sum.zero_()
        self.micro = 0
        if world > 1:
            payload = self.accelerator.reduce(payload, reduction="sum")
        bad_ranks, stopping, loss, norm_sum = payload.tolist()  # the step's one read-back
        is_bad, stop = bad_ranks > 0, stopping > 0
        self.in_a_row = self.in_a_row + 1 if is_bad else 0
        self.spike = None if is_bad else self.spikes.judge(loss / world, None if grad_norm is None else norm_sum / world)
        return not is_bad and self.spike is None, stop

    @property
    def must_stop(self) -> bool:
        return self.in_a_row > 0 and (self.mode == "stop" or self.in_a_row >= self.patience)
