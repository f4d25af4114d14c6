"""The training loop: one Accelerate loop for both families, kept short (accelerate's
``complete_nlp_example.py``); features live in the helpers it calls."""

from __future__ import annotations

import functools
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from hf_streamlm.config import Config, ConfigError
from hf_streamlm.data import build_eval_blocks, build_train_blocks
from hf_streamlm.data.collate import make_collator
from hf_streamlm.data.pipeline import PackedBlocks, build_train_loader, source_names
from hf_streamlm.data.revisions import pin_hub_sources
from hf_streamlm.data.trace import DocumentTrace
from hf_streamlm.data.quality import SKIP_KINDS
from hf_streamlm.env import has_accelerator
from hf_streamlm.evaluation import check_loop_tasks, loop_tasks, score
from hf_streamlm.export import export_run
from hf_streamlm.tokenizer import build_tokenizer
from hf_streamlm.train.builders import build_model, build_optimizer, build_scheduler, estimate
from hf_streamlm.train.checkpoint import (list_checkpoints, load_checkpoint, qualifies_as_best, resume_choice,
                                          save_best, save_checkpoint, trained_model)
from hf_streamlm.train.demo import print_fill_mask, print_generation
from hf_streamlm.train.device_batch import to_device
from hf_streamlm.train.elastic import keep_global_batch
from hf_streamlm.train.monitor import NonFiniteError, NonFiniteGuard, peak_flops, total_steps_for
from hf_streamlm.train.history import History, plot_history
from hf_streamlm.train.signals import StopSignal, shielded
from hf_streamlm.train.trackers import log_with, start_trackers
from hf_streamlm.train.zero import accelerator_placement, configure_deepspeed

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


def count_steps_per_epoch(blocks: PackedBlocks, config: Config, accelerator: Accelerator) -> int:
    """One pass over this rank's stream to size an epoch-based schedule (streams have no length), then
    the smallest count over the ranks, shared by all.

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


def main_decides(accelerator: Accelerator, value):
    """``value`` as the main process computed it, on every rank: decisions that read the file system
    (which checkpoint to resume, whether an eval makes best/) are taken once, since a network volume
    can show two nodes different listings and ranks that disagree wait in different collectives."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value if accelerator.is_main_process else None])[0]


def evaluate(model, eval_blocks: list[dict], collator, batch_size: int, accelerator: Accelerator) -> dict[str, float]:
    """Mean loss over the held-out blocks (per predicted token), perplexity, MLM accuracy: the same
    code and ``evaluate`` modules as ``hf-streamlm eval`` (Accelerate's autocast is already on the
    prepared model, hence fp32 here)."""
    metrics = score(model, eval_blocks, collator, batch_size, accelerator.device, "fp32")
    model.train()
    return metrics


