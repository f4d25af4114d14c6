"""What the loop prepares before its first step, on every rank alike: the tokenizer (trained once, on the
main process) and, for an epoch-based schedule, the number of steps in an epoch."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator

from hf_streamlm.config import Config
from hf_streamlm.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)


def prepare_tokenizer(config: Config, accelerator: Accelerator, out: Path):
    """Train (or load) the tokenizer on the main process, save it in the run, load it everywhere.

    Training on 1M streamed documents (runpod_1b) can outlast the process group's timeout (30 min),
    so the other ranks wait for the finished folder on the (shared) run directory, not in a
    collective; it appears whole (written aside, then renamed)."""
    saved = out / "tokenizer"
    if not (saved / "tokenizer.json").is_file():
        if accelerator.is_main_process:
            tmp = out / ".tmp-tokenizer"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(saved, ignore_errors=True)  # a partial folder left by an older version
            build_tokenizer(config).save_pretrained(tmp)
            tmp.rename(saved)
        else:
            logger.info("rank %d: waiting for the main process to train the tokenizer", accelerator.process_index)
            while not (saved / "tokenizer.json").is_file():
                time.sleep(1.0)
    accelerator.wait_for_everyone()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(saved)


def count_steps_per_epoch(blocks: Iterable[dict], config: Config, accelerator: Accelerator) -> int:
    """One pass over this rank's stream (``blocks``: :func:`hf_streamlm.data.build_train_blocks`) to size an
    epoch-based schedule (streams have no length), then the smallest count over the ranks, shared by all.

    Ranks read different shards, so their counts differ (43 and 42 steps at 2 ranks): with one count
    per rank, one rank leaves the loop while the other waits in a collective, forever. The minimum
    (not the maximum) keeps ``total_epochs`` an upper bound on passes: no rank starts reading its
    shard a second time within an epoch, as with ``DistributedSampler(drop_last=True)``; a longer
    rank's last blocks open its next epoch instead of being repeated."""
    n_blocks = sum(1 for _ in blocks)
    steps = max(1, n_blocks // (config.data.batch_size * config.data.gradient_accumulation_steps))
    if accelerator.num_processes > 1:
        count = torch.tensor([steps], dtype=torch.long, device=accelerator.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
        if accelerator.is_main_process and int(count) != steps:
            logger.info("epoch length: %d steps on this rank, %d on the shortest; all ranks use %d",
                        steps, int(count), int(count))
        steps = int(count)
    return steps
