"""No host-device synchronisation in a micro-step that does not log (issue 15, item 2), counted in the real
training loop: every ``.item()``, ``int()``, ``bool()`` on a tensor is one ``aten._local_scalar_dense`` call,
the read-back that makes the CPU wait for the GPU. On the CPU the same calls are made, so they can be
counted here, without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import DECODER, MLM

GAS = 4  # micro-batches per optimizer step
SYNC_RUN = [
    f"data.gradient_accumulation_steps={GAS}",
    "data.batch_size=2",
    "scheduler.total_steps=3",
    "runtime.log_every_n_steps=3",  # steps 1 and 2 do not log; 3 does
    "runtime.checkpoint.every_n_steps=3",
    "runtime.evaluation.every_n_steps=null",
]
TOP_MODELS = ("DecoderForCausalLM", "MicroBertForMaskedLM")


class ReadBacks(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` calls, except inside ``optimizer.step()``: torch's non-fused CPU
    AdamW reads its step counters with ``.item()``, host tensors on a GPU too (the fused CUDA kernel
    keeps them on the device), so they say nothing about the loop."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.in_optimizer = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.in_optimizer:
            self.count += 1
        return func(*args, **(kwargs or {}))


def read_backs_per_micro_step(args: list[str], tmp_path) -> list[int]:
    """Read-backs between the starts of consecutive training forwards of a real ``train()`` run, and from
    the last one to the end of the step (before the final logging/checkpoint are not separated: the run
    ends there)."""
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from hf_streamlm.config import load_config
    from hf_streamlm.train.loop import train

    config = load_config([*args, *SYNC_RUN, f"runtime.output_dir={tmp_path / 'run'}"])
    counter, marks = ReadBacks(), []

    def on_forward(module, inputs):
        if type(module).__name__ in TOP_MODELS and module.training:
            marks.append(counter.count)

    def enter_optimizer(optimizer, args, kwargs):
        counter.in_optimizer = True

    def leave_optimizer(optimizer, args, kwargs):
        counter.in_optimizer = False

    handles = [register_module_forward_pre_hook(on_forward), register_optimizer_step_pre_hook(enter_optimizer),
               register_optimizer_step_post_hook(leave_optimizer)]
    try:
        with counter:
            train(config)
    finally:
        for handle in handles:
            handle.remove()
    assert len(marks) == 3 * GAS, marks
    return [b - a for a, b in zip(marks, marks[1:])]


@pytest.mark.parametrize("family", ["decoder", "microbert"])
def test_micro_steps_that_do_not_log_read_nothing_back(family, tmp_path):
    # The decoder recipe packs documents (position_ids, document_ids): the document-causal mask path.
    per_interval = read_backs_per_micro_step(DECODER if family == "decoder" else MLM, tmp_path)
    # Interval i runs micro-step i (forward, backward) and the host work up to micro-step i + 1's forward.
    within_steps = [n for i, n in enumerate(per_interval) if (i + 1) % GAS]
    step_ends = [n for i, n in enumerate(per_interval) if (i + 1) % GAS == 0]  # steps 1 and 2: no log, no save
    assert within_steps == [0] * len(within_steps), per_interval
    # Once per optimizer step: the guard's verdict and the stop flag, read back together.
    assert step_ends == [1, 1], per_interval