def train(config: Config, command: str | None = None) -> Path:
    """Train according to ``config``; return the run directory. ``command`` (the command line that
    started the run) goes into the checkpoints and the model card."""
    r, d = config.runtime, config.data
    out = config.output_dir
    trackers = log_with(config, out)  # a tracker that is not installed: one line, before anything starts
    accelerator = Accelerator(
        **accelerator_placement(has_accelerator()),  # CPU jobs use gloo; DeepSpeed its own CPU accelerator
        mixed_precision=None if r.precision == "auto" else "no" if r.precision == "fp32" else r.precision,
        gradient_accumulation_steps=d.gradient_accumulation_steps,
        log_with=trackers,
        project_dir=str(out),
    )
    if r.precision == "auto":  # the launcher's choice, written back so everything after sees it
        r.precision = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)
    ckpt_dir = Path(r.checkpoint.directory or out / "checkpoints")
    resume_from, refusal = main_decides(accelerator, resume_choice(config, ckpt_dir) if accelerator.is_main_process else None)
    if refusal:
        raise ConfigError(refusal)
    if resume_from is not None:  # the same stream; the checkpoint's tokens per step on this number of processes
        keep_global_batch(config, accelerator, resume_from)
    set_seed(r.seed)
    ckpt_dir = Path(r.checkpoint.directory or out / "checkpoints")
    resume_from, refusal = main_decides(accelerator, resume_choice(config, ckpt_dir) if accelerator.is_main_process else None)
    if refusal:
        raise ConfigError(refusal)
    pin_hub_sources(config, resume_from, accelerator)  # before anything reads a source, config.yaml included
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.yaml")
    start_trackers(accelerator, config, out)  # runtime.logging.report_to, with the resolved config

    check_loop_tasks(config, accelerator)  # runtime.evaluation.tasks: lm_eval there, tasks found (fail early)
    tokenizer = prepare_tokenizer(config, accelerator, out)
    model = build_model(config, tokenizer)
    optimizer = build_optimizer(model, config, accelerator.device)
    if r.compile:
        model = torch.compile(model, backend=r.compile_backend)
    rank, world = accelerator.process_index, accelerator.num_processes
    # Pinned on CUDA, so that the non_blocking copies in to_device overlap with the kernels still running.
    loader = build_train_loader(config, tokenizer, functools.partial(make_collator, config, tokenizer), rank, world,
                                pin_memory=accelerator.device.type == "cuda")
    tokens_per_step = d.batch_size * d.sequence_length * d.gradient_accumulation_steps * world
    total_steps = total_steps_for(
        config, tokens_per_step,
        lambda: count_steps_per_epoch(build_train_blocks(config, tokenizer, rank, world), config, accelerator),
    )
    scheduler = build_scheduler(optimizer, config, total_steps)
    # The loader is not prepared: ranks already read disjoint shards (split_dataset_by_node), and the
    # scheduler steps once per optimizer step (a prepared one would step num_processes times).
    configure_deepspeed(accelerator, config)  # DeepSpeed's batch values from the recipe (no prepared loader)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    eval_blocks = build_eval_blocks(config, tokenizer, r.evaluation.max_batches * d.batch_size)
    eval_collator = make_collator(config, tokenizer, seed=r.seed)  # re-seeded per eval: same masks each time

    best_dir = Path(r.evaluation.best.directory or out / "best")
    state: dict[str, Any] = {"step": 0, "epoch": 0, "micro_batches": 0, "tokens": 0, "nonfinite_skips": 0}
    if resume_from is not None:
        state = {**state, **load_checkpoint(accelerator, resume_from, loader)}
        accelerator.print(f"Resuming from {resume_from} (step {state['step']})")
    state["command"] = command or state.get("command")
    flops_per_token = estimate(config.model, len(tokenizer), d.sequence_length, d.batch_size)["flops_per_token"]
    peak = peak_flops(config, accelerator.device)
    guard = NonFiniteGuard(config, accelerator)
    history = History(out / "history.jsonl", resume_step=state["step"]) if accelerator.is_main_process else None

    resumed_at = state["step"]
    stop = StopSignal()  # SIGTERM (RunPod preemption) / SIGINT: checkpoint at the next step boundary, exit 0
    batches = shielded(iter(loader))  # endless; continues exactly where the checkpoint's data state says
    trace = DocumentTrace(out / "trace", rank, state["step"], world) if d.trace_documents else None
    names = source_names(config)

    bar = tqdm(total=total_steps, initial=state["step"], disable=not (accelerator.is_main_process and r.logging.progress_bar),
               desc="train", dynamic_ncols=True)
    model.train()
    window = {"loss": 0.0, "micro": 0, "tokens": 0, "wait": 0.0, "t0": time.perf_counter()}
    grad_norm = None
    try:  # the bar ends its line even when an error stops the run
        while state["step"] < total_steps:
            t_wait = time.perf_counter()
            step_batches, failure = fetch_step(batches, d.gradient_accumulation_steps)
            window["wait"] += time.perf_counter() - t_wait
            if shared_failure(accelerator, failure):  # a source failed on some rank: no rank trains this step
                raise stop_on_data_failure(accelerator, config, tokenizer, ckpt_dir, state, loader, failure, resumed_at)
            state["epoch"] = loader.epoch
            stopping = False
            for batch in step_batches:  # nothing here reads a device value back (hf_streamlm.train.device_batch)
                batch, tokens = to_device(batch, accelerator.device)
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    guard.add_loss(loss)
                    if accelerator.sync_gradients:
                        # Clipping at inf still returns the norm: logged, and checked for NaN/inf.
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                                config.optimizer.max_grad_norm or math.inf)
                        # The step's one read-back: the guard's verdict and the stop flags of all ranks, together.
                        update, stopping = guard.decide(grad_norm, stop_requested=stop.received is not None)
                        if update:
                            optimizer.step()
                    optimizer.zero_grad()
                window["loss"] += loss.detach().float()
                window["micro"] += 1
                window["tokens"] += tokens
                state["micro_batches"] += 1
            if guard.in_a_row:  # this step's update was dropped (runtime.on_nonfinite)
                state["nonfinite_skips"] += 1
                if guard.must_stop:
                    raise stop_nonfinite(accelerator, config, tokenizer, ckpt_dir, state, loader, loss, grad_norm, guard)
                logger.warning("step %d: non-finite loss or gradient norm (loss %s, grad norm %s); update skipped "
                               "(%d skipped so far)", state["step"] + 1, float(loss), float(grad_norm),
                               state["nonfinite_skips"])
            scheduler.step()
            state["step"] += 1
            if trace:
                trace.write(state["step"], loader.take_documents())
            bar.update(1)

            logs = state["step"] % r.log_every_n_steps == 0 or state["step"] == total_steps
            if logs:
                stats = torch.tensor([float(window["loss"]) / window["micro"], window["tokens"]], device=accelerator.device)
                stats = accelerator.reduce(stats, reduction="sum")
                elapsed = time.perf_counter() - window["t0"]
                state["tokens"] += int(stats[1])
                row = {
                    "step": state["step"],
                    "epoch": state["epoch"],
                    "loss": float(stats[0]) / accelerator.num_processes,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens": state["tokens"],
                    "tokens_per_s": float(stats[1]) / elapsed,
                    "data_wait_pct": 100.0 * window["wait"] / elapsed,
                    "nonfinite_skips": state["nonfinite_skips"],
                }
                if peak:  # model FLOPs utilisation per device (Kaplan 6N + attention, PaLM's definition)
                    row["mfu"] = flops_per_token * row["tokens_per_s"] / accelerator.num_processes / peak
                row.update(source_counts(loader, names, accelerator))
                log_row(row, accelerator, history, bar, r.logging.enable_stdout)
                window = {"loss": 0.0, "micro": 0, "tokens": 0, "wait": 0.0, "t0": time.perf_counter()}

            every, best = r.evaluation.every_n_steps, False
            evaluates = bool(every and state["step"] % every == 0) or state["step"] == total_steps
            if eval_blocks and evaluates:
                eval_collator.generator = None
                metrics = evaluate(model, eval_blocks, eval_collator, d.batch_size, accelerator)
                log_row({"step": state["step"], **metrics}, accelerator, history, bar, r.logging.enable_stdout)
                if metrics:
                    state["eval"] = metrics
                    best = main_decides(accelerator, accelerator.is_main_process
                                        and qualifies_as_best(best_dir, metrics["eval_loss"], r.evaluation.best.max_keep))
            if r.evaluation.tasks and evaluates:
                if downstream := loop_tasks(model, tokenizer, config, state["step"], accelerator):
                    state["lm_eval"] = downstream  # -> checkpoint state, model card
                    log_row({"step": state["step"], **downstream["results"]}, accelerator, history, bar,
                            r.logging.enable_stdout)

            every = r.checkpoint.every_n_steps
            # A step that logged or evaluated has read values back already, and may have taken long: a signal
            # that came meanwhile stops it now (the ranks agree again) rather than after the next step.
            stopping = stop.agreed(accelerator) if logs or evaluates else stop.adopt(stopping)
            saved, t_save = None, time.perf_counter()
            if (every and state["step"] % every == 0) or state["step"] == total_steps or stopping:
                saved = save_checkpoint(accelerator, config, tokenizer, ckpt_dir, dict(state), r.checkpoint.max_keep, loader)
            if best:  # among the best.max_keep by eval loss: best/step-<N>
                save_best(accelerator, config, tokenizer, best_dir, dict(state), r.evaluation.best.max_keep, loader, saved)
            if stopping:
                # The launcher's grace period (torchrun 30 s, docker 10 s, ...) must cover this: see resume.md.
                accelerator.print(f"Stopped by {stop.name} at step {state['step']}; checkpoint saved in {ckpt_dir} "
                                  f"(save {time.perf_counter() - t_save:.1f} s, {stop.elapsed():.1f} s after the "
                                  "signal). Run the same command again to resume.")
                break
    finally:
        bar.close()
        batches.close()  # DataLoader workers stopped here, on every way out (hf_streamlm.train.signals)
        stop.restore()
    if stop.received:
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return out

    if accelerator.is_main_process:
        export_dir = export_run(trained_model(accelerator, model, ckpt_dir, state["step"]), tokenizer, config,
                                out / "export", r.export_format, summary=state)
        plot_history(out / "history.jsonl", out / "history.png")
        accelerator.print(f"Run directory: {out}\nExport (Hub format): {export_dir}")
        if r.demo_sentences:
            demo = print_fill_mask if config.model.type == "microbert" else print_generation
            demo(export_dir, r.demo_sentences)
        if config.hub.push:
            from hf_streamlm.export import push_export

            push_export(export_dir, config)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes trackers and the process group: last
    return out


