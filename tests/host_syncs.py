"""Counting the operations that make the host wait for a CUDA GPU, on any device (issue 26, point 2).

On a GPU the host runs ahead, queueing kernels, until an operation needs a value computed there: then it waits
for every kernel queued before. These are the operators that do so (PyTorch's ``torch.cuda.set_sync_debug_mode``
flags the same family; the list is from ATen's CUDA kernels, where each calls ``cudaStreamSynchronize`` or a
synchronous copy):

- ``_local_scalar_dense``: ``.item()``, ``int()``, ``float()``, ``bool()`` of a tensor; and ``Tensor.tolist``,
  which copies to the host without dispatching an operator (counted by wrapping the method);
- ``is_nonzero``, ``equal``, ``allclose``: a Python bool out of tensors;
- ``nonzero`` (and ``argwhere``, one-argument ``where``, which call it), ``masked_select``: an output whose size
  is data-dependent is sized on the host;
- ``index``/``index_put`` with a boolean (or uint8) index: ``x[mask]``, ``x[mask] = v`` run ``nonzero`` inside;
- ``repeat_interleave`` with tensor repeats and no ``output_size``: the total is summed on the host;
- ``unique`` (every variant), ``bincount``, ``histc``: sized from the data;
- ``_linalg_check_errors``: the ``info`` codes of ``torch.linalg`` factorisations read back;
- a copy from the GPU to the host (``.cpu()``, ``.to("cpu")``, ``copy_`` into a CPU tensor) without
  ``non_blocking`` (never seen on a CPU-only machine, where nothing is on a device).

On the CPU the same operators are called by the same code, so a :class:`Syncs` mode active around a training run
counts, without a GPU, the read-backs that run would make on one. Only operators called from Python are seen
(a kernel's own internal calls are not dispatched again): that is why the ones that sync *inside* (``index``
with a mask, ``repeat_interleave``) are listed by name and not found through the ``nonzero`` they call.

Run as a script under ``accelerate launch`` (``python -m accelerate.commands.launch ... -m tests.host_syncs OUT
MICRO_BATCHES FAMILY ARGS...``), each rank counts its own training run and writes
``OUT/syncs-<family>-rank<r>.json``. One run per launch: a second process group in the same processes would
join torchrun's agent store again, which is not made for it.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
ALWAYS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.allclose.default,
    aten.nonzero.default,
    aten.nonzero.out,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
    aten.bincount.default,
    aten.histc.default,
    aten._linalg_check_errors.default,
}
BOOLEAN_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
REPEATS = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
COPIES = {aten._to_copy.default, aten.copy_.default}


def syncs(func, args, kwargs) -> bool:
    """Whether calling ``func`` on these arguments waits for the GPU when they live there."""
    if func in ALWAYS:
        return True
    if func in BOOLEAN_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if func in REPEATS:
        return kwargs.get("output_size") is None
    if func in COPIES:
        source = args[1] if func is aten.copy_.default else args[0]
        target = args[0].device if func is aten.copy_.default else kwargs.get("device", source.device)
        return source.device.type not in ("cpu", "meta") and torch.device(target).type == "cpu" and not kwargs.get(
            "non_blocking", False)
    return False


class Syncs(TorchDispatchMode):
    """Counts the calls that would sync on CUDA (:func:`syncs`), by operator, except while ``paused`` (inside
    ``optimizer.step()``: torch's non-fused CPU AdamW reads its step counters with ``.item()``, host tensors on
    a GPU too, and the fused CUDA kernel keeps them on the device; or inside a stand-in kernel)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.by_op: Counter[str] = Counter()
        self.paused = False

    def __enter__(self):
        # `Tensor.tolist` reads a device tensor back without dispatching an operator (it copies to the host in
        # C++): counted by wrapping the method while the mode is on. A host-side tensor is read with `.numpy()`,
        # which a CUDA tensor refuses, so nothing that could be on the device escapes the count that way.
        self.tolist, counter = torch.Tensor.tolist, self

        def counted_tolist(tensor):
            if not counter.paused:
                counter.count += 1
                counter.by_op["Tensor.tolist"] += 1
            return counter.tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and syncs(func, args, kwargs):
            self.count += 1
            self.by_op[str(func)] += 1
        return func(*args, **kwargs)


TOP_MODELS = ("DecoderForCausalLM", "MicroBertForMaskedLM", "ModernMicroBertForMaskedLM")


def syncs_per_micro_step(args: list[str], micro_batches: int) -> tuple[list[int], dict[str, int]]:
    """Syncs between the starts of consecutive training forwards of a real ``train()`` run (``args``: its
    command line): interval i holds micro-step i and the host work up to the next forward (at a step's end:
    the optimizer step, and logging/eval/checkpoint when due). Also the operators counted, over the run."""
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from hf_streamlm.config import load_config
    from hf_streamlm.train.loop import train

    config = load_config(args)
    counter, marks = Syncs(), []

    def on_forward(module, inputs):
        if type(module).__name__ in TOP_MODELS and module.training:
            marks.append(counter.count)

    def enter_optimizer(optimizer, args, kwargs):
        counter.paused = True

    def leave_optimizer(optimizer, args, kwargs):
        counter.paused = False

    handles = [register_module_forward_pre_hook(on_forward), register_optimizer_step_pre_hook(enter_optimizer),
               register_optimizer_step_post_hook(leave_optimizer)]
    try:
        with counter:
            train(config)
    finally:
        for handle in handles:
            handle.remove()
    assert len(marks) == micro_batches, marks
    return [b - a for a, b in zip(marks, marks[1:])], dict(counter.by_op)


if __name__ == "__main__":  # under accelerate launch: OUT MICRO_BATCHES FAMILY ARGS...
    out, micro_batches, family, *run_args = sys.argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    intervals, by_op = syncs_per_micro_step(run_args, int(micro_batches))
    Path(out, f"syncs-{family}-rank{rank}.json").write_text(json.dumps({"intervals": intervals, "by_op": by_op}))
