"""DeepSpeed ZeRO (stages 2 and 3, with or without offload) under ``accelerate launch --config_file
accelerate_configs/deepspeed_zero*.yaml``: the few places where the Accelerate loop must know about it.

- The Accelerator must not be told ``cpu=True`` on a machine without a GPU (Accelerate then ignores
  DeepSpeed), and DeepSpeed's CPU accelerator needs its collective backend (gloo without oneCCL).
- The loop does not prepare its DataLoader, so Accelerate cannot fill DeepSpeed's ``"auto"`` batch
  values; the recipe's ``data.batch_size``, ``data.gradient_accumulation_steps`` and
  ``optimizer.max_grad_norm`` are written into the DeepSpeed config before ``prepare``.
- Checkpoints hold ZeRO shards (``pytorch_model/``), not ``model.safetensors``; the full fp32 weights
  are assembled from them (DeepSpeed's ``zero_to_fp32``) for the export and ``hf-streamlm export``.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from hf_streamlm.config import Config, ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "pytorch_model"
"""The folder Accelerate's ``save_state`` asks DeepSpeed to write its model and optimizer shards into."""


def deepspeed_launched() -> bool:
    """True in processes started by ``accelerate launch`` with a DeepSpeed config (or ``--use_deepspeed``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_placement(gpu: bool) -> dict:
    """``Accelerator`` keyword arguments that place the run: ``cpu=True`` when there is no GPU (the processes
    of an ``accelerate launch``/torchrun CPU job then meet over gloo), except under DeepSpeed, which
    Accelerate only enables with ``cpu=False``; on a CPU-only machine DeepSpeed then runs on its CPU
    accelerator, over that accelerator's backend (gloo, or ccl where oneCCL is installed)."""
    if not deepspeed_launched():
        return {"cpu": not gpu}
    if gpu:
        return {"cpu": False}
    from accelerate.utils import InitProcessGroupKwargs
    from deepspeed.accelerator import get_accelerator

    # Without a backend Accelerate would count a CPU DeepSpeed job as one process (no GPU backend found).
    backend = get_accelerator().communication_backend_name()
    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend=backend)]}


def configure_deepspeed(accelerator, config: Config) -> None:
    """Before ``accelerator.prepare``: the recipe's batch size, accumulation and clipping in the DeepSpeed
    config, so that DeepSpeed's check ``train_batch_size == micro batch x accumulation x processes``
    holds on any number of processes and its step boundaries are the loop's. A different explicit value
    in the Accelerate config (or ``accelerate launch`` flags) is overridden, with a warning."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    d = config.data
    ds = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": ("data.batch_size", d.batch_size),
        "gradient_accumulation_steps": ("data.gradient_accumulation_steps", d.gradient_accumulation_steps),
        "train_batch_size": ("", d.batch_size * d.gradient_accumulation_steps * accelerator.num_processes),
        # DeepSpeed clips inside its step; 0 turns clipping off (optimizer.max_grad_norm: null).
        "gradient_clipping": ("optimizer.max_grad_norm", float(config.optimizer.max_grad_norm or 0.0)),
    }
    for key, (source, value) in wanted.items():
        current = ds.get(key, "auto")
        if current not in ("auto", value) and source:
            logger.warning("DeepSpeed config has %s=%s; using %s=%s from the recipe", key, current, source, value)
        ds[key] = value


def is_zero_checkpoint(path: Path) -> bool:
    """A checkpoint written by ``accelerator.save_state`` under DeepSpeed (model and optimizer as ZeRO shards)."""
    return (Path(path) / CHECKPOINT_TAG).is_dir() and any((Path(path) / CHECKPOINT_TAG).glob("*model_states.pt"))


def zero_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a DeepSpeed checkpoint, assembled from its ZeRO-2/3 shards on the CPU (the fp32
    master copies, also when training ran in bf16), for any number of processes that wrote it."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ConfigError(f"checkpoint {path} was written by DeepSpeed (ZeRO shards in {CHECKPOINT_TAG}/); reading it "
                          "needs DeepSpeed: pip install 'hf_streamlm[deepspeed]'") from e
    return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=CHECKPOINT_TAG)


@contextmanager
def without_zero3_init():
    """Build models whole inside this block, also in a ZeRO-3 run, where transformers would otherwise
    partition every new model across the processes (``deepspeed.zero.Init``, collective): for reading
    weights on one process, or converting them before ``prepare`` (DeepSpeed partitions a whole model
    itself when it wraps it)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    # transformers keeps a weak reference to the run's DeepSpeed config (held alive by Accelerate's plugin).
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ref is not None and ref() is not None:
            hf_deepspeed.set_hf_deepspeed_config(ref())


def trained_model(accelerator, model, checkpoints: Path, step: int):
    """The model to export at the end of training. Under DeepSpeed it is read back from the checkpoint of
    ``step`` in ``checkpoints`` (written, complete, at the last step): ZeRO-3 holds each parameter in pieces
    across the processes, and the checkpoint holds the fp32 master weights under every stage and precision.
    Main process only. The same under FSDP (hf_streamlm.train.fsdp), whose parameters are sharded DTensors."""
    if accelerator.state.deepspeed_plugin is None and accelerator.distributed_type != "FSDP":
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    from hf_streamlm.export import load_checkpoint_model
    from hf_streamlm.train.checkpoint import STATE_FILE

    final = Path(checkpoints) / f"step-{step}"
    if not (final / STATE_FILE).is_file():
        raise RuntimeError(f"a DeepSpeed or FSDP run is exported from its last checkpoint, and {final} is missing")
    with without_zero3_init():
        return load_checkpoint_model(final)[0]