class DataFailure(RuntimeError):
    """A source could not be read after training had started; the last completed step was saved."""


def fetch_step(batches, micro_batches: int) -> tuple[list[dict], str | None]:
    """The micro-batches of one optimizer step, or the one-line reason the stream failed. Fetched before
    the step trains, so that a failure leaves the step untouched on every rank (and with workers, the
    loader's state still at the step boundary)."""
    fetched = []
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
        return fetched, one_line(str(err))
    return fetched, None


def one_line(message: str) -> str:
    if "Original Traceback" in message:  # raised in a DataLoader worker: torch appended its traceback
        message = message.strip().splitlines()[-1].split("ConfigError: ", 1)[-1]
    return message


def shared_failure(accelerator: Accelerator, failure: str | None) -> str | None:
    """``failure`` of any rank, on every rank (one small all-reduce per step with several processes; the
    message itself travels only when there is one)."""
    if accelerator.num_processes == 1:
        return failure
    flag = accelerator.reduce(torch.tensor([1 if failure else 0], device=accelerator.device), reduction="sum")
    if not flag.item():
        return None
    from accelerate.utils import gather_object

    return failure or next(m for m in gather_object([failure]) if m)


def stop_on_data_failure(accelerator, config, tokenizer, ckpt_dir, state, loader, failure: str,
                         resumed_at: int) -> Exception:
    """Before any step: the plain one-line error (bad input, exit 2). After: save the last completed step
    (unless it is the checkpoint just resumed from), then the error the run exits with (status 4)."""
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


