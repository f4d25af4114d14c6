"""The process layout an accelerate config asks for, and the per-rank model states of the engines that shard
them the way they partition.

- one process / DDP: every rank holds everything; DDP's reducer adds its gradient buckets, a second copy of every
  gradient (accelerate leaves ``gradient_as_bucket_view`` at False).
- FSDP2: traced as it runs (``fully_shard`` per block in a fake process group of the run's size: see
  :mod:`hf_streamlm.plan.trace`), nothing computed here.
- DeepSpeed ZeRO-2/3 (+ offload): the model states by DeepSpeed's own partitioning rules, the formulas of its
  ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs`` (16-bit parameters whole
  (ZeRO-2) or 1/N (ZeRO-3) plus the largest layer gathered; 16- and 32-bit gradients, fp32 master weights and the
  two Adam moments 1/N; offloaded parts in host memory), plus the gradient-reduction bucket DeepSpeed allocates,
  added to the traced activations of the 16-bit module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hf_streamlm.config import Config, ConfigError

ENGINES = {"NO": "single", "MULTI_GPU": "ddp", "DEEPSPEED": "zero", "FSDP": "fsdp2"}
"""accelerate's ``distributed_type`` -> the plan's engine."""


@dataclass
class Layout:
    """How the processes hold the model: what one accelerate config (or none) asks for."""

    engine: str
    """``single``, ``ddp``, ``zero`` or ``fsdp2``."""
    processes: int
    """GPUs (one process each)."""
    mixed_precision: str = "no"
    """The config's ``mixed_precision`` (``no``, ``bf16``, ``fp16``); the recipe's ``runtime.precision`` wins unless
    it is ``auto``."""
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    reshard_after_forward: bool = True
    compiled: bool = False
    """The config's ``dynamo_config`` compiles the model (not traced: the eager step is)."""
    source: str = "no accelerate config"

    @property
    def label(self) -> str:
        if self.engine == "zero":
            offload = " + offload" if self.offload_optimizer or self.offload_params else ""
            return f"DeepSpeed ZeRO-{self.zero_stage}{offload}"
        return {"single": "one process", "ddp": "DDP", "fsdp2": "FSDP2"}[self.engine]

    def precision(self, config: Config) -> str:
        """The run's precision: the recipe's, or for ``auto`` the launcher's (as the loop resolves it)."""
        if config.runtime.precision != "auto":
            return config.runtime.precision
        return {"no": "fp32"}.get(self.mixed_precision, self.mixed_precision)


def read_layout(path: str | Path | None, gpus: int | None = None) -> Layout:
    """The :class:`Layout` of an accelerate config file (``--config``), ``gpus`` overriding its process count;
    without a file, one process (``gpus`` 1 or None) or DDP over ``gpus``, with accelerate's default
    ``mixed_precision: no`` (it decides only for a recipe whose ``runtime.precision`` is ``auto``)."""
    if path is None:
        n = gpus or 1
        return Layout("ddp" if n > 1 else "single", n, "no")
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file (the shipped ones are in accelerate_configs/)")
    raw = yaml.safe_load(path.read_text()) or {}
    kind = str(raw.get("distributed_type", "NO"))
    if kind not in ENGINES:
        raise ConfigError(f"--config {path}: distributed_type '{kind}' is not planned; plan knows "
                          f"{', '.join(ENGINES)}")
    n = gpus or int(raw.get("num_processes", 1) or 1)
    engine = ENGINES[kind]
    if engine in ("ddp", "single"):
        engine = "ddp" if n > 1 else "single"
    layout = Layout(engine, n, str(raw.get("mixed_precision") or "no"), source=str(path))
    layout.compiled = str((raw.get("dynamo_config") or {}).get("dynamo_backend", "NO")).upper() != "NO"
    if layout.engine == "zero":
        ds = raw.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            raise ConfigError(f"--config {path}: a separate DeepSpeed JSON (deepspeed_config_file) is not read by plan; "
                              "give the zero_stage and offload keys in the accelerate config")
        layout.zero_stage = int(ds.get("zero_stage", 2))
        if layout.zero_stage not in (1, 2, 3):
            raise ConfigError(f"--config {path}: zero_stage {layout.zero_stage} is not planned (1, 2 or 3)")
        layout.offload_optimizer = str(ds.get("offload_optimizer_device", "none")) not in ("none", "None")
        layout.offload_params = str(ds.get("offload_param_device", "none")) not in ("none", "None")
    if layout.engine == "fsdp2":
        fsdp = raw.get("fsdp_config") or {}
        if int(fsdp.get("fsdp_version", 1)) != 2:
            raise ConfigError(f"--config {path}: plan traces FSDP2 (fsdp_version: 2), not FSDP1")
        if fsdp.get("fsdp_offload_params"):
            raise ConfigError(f"--config {path}: fsdp_offload_params is not planned")
        layout.reshard_after_forward = bool(fsdp.get("fsdp_reshard_after_forward", True))
    return layout


def parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, largest layer's own parameters) of a model, tied ones counted once: DeepSpeed's counts
    (``model_to_params``, and ``estimate_zero3_model_states_mem_needs_all_live``'s largest layer)."""
    seen: set[int] = set()
    largest = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        largest = max(largest, sum(p.numel() for p in own))
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()), largest


def zero_states(n: int, largest: int, layout: Layout) -> dict[str, int]:
    """Bytes per rank of ZeRO's model states, split as the plan reports them. DeepSpeed's multipliers (ZeRO-2:
    ``2 * N + 18 * N / gpus``, "2 = params_16bit, 18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit +
    8_optimizer_states_32bit"; ZeRO-3: ``4 * largest_layer + 18 * N / gpus``, the 16-bit parameters partitioned too); offloaded parts leave the GPU."""
    p = layout.processes
    if layout.zero_stage in (1, 2):
        if layout.offload_optimizer:  # DeepSpeed: gpu_mem = 2 * total_params
            return {"weights": 2 * n, "gradients": 0, "optimizer": 0}
        return {"weights": 2 * n + 4 * n // p, "gradients": 6 * n // p, "optimizer": 8 * n // p}
    gathered = 2 * largest  # the largest layer's 16-bit parameters gathered, and their 16-bit gradients
    if layout.offload_optimizer and layout.offload_params:  # gpu_mem = largest_layer_memory
        return {"weights": gathered, "gradients": gathered, "optimizer": 0}
    if layout.offload_optimizer:  # gpu_mem = largest_layer_memory + 2 * total_params / gpus
        return {"weights": gathered + 2 * n // p, "gradients": gathered, "optimizer": 0}
    # 18 = 2 (16-bit parameters) + 4 (fp32 master) + 4 (fp32 gradients) + 8 (moments), all partitioned
    return {"weights": gathered + 6 * n // p, "gradients": gathered + 4 * n // p, "optimizer": 8 * n // p}


REDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's ``reduce_bucket_size`` default (``DeepSpeedZeroConfig``): accelerate's YAML path (no DeepSpeed JSON)
leaves it unset, so DeepSpeed's default holds (accelerate fills it from the model only where a JSON says "auto")."""


def zero_buffers() -> int:
    """Bytes of ZeRO's gradient-reduction bucket, allocated on the GPU whole (``contiguous_gradients``, the default):
    ``reduce_bucket_size`` 16-bit elements, twice under ZeRO-1/2 with ``overlap_comm`` (off by default there; on, and
    one bucket, under ZeRO-3). Not in DeepSpeed's estimators. ZeRO-3's prefetch and live-parameter buffers are not
    counted."""
    return 2 * REDUCE_BUCKET_ELEMENTS


def check_engine(config: Config, layout: Layout) -> None:
    """The loop's refusals for this layout (Muon needs whole matrices), raised before anything is traced."""
    from hf_streamlm.train.builders import check_optimizer_engine

    check_optimizer_engine(config, {"zero": "DEEPSPEED", "fsdp2": "FSDP"}.get(layout.engine, "MULTI_GPU"))
