"""The training loop: one Accelerate loop for both families, kept short (accelerate's
``complete_nlp_example.py``); features live in the helpers it calls."""

from __future__ import annotations

import functools
import logging
import math
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
from hf_streamlm.data.pipeline import build_train_loader, source_names
from hf_streamlm.data.revisions import pin_hub_sources
from hf_streamlm.data.trace import DocumentTrace, trace_folder
from hf_streamlm.env import has_accelerator
from hf_streamlm.evaluation import check_loop_tasks, loop_eval, loop_tasks, token_bytes
from hf_streamlm.export import export_run
from hf_streamlm.train.builders import (
    build_model,
    build_optimizer,
    build_scheduler,
    check_optimizer_engine,
    estimate,
)
from hf_streamlm.train.checkpoint import (abandon_newer, load_checkpoint, main_decides, qualifies_as_best, save_best,
                                          save_checkpoint, trained_model)
from hf_streamlm.train.demo import print_fill_mask, print_generation
from hf_streamlm.train.device_batch import to_device
from hf_streamlm.train.elastic import keep_global_batch
from hf_streamlm.train.history import History, plot_history
from hf_streamlm.train.hub_sync import resume_choice, start_pusher
from hf_streamlm.train.logs import Window, log_row, source_counts
from hf_streamlm.train.monitor import NonFiniteGuard, peak_flops, total_steps_for
from hf_streamlm.train.prepare import count_steps_per_epoch, prepare_tokenizer
from hf_streamlm.train.rollback import Rollback, Rollbacks
from hf_streamlm.train.signals import StopSignal, shielded
from hf_streamlm.train.spikes import SpikeLog, check_spikes_engine
from hf_streamlm.train.stops import fetch_step, shared_failure, stop_nonfinite, stop_on_data_failure
from hf_streamlm.train.trackers import log_with, start_trackers
from hf_streamlm.train.zero import accelerator_placement, configure_deepspeed

logger = logging.getLogger(__name__)


def train(config: Config, command: str | None = None) -> Path:
    """Train according to ``config``; return the run directory. ``command`` (the command line that
    started the run) goes into the checkpoints and the model card. A rollback after repeated loss spikes
    (hf_streamlm.train.rollback) starts the run again here, from the checkpoint it chose."""
    while True:
        try:
            return train_once(config, command)
        except Rollback as back:  # from the checkpoint latest.json now names; none: the start (not the Hub's)
            config.runtime.resume = "auto" if back.args[0] else "never"


