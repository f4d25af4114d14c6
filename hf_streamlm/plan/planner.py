"""``hf-streamlm plan``: per-GPU memory of a recipe's traced step under an accelerate config, what to change when
it does not fit (each change traced again), tokens/s, time to the recipe's budget and its cost."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from hf_streamlm.config import Config, ConfigError, load_config
from hf_streamlm.plan.engines import Layout, check_engine, parameter_bytes, read_layout, zero_buffers, zero_states
from hf_streamlm.plan.gpus import ANCHOR_SOURCE, MFU_ANCHORS, RESERVED, gpu, read_calibration
from hf_streamlm.plan.trace import PARTS, TRACED_KERNELS, StepSpec, Trace, trace_step

GIB = 2**30
TIGHT = 0.10
"""Headroom (share of the GPU's memory) under which an uncalibrated plan warns that it is tight."""
FLASH_KERNELS = ("flash_attention", "efficient_attention", "cudnn_attention")
"""Fused SDPA kernels (CPU and CUDA): they keep the output and its log-sum-exp, never the T x T scores."""


@dataclass
class RankMemory:
    """What one GPU holds at the step's peak, in bytes."""

    peak: int
    parts: dict[str, int]
    trace: Trace
    notes: list[str] = field(default_factory=list)


@dataclass
class Change:
    """One change that was traced because the recipe did not fit."""

    what: str
    peak: int
    fits: bool


def vocab_of(config: Config) -> int:
    """The vocabulary the run's model will have (``model.vocab_size``, else the tokenizer section's size)."""
    return config.model.vocab_size or config.tokenizer.vocab_size


def rank_memory(config: Config, layout: Layout, fake: bool = True) -> RankMemory:
    """The traced per-GPU peak of one optimizer step of ``config`` under ``layout``."""
    from hf_streamlm.train.builders import meta_model

    check_engine(config, layout)
    precision, vocab = layout.precision(config), vocab_of(config)
    if layout.engine == "fsdp2":
        spec = StepSpec("fsdp2", precision, layout.processes, layout.reshard_after_forward)
        t = trace_step(config, vocab, spec, fake)
        note = f"FSDP2 traced: fully_shard as accelerate applies it, in a fake process group of {layout.processes}"
        return RankMemory(t.peak, dict(t.parts), t, [note])
    if layout.engine == "zero":
        if precision not in ("bf16", "fp16"):
            raise ConfigError(f"plan counts ZeRO's model states by DeepSpeed's rules for 16-bit runs; this run's "
                              f"precision is {precision} (set runtime.precision=bf16)")
        t = trace_step(config, vocab, StepSpec("zero", precision), fake)
        n, largest = parameter_bytes(meta_model(config.model, vocab))
        parts = {**dict.fromkeys(PARTS, 0), **zero_states(n, largest, layout)}
        parts["communication"] = zero_buffers()
        parts["logits"] = t.parts["logits"]
        parts["activations"] = max(t.activation_peak - t.parts["logits"], 0)
        return RankMemory(sum(parts.values()), parts, t, [
            ("ZeRO model states by DeepSpeed's estimate_zero*_model_states_mem_needs rules, plus its 5e8-element "
             "gradient-reduction bucket; activations traced on the 16-bit module")])
    t = trace_step(config, vocab, StepSpec("single", precision), fake)
    parts, notes = dict(t.parts), []
    if layout.engine == "ddp":
        model = meta_model(config.model, vocab)
        buckets = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        parts["communication"] += buckets
        notes.append("DDP's gradient buckets: a second copy of every gradient (gradient_as_bucket_view=False)")
    return RankMemory(sum(parts.values()), parts, t, notes)


def shipped_alternatives(layout: Layout) -> list[Layout]:
    """The shipped sharded configs (accelerate_configs/) at this number of GPUs, other than ``layout`` itself."""
    n = layout.processes
    options = [Layout("zero", n, "bf16", 2, source="accelerate_configs/deepspeed_zero2.yaml"),
               Layout("zero", n, "bf16", 3, source="accelerate_configs/deepspeed_zero3.yaml"),
               Layout("fsdp2", n, "bf16", source="accelerate_configs/fsdp2_8gpu.yaml"),
               Layout("zero", n, "bf16", 3, True, True, source="accelerate_configs/deepspeed_zero3_offload.yaml")]
    if n == 1:  # sharding over one GPU saves nothing; offloading still does
        options = options[-1:]
    same = (layout.engine, layout.zero_stage, layout.offload_optimizer, layout.offload_params)
    return [o for o in options if (o.engine, o.zero_stage, o.offload_optimizer, o.offload_params) != same]


def what_to_change(overrides: list[str], layout: Layout, budget: int, memory_ratio: float) -> list[Change]:
    """Changes that bring the per-GPU peak under ``budget`` bytes, each traced: activation checkpointing, the
    largest smaller micro-batch that fits (accumulation raised to keep the tokens per step), the other shipped
    sharded configs."""
    changes: list[Change] = []
    config = load_config(overrides)

    def traced(what: str, extra: list[str], at: Layout) -> Change:
        try:
            peak = int(rank_memory(load_config([*overrides, *extra]), at).peak * memory_ratio)
        except ConfigError as err:
            return Change(f"{what}: not possible ({err})", 0, False)
        return Change(what, peak, peak <= budget)

    if not config.model.gradient_checkpointing:
        changes.append(traced("model.gradient_checkpointing=true", ["model.gradient_checkpointing=true"], layout))
    b, accumulation = config.data.batch_size, config.data.gradient_accumulation_steps
    smaller = b // 2
    while smaller >= 1:
        keep = [f"data.batch_size={smaller}"]
        if b % smaller == 0:  # the same tokens per optimizer step
            keep.append(f"data.gradient_accumulation_steps={accumulation * b // smaller}")
        change = traced(" ".join(keep), keep, layout)
        if change.fits or smaller == 1:
            changes.append(change)
            break
        smaller //= 2
    for other in shipped_alternatives(layout):  # the shipped files are for 8 GPUs
        gpus = f" --gpus {other.processes}" if other.processes != 8 else ""
        changes.append(traced(f"--config {other.source}{gpus} ({other.label})", [], other))
    return changes


def speed(config: Config, layout: Layout, gpu_name: str, calibration: str | None, price: float | None) -> dict:
    """Tokens/s from FLOPs per token and the GPU's peak at a stated MFU; time and cost of the recipe's budget."""
    from hf_streamlm.train.builders import estimate

    d, s = config.data, config.scheduler
    card = gpu(gpu_name)
    flops = estimate(config.model, vocab_of(config), d.sequence_length, d.batch_size)["flops_per_token"]
    cal = read_calibration(calibration, gpu_name)
    if cal is not None:
        mfu, mfu_source = cal.mfu, f"measured: {cal.source}"
    else:
        mfu, row = MFU_ANCHORS[gpu_name]
        mfu_source = f"anchor, not measured here: {row} ({ANCHOR_SOURCE}; docs/performance.md#mfu-anchors)"
    out = {"flops_per_token": flops, "mfu": mfu, "mfu_source": mfu_source, "peak_flops": card.peak_flops,
           "notes": []}
    if layout.offload_optimizer or layout.offload_params:
        out["notes"].append("offload: the MFU is a GPU-resident run's; the host transfers of every step make this one "
                       "slower than planned")
    if config.model.gradient_checkpointing:
        out["notes"].append("activation checkpointing recomputes each block's forward (about a third more compute) "
                            "and the anchors were measured without it: expect fewer tokens/s than this")
    if layout.precision(config) == "fp32":
        out["notes"].append("fp32 run: no 16-bit tensor-core peak applies, so no speed is planned")
        return out
    per_gpu = mfu * card.peak_flops / flops
    tokens_per_step = d.batch_size * d.sequence_length * d.gradient_accumulation_steps * layout.processes
    out.update(tokens_per_s=per_gpu * layout.processes, tokens_per_s_per_gpu=per_gpu, tokens_per_step=tokens_per_step,
               step_seconds=tokens_per_step / (per_gpu * layout.processes))
    steps = math.ceil(s.total_tokens / tokens_per_step) if s.total_tokens else s.total_steps
    if steps is None:
        out["notes"].append("an epoch-based run (scheduler.total_epochs): its length depends on the stream; "
                            "see the time per 1B tokens")
        out["hours_per_billion_tokens"] = 1e9 / out["tokens_per_s"] / 3600
        return out
    hours = steps * tokens_per_step / out["tokens_per_s"] / 3600
    out.update(steps=steps, budget_tokens=steps * tokens_per_step, hours=hours, gpu_hours=hours * layout.processes)
    if price is not None:
        out.update(price_per_gpu_hour=price, cost=hours * layout.processes * price)
    return out


def make_plan(overrides: list[str], gpus: int | None = None, gpu_name: str = "h100-80gb",
              config_file: str | None = None, price: float | None = None, calibration: str | None = None,
              suggest: bool = True) -> dict:
    """The whole plan as a dict (what ``plan --json`` prints)."""
    config = load_config(overrides)
    layout = read_layout(config_file, gpus)
    card = gpu(gpu_name)
    cal = read_calibration(calibration, gpu_name)
    ratio = cal.memory_ratio if cal is not None and cal.memory_ratio else 1.0
    memory = rank_memory(config, layout)
    if layout.compiled or config.runtime.compile:
        memory.notes.append("torch.compile is not traced: the eager step is (Inductor's fused kernels usually hold "
                            "less)")
    peak = int(memory.peak * ratio)
    budget = card.memory - RESERVED
    fits = peak <= budget
    kernels = memory.trace.attention_kernels
    m, d = config.model, config.data
    plan = {
        "recipe": config.recipe, "gpu": gpu_name, "gpu_name": card.name, "gpu_memory": card.memory,
        "gpus": layout.processes, "layout": layout.label, "config_file": layout.source,
        "precision": layout.precision(config), "micro_batch": d.batch_size, "sequence_length": d.sequence_length,
        "accumulation": d.gradient_accumulation_steps, "attention": m.attn_implementation,
        "traced_attention": m.attn_implementation if m.attn_implementation in TRACED_KERNELS else "sdpa",
        "attention_kernels": kernels,
        "scores_materialized": not any(k in name for name in kernels for k in FLASH_KERNELS),
        "gradient_checkpointing": m.gradient_checkpointing,
        "loss_chunk_size": m.loss_chunk_size if m.type == "decoder" else None,
        "fake": memory.trace.fake, "trace_seconds": memory.trace.seconds,
        "parts": memory.parts, "traced_peak": memory.peak, "memory_ratio": ratio,
        "memory_ratio_source": cal.source if cal is not None and cal.memory_ratio else None,
        "peak": peak, "reserved": RESERVED, "headroom": budget - peak, "fits": fits, "notes": memory.notes,
        "speed": speed(config, layout, gpu_name, calibration, price),
    }
    plan["changes"] = [asdict(c) for c in what_to_change(overrides, layout, budget, ratio)] if suggest and not fits else []
    return plan


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def format_plan(plan: dict) -> str:
    """The plan as the text ``hf-streamlm plan`` prints."""
    lines = [(f"plan: recipe {plan['recipe']} on {plan['gpus']} x {plan['gpu']} ({plan['gpu_name']}, "
             f"{plan['gpu_memory'] / GIB:.1f} GiB each), {plan['layout']} ({plan['config_file']})")]
    kernels = ", ".join(plan["attention_kernels"]) or "none"
    scores = "T x T scores materialized" if plan["scores_materialized"] else "no T x T scores kept"
    attention = plan["attention"] if plan["attention"] == plan["traced_attention"] else \
        f"{plan['attention']} (traced as sdpa: the same saved tensors)"
    chunk = plan["loss_chunk_size"]
    lines.append(f"  step traced: micro-batch {plan['micro_batch']} x {plan['sequence_length']} tokens, "
                 f"{min(plan['accumulation'], 2)} of {plan['accumulation']} micro-steps + optimizer step, "
                 f"{plan['precision']}, attention {attention}, activation checkpointing "
                 f"{'on' if plan['gradient_checkpointing'] else 'off'}"
                 + (f", loss chunk {chunk}" if chunk else ", full logits" if chunk == 0 else ""))
    lines.append(f"  on {'fake' if plan['fake'] else 'real'} CPU tensors with the GPU run's dtypes in "
                 f"{plan['trace_seconds']:.1f} s; attention kernel: {kernels} ({scores})")
    lines += [f"  {note}" for note in plan["notes"]]
    lines.append("per GPU                       GiB")
    names = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer state",
             "activations": "activations", "logits": "LM head logits", "communication": "communication buffers"}
    for key, label in names.items():
        lines.append(f"  {label:<24}{_gib(plan['parts'][key])}")
    ratio = plan["memory_ratio"]
    if ratio != 1.0:
        lines.append(f"  traced peak             {_gib(plan['traced_peak'])}  x {ratio:.3f} measured "
                     f"({plan['memory_ratio_source']})")
    else:
        lines.append("  (storage peak of the traced step; the CUDA allocator's caching is not in it: no calibration)")
    lines.append(f"  peak                    {_gib(plan['peak'])}")
    lines.append(f"  GPU memory              {_gib(plan['gpu_memory'])}  ({plan['reserved'] / GIB:.1f} GiB assumed "
                 "for the CUDA context and NCCL)")
    share = plan["headroom"] / plan["gpu_memory"]
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    if plan["fits"] and share < TIGHT and plan["memory_ratio"] == 1.0:
        verdict += " (tight: the allocator's reserve above the live storage, not traced, is often 5-10%)"
    lines.append(f"  headroom                {_gib(plan['headroom'])}  ({share:.0%}): {verdict}")
    if plan["changes"]:
        lines.append("what to change (each traced):")
        for c in plan["changes"]:
            peak = f"peak {c['peak'] / GIB:.2f} GiB, {'fits' if c['fits'] else 'does not fit'}" if c["peak"] else ""
            lines.append(f"  {c['what']}" + (f": {peak}" if peak else ""))
    lines.extend(_speed_lines(plan))
    return "\n".join(lines)


