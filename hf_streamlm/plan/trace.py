"""One optimizer step of a recipe, traced for its storage peak: on fake tensors (nothing allocated) or for real.

The step is the training loop's: the model ``build_model`` would build (attention kernel, activation
checkpointing, fused loss chunk), a batch from the recipe's own collator at its micro-batch and sequence length,
``min(accumulation, 2)`` forward/backward micro-steps (the second one holds the first one's gradients, as every
micro-step after the first does in a run), then the optimizer step and ``zero_grad``. The storage is counted by
PyTorch's ``MemTracker`` (``FSDPMemTracker`` under FSDP2): every tensor storage alive at each operator, by kind.

Where this PyTorch has no CUDA (the CPU wheel cannot even hold fake CUDA tensors) the trace runs on fake CPU
tensors with the GPU run's dtypes: bf16/fp16 autocast as accelerate applies it (CPU autocast lists), fp32 master
weights, the fused AdamW the loop builds for a GPU. Attention goes through SDPA's fused CPU kernel, which keeps the
output and its log-sum-exp and no ``T x T`` score matrix, as the GPU's flash and memory-efficient kernels do; the
kernels the trace met are recorded (``Trace.attention_kernels``). ``flex_attention`` and ``flash_attention_2``
save the same tensors and are traced as SDPA; attention dropout is traced as 0 (the CPU has no fused SDPA kernel
with dropout; the GPU's apply it inside the kernel, keeping no mask).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode

from hf_streamlm.config import Config

TRACED_KERNELS = ("sdpa", "eager")
"""Attention implementations traced as themselves; the others (flex_attention, flash_attention_2, ...) as sdpa."""

FSDP_CATEGORIES = {"Sharded Param": "weights", "Unsharded Param": "weights", "Buffer": "weights",
                   "Sharded Grad": "gradients", "Unsharded Grad": "gradients", "OptState": "optimizer",
                   "Activation": "activations", "Temp": "activations", "All Gather": "communication",
                   "Reduce Scatter": "communication", "Inputs": "activations"}
"""FSDPMemTracker's kinds of storage -> the plan's breakdown."""

MEM_CATEGORIES = {"Parameter": "weights", "Buffer": "weights", "Gradient": "gradients", "Optstate": "optimizer",
                  "Activation": "activations", "Temp": "activations", "Other": "activations"}
"""MemTracker's kinds of storage -> the plan's breakdown."""

PARTS = ("weights", "gradients", "optimizer", "activations", "logits", "communication")


@dataclass
class StepSpec:
    """What one traced step runs: the recipe's shapes and dtypes, under one engine's layout."""

    engine: str = "single"
    """``single`` (one process, also DDP's per-rank model), ``zero`` (DeepSpeed: the module in 16-bit, no autocast,
    optimizer states counted by the engine's partitioning, not traced) or ``fsdp2`` (``fully_shard`` per block)."""
    precision: str = "bf16"
    """``bf16``, ``fp16`` or ``fp32`` (the run's resolved ``runtime.precision``)."""
    world_size: int = 1
    """Processes the model is sharded over (FSDP2)."""
    reshard_after_forward: bool = True
    """FSDP2's ``fsdp_reshard_after_forward``."""


@dataclass
class Trace:
    """The storage one step held, in bytes, per process."""

    peak: int
    """The largest total at any operator."""
    parts: dict[str, int]
    """The peak's breakdown by :data:`PARTS`."""
    activation_peak: int
    """The largest activations + logits (+ temporaries) at any operator: what a layout whose model states are
    counted separately (ZeRO) adds to them."""
    attention_kernels: list[str] = field(default_factory=list)
    """The attention operators the trace ran (``aten._scaled_dot_product_*``), or ``[]`` where none ran."""
    fake: bool = True
    seconds: float = 0.0


class _Watch(TorchDispatchMode):
    """Records the attention kernels run, and the live storage of the LM head's logits (outputs whose last
    dimension is the vocabulary) for the peak's breakdown."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab = vocab if vocab != hidden else -1  # an ambiguous last dimension counts nothing as logits
        self.kernels: set[str] = set()
        self.logits = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _forget(self, size: int) -> None:
        self.logits -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):  # let DTensor run its local ops first, as MemTracker does
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if "scaled_dot_product" in name or name.startswith("_flash_attention") or "efficient_attention" in name:
            self.kernels.add(func.overloadpacket.__name__)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                storage = t.untyped_storage()
                if storage not in self._seen:
                    size = storage.nbytes()
                    self._seen[storage] = size
                    self.logits += size
                    weakref.finalize(storage, self._forget, size)
        return out


def _tracker_class(base: type[MemTracker]) -> type[MemTracker]:
    class StepTracker(base):
        """``base`` keeping only the step's figures: the peak and its breakdown, the largest activation-side total
        and the logits alive at the peak. The per-module peaks ``base`` updates at every operator (a loop over all
        modules, two thirds of a 1B trace's time) are not kept."""

        watch: _Watch | None = None
        activation_peak = 0
        logits_at_peak = 0
        acts = ("Activation", "Temp", "Other", "Inputs")

        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                live = sum(v for k, v in snap.items() if str(getattr(k, "value", k)) in self.acts)
                self.activation_peak = max(self.activation_peak, live)
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)
                    self.logits_at_peak = self.watch.logits if self.watch is not None else 0

    return StepTracker


def synthetic_batch(config: Config, vocab: int) -> dict:
    """A training batch from the recipe's own collator, as the loop hands it to the model (an all-ones mask left
    out by ``to_device``): ``data.batch_size`` blocks of ``data.sequence_length`` tokens, two packed documents per
    block when ``data.document_masking`` is on."""
    from hf_streamlm.data.collate import CausalCollator, MLMCollator
    from hf_streamlm.train.device_batch import to_device

    d = config.data
    length, half = d.sequence_length, d.sequence_length // 2
    ids = [(7 * i) % (vocab - 8) + 5 for i in range(length)]
    example = {"input_ids": ids}
    if d.document_masking:
        example["position_ids"] = list(range(half)) + list(range(length - half))
        example["document_ids"] = [0] * half + [1] * (length - half)
    if config.model.type == "microbert":
        collate = MLMCollator(mask_token_id=4, vocab_size=vocab, special_ids=[0, 1, 2, 3, 4],
                              mlm_probability=d.mlm_probability, seed=0)
    else:
        collate = CausalCollator()
    batch, _ = to_device(collate([dict(example) for _ in range(d.batch_size)]), torch.device("cpu"))
    return batch


class _Vocab:
    """The tokenizer ``build_model`` asks for: its length and no special ids."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def _model(config: Config, vocab: int) -> torch.nn.Module:
    from hf_streamlm.train.builders import build_model

    m = config.model
    planned, pretrained, dropout = m.attn_implementation, m.pretrained, m.attn_dropout
    if planned not in TRACED_KERNELS:
        m.attn_implementation = "sdpa"
    if m.attn_implementation == "sdpa":
        # The CPU's SDPA has no fused kernel with dropout (it would fall back to the math path and keep the T x T
        # scores); the GPU's flash and memory-efficient kernels apply dropout inside and keep no mask.
        m.attn_dropout = 0.0
    m.pretrained = None  # the shape the section describes (a pretrained model's weights are not needed to trace)
    try:
        return build_model(config, _Vocab(vocab))
    finally:
        m.attn_implementation, m.pretrained, m.attn_dropout = planned, pretrained, dropout


def _materialize(model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    """Give a meta-device model CPU storage (fake under FakeTensorMode), keeping tied parameters tied
    (``to_empty`` cannot swap a meta parameter for a fake one); ``dtype``: the floating parameters' dtype."""
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                if id(p) not in made:
                    made[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="cpu", dtype=dtype or p.dtype),
                                                    requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty_like(b, device="cpu")


def _shard(model: torch.nn.Module, spec: StepSpec, dtype: torch.dtype | None, mesh) -> None:
    """``fully_shard`` in the order accelerate's ``fsdp2_prepare_model`` applies it (``TRANSFORMER_BASED_WRAP``,
    accelerate 1.16): each block of ``_no_split_modules``, bottom-up; the input embedding when it is not tied; the
    tail (final norm, LM head, and the tied embedding) as one unit kept gathered; then the root. Parameters are cast
    to the mixed-precision dtype for compute and reductions (accelerate's ``MixedPrecisionPolicy``)."""
    from accelerate.utils.fsdp_utils import _find_final_norm
    from accelerate.utils.other import get_module_children_bottom_up
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from hf_streamlm.config import ConfigError

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype) if dtype else MixedPrecisionPolicy()
    kwargs = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": spec.reshard_after_forward}
    blocks = tuple({type(m) for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])})
    try:
        for module in get_module_children_bottom_up(model)[:-1]:
            if blocks and isinstance(module, blocks) and not isinstance(module, FSDPModule):
                fully_shard(module, **kwargs)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head is not None and embed.weight is head.weight
        if not tied and not isinstance(embed, FSDPModule):
            fully_shard(embed, **kwargs)
        tail = [m for m in ((_find_final_norm(model), embed, head) if tied else (_find_final_norm(model), head))
                if m is not None and not isinstance(m, FSDPModule)]
        if tail:
            fully_shard(tail, **{**kwargs, "reshard_after_forward": False})
        fully_shard(model, mesh=mesh, mp_policy=policy)
    except (ValueError, TypeError) as err:  # a tied weight that two units would hold (MicroBERT's embeddings unit)
        raise ConfigError(f"FSDP2 as accelerate applies it (fsdp2_prepare_model, TRANSFORMER_BASED_WRAP) refuses "
                          f"this model: {str(err).splitlines()[0]}") from None