def train_once(config: Config, command: str | None = None) -> Path:
    """:func:`train` up to its end, or up to a rollback (:class:`~hf_streamlm.train.rollback.Rollback` raised)."""
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
    pin_hub_sources(config, resume_from, accelerator)  # before anything reads a source, config.yaml included
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.yaml")
    start_trackers(accelerator, config, out)  # runtime.logging.report_to, with the resolved config

    check_loop_tasks(config, accelerator)  # runtime.evaluation.tasks: lm_eval there, tasks found (fail early)
    check_optimizer_engine(config, accelerator.distributed_type)
    check_spikes_engine(config, accelerator.distributed_type)  # runtime.spikes: refused where DeepSpeed steps in backward
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
    pusher = start_pusher(config, accelerator, out, model, tokenizer)  # hub.push: a background thread, main process
    accelerator.register_for_checkpointing(scheduler)
    eval_blocks = build_eval_blocks(config, tokenizer, r.evaluation.max_batches * d.batch_size)
    eval_collator = make_collator(config, tokenizer, seed=r.seed)  # re-seeded per eval: same masks each time
    eval_bytes = token_bytes(tokenizer)  # bytes per token id (byte-level BPE): eval_bits_per_byte

    best_dir = Path(r.evaluation.best.directory or out / "best")
    state: dict[str, Any] = {"step": 0, "epoch": 0, "micro_batches": 0, "tokens": 0, "nonfinite_skips": 0,
                             "spike_skips": 0}
    if resume_from is not None:
        state = {**state, **load_checkpoint(accelerator, resume_from, loader, d.batch_size)}
        accelerator.print(f"Resuming from {resume_from} (step {state['step']})")
        abandon_newer(accelerator, ckpt_dir, resume_from, state["step"])  # latest.json; newer checkpoints moved aside
    state["command"] = command or state.get("command")
    flops_per_token = estimate(config.model, len(tokenizer), d.sequence_length, d.batch_size)["flops_per_token"]
    peak = peak_flops(config, accelerator.device)
    guard = NonFiniteGuard(config, accelerator, state.pop("spike_window", None))  # runtime.spikes: the checkpoint's window
    spike_log = SpikeLog(out, state, accelerator.is_main_process, rank)  # spikes.jsonl cut back to the resumed step
    history = History(out / "history.jsonl", resume_step=state["step"]) if accelerator.is_main_process else None
    rollbacks = Rollbacks(config, out, ckpt_dir, accelerator, state, resume_from)  # runtime.spikes.rollback_after

    resumed_at = state["step"]
    stop = StopSignal()  # SIGTERM (RunPod preemption) / SIGINT: checkpoint at the next step boundary, exit 0
    batches = shielded(iter(loader))  # endless; continues exactly where the checkpoint's data state says
    # Cut back to the length the checkpoint recorded (one truncate), then appended to (hf_streamlm.data.trace).
    trace = DocumentTrace(trace_folder(out), rank, state["step"], world, resume_from) if d.trace_documents else None
    names = source_names(config)

    bar = tqdm(total=total_steps, initial=state["step"], disable=not (accelerator.is_main_process and r.logging.progress_bar),
               desc="train", dynamic_ncols=True)
    model.train()
    window = Window()  # the steps since the last logged row
    grad_norm = None
    try:  # the bar ends its line even when an error stops the run
        while state["step"] < total_steps:
            with window.waiting():
                step_batches, failure = fetch_step(batches, d.gradient_accumulation_steps, loader)
                while failure is None and rollbacks.drops(state, loader):  # a rolled-back spike's token range
                    step_batches, failure = fetch_step(batches, d.gradient_accumulation_steps, loader)
            if failure := shared_failure(accelerator, failure):  # a source failed on some rank: no rank trains
                raise stop_on_data_failure(accelerator, config, tokenizer, ckpt_dir, state, loader, failure, resumed_at)
            state["epoch"] = loader.epoch
            stopping = False
            for batch in step_batches:  # nothing here reads a device value back (hf_streamlm.train.device_batch)
                batch, tokens = to_device(batch, accelerator.device)
                with accelerator.accumulate(model):
                    output = model(**batch)
                    loss = output.loss
                    accelerator.backward(loss)
                    guard.add_loss(loss)
                    if accelerator.sync_gradients:
                        # Clipping at inf still returns the norm: logged, and checked for NaN/inf.
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                                config.optimizer.max_grad_norm or math.inf)
                        # The step's one read-back: the guard's verdict and the stop flags of all ranks, together
                        # (with runtime.spikes, the step's loss and gradient norm too: hf_streamlm.train.spikes).
                        update, stopping = guard.decide(grad_norm, stop_requested=stop.received is not None)
                        if update:
                            optimizer.step()
                        elif accelerator.scaler is not None:  # fp16: GradScaler needs an update() after the unscale_
                            accelerator.scaler.update()       # of clip_grad_norm_, or the next step's unscale_ raises
                    optimizer.zero_grad()
                window.add(loss, tokens, getattr(output, "z_loss", None))
                state["micro_batches"] += 1
            if guard.in_a_row:  # this step's update was dropped (runtime.on_nonfinite)
                state["nonfinite_skips"] += 1
                if guard.must_stop:
                    raise stop_nonfinite(accelerator, config, tokenizer, ckpt_dir, state, loader, loss, grad_norm, guard)
                logger.warning("step %d: non-finite loss or gradient norm (loss %s, grad norm %s); update skipped "
                               "(%d skipped so far)", state["step"] + 1, loss.item(), float(grad_norm),
                               state["nonfinite_skips"])
            if guard.spikes:  # runtime.spikes: a skipped spike counted, in spikes.jsonl; the window kept in the state
                spike_log.after_step(guard.spikes, guard.spike, state)
            scheduler.step()
            state["step"] += 1
            if trace:
                trace.write(state["step"], loader.take_documents())
            if guard.spikes:  # repeated spikes: back to the checkpoint before them (Rollback raised)
                rollbacks.after_step(guard.spike is not None, state, loader)
            bar.update(1)

            logs = state["step"] % r.log_every_n_steps == 0 or state["step"] == total_steps
            if logs:
                row = window.row(state, scheduler.get_last_lr()[0], grad_norm, accelerator)
                if peak:  # model FLOPs utilisation per device (Kaplan 6N + attention, PaLM's definition)
                    row["mfu"] = flops_per_token * row["tokens_per_s"] / accelerator.num_processes / peak
                row.update(source_counts(loader, names, accelerator))
                if "stage_tokens" in row:  # the realized mixture, for the model card
                    state["stage_tokens"] = row["stage_tokens"]
                log_row(row, accelerator, history, bar, r.logging.enable_stdout)

            every, best = r.evaluation.every_n_steps, False
            evaluates = bool(every and state["step"] % every == 0) or state["step"] == total_steps
            if eval_blocks and evaluates:
                eval_collator.generator = None
                metrics = loop_eval(model, eval_blocks, eval_collator, d.batch_size, accelerator, eval_bytes)
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
                best_saved = save_best(accelerator, config, tokenizer, best_dir, dict(state), r.evaluation.best.max_keep,
                                       loader, saved)
                saved = saved or best_saved
            pusher.saved(saved, dict(state), best, last=stopping or state["step"] == total_steps)  # queued, not waited for
            if stopping:
                # The launcher's grace period (torchrun 30 s, docker 10 s, ...) must cover this: see resume.md.
                accelerator.print(f"Stopped by {stop.name} at step {state['step']}; checkpoint saved in {ckpt_dir} "
                                  f"(save {time.perf_counter() - t_save:.1f} s, {stop.elapsed():.1f} s after the "
                                  "signal). Run the same command again to resume.")
                break
    except Rollback:  # the run starts over (hf_streamlm.train.rollback): the queued pushes first
        pusher.finish()
        raise
    finally:
        bar.close()
        batches.close()  # DataLoader workers stopped here, on every way out (hf_streamlm.train.signals)
        stop.restore()
    if stop.received:
        accelerator.wait_for_everyone()
        pusher.finish()  # the queued pushes, up to hub.flush_timeout (the launcher's grace period may be shorter)
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
    accelerator.wait_for_everyone()
    pusher.finish(out / "export", state["step"])  # the other ranks are done: only the main process waits here
    accelerator.end_training()  # closes trackers and the process group: last
    return out


__all__ = ["train"]
