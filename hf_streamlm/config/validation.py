"""Cross-field validation: impossible combinations refused before anything is built.

Types and unknown keys are refused while building (:mod:`.schema`); this module checks what one field
cannot see alone (divisibility, ranges, keys that go together), each error naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_streamlm.config.errors import ConfigError
from hf_streamlm.config.schema import build
from hf_streamlm.config.sections import Config, SchedulerConfig, SourceConfig


def _positive(key: str, value: int | float | None, allow_none: bool = True, allow_zero: bool = False) -> None:
    if value is None:
        if not allow_none:
            raise ConfigError(f"'{key}' must be set")
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"'{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _validate_source(s: SourceConfig, where: str) -> None:
    if s.path == "builtin":
        from hf_streamlm.data.corpus import BUILTIN_CORPORA

        if s.name not in BUILTIN_CORPORA:
            raise ConfigError(f"'{where}.name' must name a builtin corpus: {', '.join(BUILTIN_CORPORA)}; got {s.name!r}")
    elif s.path in ("json", "parquet", "text", "csv", "arrow") and not s.data_files:
        raise ConfigError(f"'{where}.data_files' is required for path: {s.path}")
    if s.max_samples is not None and s.max_samples <= 0:
        raise ConfigError(f"'{where}.max_samples' must be > 0, got {s.max_samples}")


def validate(c: Config) -> None:
    """Refuse impossible combinations before anything is built."""
    m = c.model
    for key in ("hidden_size", "num_layers", "num_attention_heads", "max_position_embeddings"):
        _positive(f"model.{key}", getattr(m, key))
    for key in ("intermediate_size", "num_key_value_heads", "vocab_size"):
        _positive(f"model.{key}", getattr(m, key))
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"'model.hidden_size' ({m.hidden_size}) must be divisible by 'model.num_attention_heads' "
            f"({m.num_attention_heads})"
        )
    if m.num_key_value_heads is not None and m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(
            f"'model.num_attention_heads' ({m.num_attention_heads}) must be divisible by "
            f"'model.num_key_value_heads' ({m.num_key_value_heads})"
        )
    for key in ("attn_dropout", "residual_dropout"):
        value = getattr(m, key)
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"'model.{key}' must be in [0, 1), got {value}")
    if m.loss_chunk_size < 0:
        raise ConfigError(f"'model.loss_chunk_size' must be >= 0 (0 = full logits), got {m.loss_chunk_size}")
    if not m.z_loss >= 0:
        raise ConfigError(f"'model.z_loss' must be >= 0 (0 = none), got {m.z_loss}")
    if m.z_loss and m.type != "decoder":
        raise ConfigError("'model.z_loss' is for model.type=decoder (MicroBERT's masked LM has none): remove it")
    modern = m.type == "microbert" and m.architecture == "modern"
    if m.architecture == "modern" and m.type != "microbert":
        raise ConfigError("'model.architecture' modern is a MicroBERT tier: set model.type=microbert or remove it")
    if m.type == "microbert" and not modern and m.attn_implementation not in ("sdpa", "eager"):
        raise ConfigError(
            f"'model.attn_implementation' of a classic microbert must be sdpa or eager; got {m.attn_implementation!r} "
            "(model.architecture=modern also runs flex_attention and flash_attention_2/3)"
        )
    modern_keys = ("local_rope_theta", "local_attention", "global_attn_every_n_layers")
    misplaced = [f"'model.{key}'" for key in modern_keys if getattr(m, key) is not None]
    if not modern and misplaced:
        raise ConfigError(f"{', '.join(misplaced)}: for model.architecture=modern (model.type=microbert) only")
    for key in (*modern_keys, "rope_theta"):
        _positive(f"model.{key}", getattr(m, key))
    if modern and (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError(
            f"'model.hidden_size' / 'model.num_attention_heads' ({m.hidden_size // m.num_attention_heads}) must be "
            "even for the modern MicroBERT's rotary positions"
        )
    if m.attn_implementation == "flex_attention" and (m.attn_dropout or 0) > 0:
        raise ConfigError(
            "'model.attn_implementation' flex_attention has no attention dropout: set 'model.attn_dropout' to 0"
        )
    if m.type == "microbert" and (m.rope_mode or m.rope_factor or (m.rope_theta and not modern)):
        if modern:
            raise ConfigError("'model.rope_mode'/'model.rope_factor' apply to model.type=decoder (the modern "
                              "MicroBERT takes 'model.rope_theta' and 'model.local_rope_theta', no scaling)")
        raise ConfigError("'model.rope_mode'/'model.rope_theta'/'model.rope_factor' apply to model.type=decoder "
                          "(and 'model.rope_theta' to model.architecture=modern)")
    if m.rope_mode is not None and m.rope_mode not in ("linear", "dynamic"):
        raise ConfigError(f"'model.rope_mode' must be linear, dynamic or null; got {m.rope_mode!r}")
    if (m.rope_mode is None) != (m.rope_factor is None):
        raise ConfigError("'model.rope_mode' and 'model.rope_factor' go together: set both or neither")

    d = c.data
    if d.sequence_length > m.max_position_embeddings:
        raise ConfigError(
            f"'data.sequence_length' ({d.sequence_length}) exceeds 'model.max_position_embeddings' "
            f"({m.max_position_embeddings})"
        )
    for key in ("batch_size", "gradient_accumulation_steps", "sequence_length"):
        _positive(f"data.{key}", getattr(d, key), allow_none=False)
    _positive("data.shuffle_buffer_size", d.shuffle_buffer_size, allow_zero=True)
    _positive("data.block_shuffle_size", d.block_shuffle_size, allow_zero=True)
    _positive("data.num_workers", d.num_workers, allow_zero=True)
    if not d.sources and not d.train_shards:
        raise ConfigError("'data.sources' is empty: give at least one source (or data.train_shards)")
    for i, s in enumerate(d.sources):
        for j, fallback in enumerate(s.fallbacks):
            _validate_source(build(SourceConfig, fallback, f"data.sources[{i}].fallbacks[{j}]."),
                             f"data.sources[{i}].fallbacks[{j}]")
        if s.weight <= 0:
            raise ConfigError(f"'data.sources[{i}].weight' must be > 0, got {s.weight}")
        _validate_source(s, f"data.sources[{i}]")
    if d.document_masking and m.type != "decoder" and not modern:
        raise ConfigError("'data.document_masking' applies to model.type=decoder and model.architecture=modern "
                          "(the classic MicroBERT has learned positions and no document mask)")
    _positive("data.retries", d.retries, allow_zero=True)
    _positive("data.retry_backoff", d.retry_backoff, allow_zero=True)
    if not isinstance(d.mlm_probability, list) and not 0 < d.mlm_probability < 1:
        raise ConfigError(f"'data.mlm_probability' must be in (0, 1), got {d.mlm_probability}")
    if not 0 <= d.eval_holdout < 1:
        raise ConfigError(f"'data.eval_holdout' must be in [0, 1), got {d.eval_holdout}")

    t = c.tokenizer
    _positive("tokenizer.vocab_size", t.vocab_size)
    if m.type == "decoder" and t.kind != "bpe" and not (t.path or t.name or t.tokenizer_json or t.vocab):
        raise ConfigError("model.type=decoder trains a byte-level tokenizer: set 'tokenizer.kind' to bpe")
    if bool(t.vocab) != bool(t.merges):
        raise ConfigError("'tokenizer.vocab' and 'tokenizer.merges' go together: give both or neither")

    o, s = c.optimizer, c.scheduler
    _positive("optimizer.learning_rate", o.learning_rate, allow_none=False)
    _positive("optimizer.max_grad_norm", o.max_grad_norm)
    _positive("optimizer.weight_decay", o.weight_decay, allow_zero=True)
    for key in ("beta1", "beta2", "muon_momentum"):
        if not 0 <= getattr(o, key) < 1:
            raise ConfigError(f"'optimizer.{key}' must be in [0, 1), got {getattr(o, key)}")
    if s.total_steps is None and s.total_epochs is None and s.total_tokens is None:
        raise ConfigError("set 'scheduler.total_steps', 'scheduler.total_epochs' or 'scheduler.total_tokens' (all are null)")
    _positive("scheduler.total_steps", s.total_steps)
    _positive("scheduler.total_epochs", s.total_epochs)
    _positive("scheduler.total_tokens", s.total_tokens)
    _positive("scheduler.warmup_steps", s.warmup_steps, allow_zero=True)
    if s.total_steps is not None and s.total_tokens is None and s.warmup_steps > s.total_steps:
        raise ConfigError(
            f"'scheduler.warmup_steps' ({s.warmup_steps}) exceeds 'scheduler.total_steps' ({s.total_steps})"
        )
    _positive("scheduler.decay_steps", s.decay_steps)
    if s.strategy != "wsd" and s.decay_steps is not None:
        raise ConfigError(f"'scheduler.decay_steps' is for strategy wsd, not {s.strategy}: remove it or set strategy wsd")
    if s.strategy == "wsd" and s.total_steps is not None and s.total_tokens is None:
        wsd_steps(s, s.total_steps)
    peak = s.max_lr if s.max_lr is not None else o.learning_rate
    if s.min_lr > peak:
        raise ConfigError(f"'scheduler.min_lr' ({s.min_lr}) exceeds the peak learning rate ({peak})")

    r = c.runtime
    _positive("runtime.log_every_n_steps", r.log_every_n_steps, allow_none=False)
    _positive("runtime.checkpoint.every_n_steps", r.checkpoint.every_n_steps)
    _positive("runtime.checkpoint.max_keep", r.checkpoint.max_keep)
    _positive("runtime.evaluation.every_n_steps", r.evaluation.every_n_steps)
    _positive("runtime.evaluation.max_batches", r.evaluation.max_batches)
    _positive("runtime.evaluation.best.max_keep", r.evaluation.best.max_keep, allow_zero=True)
    _positive("runtime.evaluation.tasks_limit", r.evaluation.tasks_limit)
    if r.evaluation.tasks and m.type != "decoder":
        raise ConfigError("'runtime.evaluation.tasks' applies to model.type=decoder: lm-evaluation-harness scores "
                          "causal LMs; MicroBERT's downstream figure is its masked-token accuracy (eval_accuracy)")
    _positive("runtime.max_nonfinite_skips", r.max_nonfinite_skips, allow_none=False)
    _positive("runtime.spikes.sigma", r.spikes.sigma, allow_none=False)
    _positive("runtime.spikes.window", r.spikes.window, allow_none=False)
    _positive("runtime.spikes.min_steps", r.spikes.min_steps, allow_none=False)
    _positive("runtime.spikes.rollback_within", r.spikes.rollback_within, allow_none=False)
    _positive("runtime.spikes.rollback_after", r.spikes.rollback_after, allow_none=False, allow_zero=True)
    _positive("runtime.spikes.max_rollbacks", r.spikes.max_rollbacks, allow_none=False, allow_zero=True)
    if r.spikes.min_steps < 2 or r.spikes.min_steps > r.spikes.window:
        raise ConfigError(f"'runtime.spikes.min_steps' must be from 2 (a standard deviation needs two steps) to "
                          f"runtime.spikes.window ({r.spikes.window}), got {r.spikes.min_steps}")
    _positive("runtime.logging.peak_tflops", r.logging.peak_tflops)
    check_report_to(r.logging.report_to)
    if r.resume.startswith("hub:"):
        repo_id, _, revision = r.resume.removeprefix("hub:").partition("@")
        if not repo_id or "@" in r.resume and not revision:
            raise ConfigError(f"'runtime.resume' from the Hub is hub:<repo_id>[@revision] (hub:me/run-1, "
                              f"hub:me/run-1@step-1500); got {r.resume!r}")
    elif r.resume not in ("auto", "never") and not Path(r.resume).exists():
        raise ConfigError(f"'runtime.resume' must be auto, never, hub:<repo_id>[@revision] or an existing checkpoint "
                          f"path; got {r.resume!r}")
    h = c.hub
    if h.push and not h.repo_id:
        raise ConfigError("'hub.push' is true but 'hub.repo_id' is not set")
    _positive("hub.keep_every_n_steps", h.keep_every_n_steps)
    _positive("hub.min_commit_interval", h.min_commit_interval, allow_none=False, allow_zero=True)
    _positive("hub.retries", h.retries, allow_none=False, allow_zero=True)
    _positive("hub.retry_backoff", h.retry_backoff, allow_none=False, allow_zero=True)
    _positive("hub.flush_timeout", h.flush_timeout, allow_none=False, allow_zero=True)


def known_trackers() -> list[str]:
    from accelerate.utils import LoggerType

    return [str(t.value) for t in LoggerType if t.value != "all"]


def check_report_to(value: Any) -> None:
    """Names Accelerate knows, ``none`` or ``all`` (config validation: no import of any tracker)."""
    names = [value] if isinstance(value, str) else list(value or [])
    valid = known_trackers()
    for name in names:
        if str(name).lower() not in (*valid, "none", "all"):
            raise ConfigError(f"'runtime.logging.report_to' has {name!r}; choose from: none, all, {', '.join(valid)}")
    if len(names) > 1 and {"none", "all"} & {str(n).lower() for n in names}:
        raise ConfigError(f"'runtime.logging.report_to': none and all stand alone, got {names}")


def wsd_steps(s: SchedulerConfig, total_steps: int) -> tuple[int, int]:
    """``(stable, decay)`` steps of a ``wsd`` schedule of ``total_steps`` (the warm-up comes first); a
    ``ConfigError`` when warm-up and decay do not fit in the run."""
    decay = s.decay_steps if s.decay_steps is not None else round(total_steps / 5)
    if s.warmup_steps + decay > total_steps:
        raise ConfigError(
            f"'scheduler.warmup_steps' ({s.warmup_steps}) + 'scheduler.decay_steps' ({decay}) exceed the run's "
            f"{total_steps} steps"
        )
    return total_steps - s.warmup_steps - decay, decay