@contextlib.contextmanager
def _fake_group(world_size: int):
    """A process group of ``world_size`` ranks whose collectives move nothing (``torch``'s fake backend): this
    process is rank 0 and allocates what rank 0 would."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("plan traces FSDP2 in its own (fake) process group; a process group is already running")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def trace_step(config: Config, vocab: int, spec: StepSpec, fake: bool = True) -> Trace:
    """Trace one optimizer step of ``config`` under ``spec``; ``fake=False`` runs it for real on the CPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from hf_streamlm.train.builders import build_optimizer

    start = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.precision)
    batch = synthetic_batch(config, vocab)
    accumulation = config.data.gradient_accumulation_steps
    micro_steps = min(accumulation, 2)
    group = _fake_group(spec.world_size) if spec.engine == "fsdp2" else contextlib.nullcontext()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with group as mesh, mode:
        torch.manual_seed(0)
        if fake:  # shapes on the meta device (no initialisation to run), then fake storage for them
            with torch.device("meta"):
                model = _model(config, vocab)
            _materialize(model, dtype if spec.engine == "zero" else None)
        else:
            model = _model(config, vocab)
            if spec.engine == "zero" and dtype is not None:
                model.to(dtype)
        model.train()  # under ZeRO in bf16/fp16 the module itself is 16-bit (DeepSpeed's mode), with no autocast
        if spec.engine == "fsdp2":
            _shard(model, spec, dtype, mesh)
        # The loop's optimizer on a GPU (fused AdamW); ZeRO's own optimizer is counted by its partitioning.
        optimizer = None if spec.engine == "zero" else build_optimizer(model, config, torch.device("cuda"))
        if optimizer is not None:  # its states exist from the first step on: create them before the trace
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        autocast = (torch.autocast("cpu", dtype=dtype) if dtype is not None and spec.engine != "zero"
                    else contextlib.nullcontext())
        tracker_cls = _tracker_class(FSDPMemTracker if spec.engine == "fsdp2" else MemTracker)
        if spec.engine == "fsdp2":
            tracker = tracker_cls(model, optimizer)
        else:
            tracker = tracker_cls()
            tracker.track_external(*(x for x in (model, optimizer) if x is not None))
        watch = _Watch(vocab, model.config.hidden_size)
        tracker.watch = watch
        with tracker, watch:
            for micro in range(micro_steps):
                if spec.engine == "fsdp2":  # accelerate's no_sync under FSDP2: gradients reduced at the last one
                    model.set_requires_gradient_sync(micro == micro_steps - 1)
                with autocast:
                    loss = model(**batch).loss / accumulation
                loss.backward()
                del loss
                tracker.reset_mod_stats()  # per-module figures only (the tracker refuses a module run twice)
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
    snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()), {})
    parts = dict.fromkeys(PARTS, 0)
    table = FSDP_CATEGORIES if spec.engine == "fsdp2" else MEM_CATEGORIES
    for kind, size in snapshot.items():
        name = str(getattr(kind, "value", kind))
        if name in table:
            parts[table[name]] += size
    logits = min(tracker.logits_at_peak, parts["activations"])
    parts["logits"], parts["activations"] = logits, parts["activations"] - logits
    peak = sum(parts.values())
    return Trace(peak=peak, parts=parts, activation_peak=tracker.activation_peak,
                 attention_kernels=sorted(watch.kernels), fake=fake, seconds=time.perf_counter() - start)