def stop_nonfinite(accelerator, config, tokenizer, ckpt_dir, state, loader, loss, grad_norm, guard) -> NonFiniteError:
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
        f"non-finite loss or gradient norm at step {state['step'] + 1} (loss {float(loss)}, grad norm "
        f"{float(grad_norm)}), stopped {why}; the last good state is in {path}. Lower optimizer.learning_rate or "
        "set optimizer.max_grad_norm, then run again to resume"
    )


def source_counts(loader, names: list[str], accelerator: Accelerator) -> dict[str, dict[str, int]]:
    """Documents and tokens read so far from each source, and documents skipped by kind (empty,
    null, not text, too short), summed over ranks."""
    docs, tokens = loader.source_counts()
    local = torch.tensor([docs.get(i, 0) for i in range(len(names))] + [tokens.get(i, 0) for i in range(len(names))],
                         dtype=torch.long, device=accelerator.device)
    skipped = loader.skip_counts()
    local = torch.cat([local, torch.tensor([skipped.get(k, 0) for k in SKIP_KINDS], device=accelerator.device)])
    total = accelerator.reduce(local, reduction="sum").tolist()
    n = len(names)
    return {
        "source_docs": dict(zip(names, total[:n])),
        "source_tokens": dict(zip(names, total[n : 2 * n])),
        "skipped": {k: v for k, v in zip(SKIP_KINDS, total[2 * n :]) if v},
    }


def log_row(row: dict[str, Any], accelerator: Accelerator, history: History | None, bar, stdout: bool) -> None:
    if accelerator.is_main_process:
        history.write(row)
        if stdout:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                            if not isinstance(v, dict))
            bar.write(text)
            sys.stdout.flush()  # visible at once when stdout is a file (pod logs)
    scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
    for name, n in row.get("source_tokens", {}).items():
        scalars[f"source_tokens/{name}"] = n
    accelerator.log(scalars, step=row["step"])


__all__ = ["list_checkpoints", "train"]
