"""How a run stops when it must: a data source that fails, a loss or gradient norm that is not
finite. Each saves the last good state it can, then gives the loop the error the run exits with
(``python -m hf_streamlm.run``: status 2 for bad input before step 1, 3 for non-finite, 4 for a data
failure after training started). Stop *signals* (SIGTERM/SIGINT) are :mod:`hf_streamlm.train.signals`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from hf_streamlm.config import Config, ConfigError
from hf_streamlm.config.errors import one_line
from hf_streamlm.train.checkpoint import list_checkpoints, main_decides, save_checkpoint
from hf_streamlm.train.monitor import NonFiniteError, NonFiniteGuard

logger = logging.getLogger(__name__)


class DataFailure(RuntimeError):
    """A source could not be read after training had started; the last completed step was saved."""


def fetch_step(batches: Iterator[dict], micro_batches: int, loader=None) -> tuple[list[dict], str | None]:
    """The micro-batches of one optimizer step, or the one-line reason the stream failed. Fetched before
    the step trains, so that a failure leaves the step untouched on every rank. ``loader`` (the
    :class:`ResumableLoader` behind ``batches``) is marked at the step's start: on a failure, of this rank
    or another, :func:`stop_on_data_failure` rewinds it there, so that the checkpoint it saves resumes at
    the step's first micro-batch, not after the ones fetched and never trained."""
    fetched = []
    if loader is not None:
        loader.mark()
    try:
        for _ in range(micro_batches):
            batch = next(batches, None)
            if batch is None:
                raise ConfigError(
                    "the training stream produced no full batch: the sources are empty, everything was filtered out, "
                    "or data.sequence_length x data.batch_size is more than the corpus holds"
                )
            fetched.append(batch)
    except ConfigError as err:  # a read failure, reported as one line by the data pipeline
        logger.warning("data failure after %d of the step's %d micro-batches were fetched: %s", len(fetched),
                       micro_batches, one_line(str(err)))
        return fetched, one_line(str(err))
    return fetched, None


def host_group() -> torch.distributed.ProcessGroup | None:
    """A process group whose collectives run on the host (gloo): the default group when it is gloo already
    (CPU runs), else one made once, by every rank at the same point of the loop (its first step). A flag
    reduced there is a CPU tensor: reading it makes no rank wait for its GPU, where the same flag reduced
    over NCCL is a device read-back (a stall of the host) per step."""
    global _HOST_GROUP
    if torch.distributed.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None:
        _HOST_GROUP = torch.distributed.new_group(backend="gloo")
    return _HOST_GROUP


_HOST_GROUP = None


def shared_failure(accelerator: Accelerator, failure: str | None) -> str | None:
    """``failure`` of any rank, on every rank, as one line naming the rank: one small all-reduce per step
    with several processes, on the host (:func:`host_group`), so that it adds no device read-back to the
    step; when it says some rank failed, every rank (the failing ones too) enters the gather of the
    messages, so no rank is left waiting in a collective the others skipped."""
    if accelerator.num_processes == 1:
        return failure
    flag = torch.tensor([1 if failure else 0], dtype=torch.int32)
    torch.distributed.all_reduce(flag, group=host_group())
    if not flag.numpy()[0]:  # host memory: nothing to wait for
        return None
    from accelerate.utils import gather_object

    failed = [(rank, message) for rank, message in enumerate(gather_object([failure])) if message]
    rank, message = failed[0]
    others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    return f"rank {rank}{others}: {message}"


def stop_on_data_failure(accelerator: Accelerator, config: Config, tokenizer, ckpt_dir: Path, state: dict[str, Any],
                         loader, failure: str, resumed_at: int) -> Exception:
    """Before any step: the plain one-line error (bad input, exit 2). After: save the last completed step
    (unless it is the checkpoint just resumed from), with the data state rewound to that step's end (the
    micro-batches fetched for the step that failed, on any rank, are not trained: a resume starts with
    them), then the error the run exits with (status 4)."""
    loader.rewind()
    if state["step"] == 0:
        return ConfigError(failure)
    where = "the checkpoint it resumed from"
    if state["step"] > resumed_at:
        t0 = time.perf_counter()
        where = save_checkpoint(accelerator, config, tokenizer, ckpt_dir, dict(state),
                                config.runtime.checkpoint.max_keep, loader)
        logger.info("data failure: step %d saved in %.1f s", state["step"], time.perf_counter() - t0)
    return DataFailure(f"{failure}; training stopped after step {state['step']}, saved in {where}: run the same "
                       "command again to resume once the source can be read")


def stop_nonfinite(accelerator: Accelerator, config: Config, tokenizer, ckpt_dir: Path, state: dict[str, Any], loader,
                   loss: torch.Tensor, grad_norm: torch.Tensor, guard: NonFiniteGuard) -> NonFiniteError:
    """Save the last good state (the weights before the bad step; the data state past its batch) and
    build the error the run stops with.

    Under DeepSpeed the engine steps inside ``backward()``, before the loop sees the loss: whether it
    applied the bad gradients depends on its version and precision (DeepSpeed 0.19's ZeRO-2 skips a
    non-finite gradient norm in fp32, not in bf16). Saving the weights in memory (as ``step-<N>`` of
    the last good step, too) could make the next resume start from a NaN update, so the newest
    checkpoint on disk, written before the bad step, is the last good state then."""
    if accelerator.distributed_type == "DEEPSPEED":
        found = main_decides(accelerator, list_checkpoints(ckpt_dir)[-1:] if accelerator.is_main_process else None)
        path = found[0] if found else "no checkpoint (the next run starts from step 0)"
        if found:
            path = f"{path} (DeepSpeed may have applied the bad step already: the steps since that checkpoint are lost)"
    else:
        path = save_checkpoint(accelerator, config, tokenizer, ckpt_dir, dict(state),
                               config.runtime.checkpoint.max_keep, loader)
    why = "with runtime.on_nonfinite=stop" if guard.mode == "stop" else \
        f"after {guard.in_a_row} skipped steps in a row (runtime.max_nonfinite_skips)"
    return NonFiniteError(
        f"non-finite loss or gradient norm at step {state['step'] + 1} (loss {loss.item()}, grad "
        f"norm {float(grad_norm)}), stopped {why}; the last good state is in {path}. Lower optimizer.learning_rate or "
        "set optimizer.max_grad_norm, then run again to resume"
    )