def _speed_lines(plan: dict) -> list[str]:
    s = plan["speed"]
    lines = ["speed and cost",
             f"  FLOPs per token         {s['flops_per_token']:.3g} (6N + 12·L·d·T, as the loop's MFU counts them)",
             f"  MFU                     {s['mfu']:.1%} ({s['mfu_source']})"]
    if "tokens_per_s" in s:
        lines.append(f"  tokens/s                {s['tokens_per_s']:,.0f} ({s['tokens_per_s_per_gpu']:,.0f} per GPU at "
                     f"{s['peak_flops'] / 1e12:g} TFLOP/s peak)")
        lines.append(f"  optimizer step          {s['step_seconds']:.2f} s ({s['tokens_per_step']:,} tokens)")
    if "hours" in s:
        lines.append(f"  budget                  {s['steps']:,} steps = {s['budget_tokens'] / 1e9:,.1f}B tokens: "
                     f"{s['hours']:,.1f} h ({s['hours'] / 24:,.1f} days), {s['gpu_hours']:,.0f} GPU-hours")
    if "hours_per_billion_tokens" in s:
        lines.append(f"  per 1B tokens           {s['hours_per_billion_tokens']:,.2f} h")
    if "cost" in s:
        lines.append(f"  cost                    ${s['cost']:,.0f} at ${s['price_per_gpu_hour']:g} per GPU-hour")
    lines += [f"  {note}" for note in s["notes"]]
    return lines
