"""Typed configuration: one dataclass per section, recipes, dotted overrides, validation.

Sections and key names follow the ``training.yaml`` of the RunPod 1B guide (seed 004): ``model``,
``tokenizer``, ``data``, ``optimizer``, ``scheduler``, ``runtime`` (with ``checkpoint``,
``evaluation``, ``logging``), plus ``hub``. Every field carries a docstring (the string literal under
it), which ``hf-streamlm train --help`` prints.

Precedence: command line > recipe > dataclass defaults (nanoGPT's configurator, torchtitan's config
manager). Unknown keys, wrong types and impossible combinations raise :class:`ConfigError` with a
one-line message naming the key and the valid choices, before anything heavy is built.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import logging
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml

logger = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).parent / "recipes"
"""The shipped recipes: ``recipes/`` at the top of the repository, linked here so wheels carry them."""


class ConfigError(ValueError):
    """Bad user input in a recipe or an override: printed as one line, no traceback."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    preset: str | None = None
    """A named shape (``hf-streamlm models`` lists them) whose values fill this section; keys set in
    the recipe or on the command line win."""
    type: Literal["microbert", "decoder"] = "microbert"
    """Model family: ``microbert`` (BERT masked LM) or ``decoder`` (Llama-style causal LM)."""
    hidden_size: int = 64
    """Width of the residual stream (``hidden_size`` in transformers)."""
    intermediate_size: int | None = None
    """Width of the MLP; ``null`` means 4 x hidden_size (MicroBERT) or the SwiGLU 8/3 x hidden_size,
    rounded up (decoder)."""
    num_layers: int = 2
    """Number of transformer blocks (``num_hidden_layers`` in transformers)."""
    num_attention_heads: int = 2
    """Attention heads per block; must divide hidden_size."""
    num_key_value_heads: int | None = None
    """Key/value heads for grouped-query attention (decoder); ``null`` means num_attention_heads."""
    max_position_embeddings: int = 128
    """Longest sequence the position embeddings cover; data.sequence_length must not exceed it."""
    vocab_size: int | None = None
    """Vocabulary size; ``null`` takes it from the tokenizer (an explicit value must match it)."""
    attn_dropout: float | None = None
    """Dropout on attention probabilities; ``null`` means the family default (0.1 BERT, 0.0 decoder)."""
    residual_dropout: float | None = None
    """Dropout on residual branches and embeddings; ``null`` means the family default."""
    rope_mode: str | None = None
    """Rotary scaling type for the decoder (``linear``, ``dynamic``, ...); ``null`` for none."""
    rope_theta: float | None = None
    """Rotary base frequency for the decoder; ``null`` means 10000."""
    rope_factor: float | None = None
    """Scaling factor of ``rope_mode`` (e.g. 2.0 doubles the usable context); required with it."""
    attn_implementation: str = "sdpa"
    """Attention kernel: ``sdpa`` (PyTorch's fused attention), ``eager`` (explicit softmax; the reference), and
    for the decoder also ``flex_attention`` (packed documents as a block mask that skips masked blocks) or
    ``flash_attention_2``/``flash_attention_3`` (packed documents from restarting positions; needs the
    flash-attn package and a CUDA GPU), or any name registered with transformers' ``AttentionInterface``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    tie_word_embeddings: bool = True
    """Share the input embedding matrix with the output projection."""
    initializer_range: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    pretrained: str | None = None
    """Start from these weights (a Hub id or a folder) instead of a fresh initialisation."""


@dataclass
class TokenizerConfig:
    kind: Literal["wordpiece", "wordlevel", "bpe"] = "wordpiece"
    """Tokenizer trained from the stream when no path/name/tokenizer_json is given."""
    vocab_size: int = 10000
    """Target vocabulary size of a trained tokenizer (seed 003 uses 10,000; seed 004 50,000)."""
    min_frequency: int = 2
    """Least count a token needs to enter a trained vocabulary."""
    train_samples: int | None = 20000
    """Documents of the training stream used to train the tokenizer; ``null`` for all. With
    ``data.max_samples`` set too, the smaller of the two applies."""
    lowercase: bool = True
    """Lowercase before WordPiece/word-level tokenization (as BERT uncased)."""
    path: str | None = None
    """A folder with a saved tokenizer (``tokenizer.json`` ...) to use instead of training one."""
    name: str | None = None
    """A pretrained tokenizer on the Hub (``gpt2``), loaded with ``AutoTokenizer``."""
    tokenizer_json: str | None = None
    """Seed 004 style: path of a ``tokenizer.json`` file."""
    vocab: str | None = None
    """Seed 004 style: path of ``vocab.json`` (BPE, with ``merges``)."""
    merges: str | None = None
    """Seed 004 style: path of ``merges.txt`` (BPE, with ``vocab``)."""
    special_tokens: str | list[str] | None = None
    """Seed 004 style: a JSON file (or a list) of special tokens to add."""


@dataclass
class SourceConfig:
    path: str = "json"
    """A Hub dataset id, a ``datasets`` builder (``json``, ``parquet``, ``text``, ``csv``), or
    ``builtin`` for the corpus shipped with the package."""
    name: str | None = None
    """Dataset configuration name (``wikitext-103-raw-v1``); for ``builtin``, the corpus name."""
    split: str = "train"
    """Split to stream."""
    data_files: str | list[str] | None = None
    """Local files, globs or http(s) URLs for the builders (``corpus.jsonl``, ``data/*.parquet``)."""
    revision: str | None = None
    """Git revision of a Hub dataset."""
    text_column: str = "text"
    """Column holding the document text."""
    weight: float = 1.0
    """Relative sampling weight in a mixture."""
    streaming: bool = True
    """Stream (``true``) or download and cache first (``false``)."""
    max_samples: int | None = None
    """Take at most this many documents from the source (after filtering)."""
    min_words: int = 0
    """Skip documents with fewer whitespace-separated words."""
    cache: bool = False
    """Write this source's processed documents once (Arrow, under ``data.cache_dir``) and read them
    from there on later runs; implied by ``streaming: false``."""
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    """Sources (same keys) tried in order when this one cannot be opened (seed 000's chain); the one
    in use is logged, with why the others failed."""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(path="builtin", name="pydocs")])
    """Where documents come from: a list of sources, mixed by ``weight``."""
    train_shards: list[str] = field(default_factory=list)
    """Seed 004 compatibility: local training files, added as a ``text``/``json`` source."""
    validation_shards: list[str] = field(default_factory=list)
    """Seed 004 compatibility: local validation files used for evaluation."""
    batch_size: int = 16
    """Sequences per device per micro-step."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    shuffle_buffer_size: int = 1000
    """Documents held in the shuffle buffer **per rank** (its DataLoader workers share it equally; a
    buffer larger than the share it shuffles is clamped to it, with a warning); 0 disables shuffling.
    The buffer never mixes passes of the data. The data state holds references, not the text."""
    num_workers: int = 0
    """DataLoader worker processes."""
    worker_start_method: Literal["fork", "spawn", "forkserver"] | None = None
    """How DataLoader workers start; ``null``: the platform's default (Linux: ``fork``, ``forkserver``
    from Python 3.14)."""
    trace_documents: bool = False
    """Write ``<run>/trace/rank-<r>.jsonl``: per optimizer step, the documents whose last token it
    trained on, as ``[source_index, blake2b-64 hex key of the text, epoch]``."""
    cache_dir: str | None = None
    """Cache folder: ``datasets`` downloads go here, and processed sources (``cache: true``) go to
    ``<cache_dir>/processed``; ``null``: the ``datasets`` default for downloads and
    ``.dataset_cache/processed`` (seed 000) for processed sources."""
    sequence_length: int = 128
    """Tokens per packed block."""
    max_samples: int | None = None
    """Stop the training stream after this many documents in all (per pass)."""
    min_words: int = 0
    """Skip documents with fewer words (applies to every source, on top of its own)."""
    stopping_strategy: Literal["first_exhausted", "all_exhausted", "all_exhausted_without_replacement"] = "all_exhausted"
    """When a mixture ends: when its first source runs out, or when all have (``all_exhausted`` repeats
    the documents of sources that ran out meanwhile; ``all_exhausted_without_replacement`` reads every
    document of every source once per pass)."""
    drop_last: bool = True
    """Drop the last partial block (``true``) or pad it (``false``)."""
    document_masking: bool = False
    """Decoder: restart ``position_ids`` at each document inside a packed block and keep attention
    from crossing documents."""
    mlm_probability: float = 0.15
    """Share of tokens masked for MicroBERT (80% [MASK], 10% random, 10% kept)."""
    retries: int = 20
    """Tries of a remote read (``datasets``: dropped connection, 429, 504) and of opening a source
    (hf_streamlm: 429, 5xx, timeouts) before the run stops with an error. Each try already includes
    ``huggingface_hub``'s own 5 quick retries of a file request."""
    retry_backoff: float = 5.0
    """Seconds between those tries (429 and 504 on reads wait four times as long)."""
    eval_holdout: float = 0.02
    """Share of documents held out for evaluation (by a hash of the text) when no
    validation data is given."""


@dataclass
class OptimizerConfig:
    algorithm: Literal["adam_w"] = "adam_w"
    """Optimizer; AdamW as in seed 004."""
    learning_rate: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to biases and norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; ``null`` disables clipping."""


@dataclass
class SchedulerConfig:
    strategy: Literal["cosine_with_warmup", "linear", "constant"] = "cosine_with_warmup"
    """Learning-rate schedule."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to the peak learning rate."""
    total_steps: int | None = 1000
    """Optimizer steps to train for; ``null`` runs total_epochs over the stream."""
    total_epochs: int | None = None
    """Passes over the stream when total_steps is ``null``."""
    total_tokens: int | None = None
    """Token budget: when set, train for ceil(total_tokens / tokens per optimizer step) steps, where a
    step is batch_size x sequence_length x gradient_accumulation_steps x processes (overrides
    total_steps and total_epochs)."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    max_lr: float | None = None
    """Peak learning rate; ``null`` uses optimizer.learning_rate."""


@dataclass
class CheckpointConfig:
    directory: str | None = None
    """Where checkpoints go; ``null`` means ``<output_dir>/checkpoints``."""
    every_n_steps: int | None = 500
    """Save every N optimizer steps (and at the end); ``null`` only at the end."""
    every_n_epochs: int | None = None
    """Save every N passes over the stream."""
    max_keep: int = 3
    """Keep only the newest N checkpoints."""


@dataclass
class BestConfig:
    directory: str | None = None
    """Where best-by-eval-loss checkpoints go; ``null`` means ``<output_dir>/best``."""
    max_keep: int = 1
    """Keep the N best checkpoints."""


@dataclass
class EvaluationConfig:
    every_n_steps: int | None = 200
    """Evaluate every N optimizer steps (and at the end); ``null`` disables periodic eval."""
    every_n_epochs: int | None = None
    """Evaluate every N passes over the stream."""
    max_batches: int = 8
    """Batches of the held-out stream per evaluation (the same batches each time)."""
    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on the main process at every evaluation (decoder only; needs
    ``pip install 'hf_streamlm[eval]'``); results go to history.jsonl as ``lm_eval/<task>/<metric>``."""
    tasks_include_path: str | None = None
    """A folder of your own lm-evaluation-harness task YAMLs (e.g. over a local JSONL), added to the
    built-in tasks."""
    tasks_limit: int | None = None
    """Score at most N documents per task at each evaluation (``null``: all); keeps in-loop evals short."""
    best: BestConfig = field(default_factory=BestConfig)
    """Best-checkpoint retention."""


@dataclass
class LoggingConfig:
    enable_stdout: bool = True
    """Print a line per logged step."""
    tensorboard: str | bool | None = True
    """TensorBoard: ``true`` writes ``<output_dir>/tensorboard``, a path writes there, ``false`` off."""
    tensorboard_flush_every_n: int = 100
    """Flush TensorBoard events every N logged steps."""
    progress_bar: bool = True
    """Show a tqdm progress bar with ETA (main process only)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device at the run's precision, for MFU; ``null`` looks the GPU up in a
    table of known devices (H100/H200, A100, L40S, ...) and omits MFU when it is unknown (CPU)."""


@dataclass
class RuntimeConfig:
    seed: int = 42
    """Seed for model init, data order and masking."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Mixed precision passed to Accelerate (``fp32`` = none); it wins over the launch config's
    ``mixed_precision``. ``auto`` takes the launcher's instead (``accelerate launch --mixed_precision``
    or the config file's), fp32 without one; the resolved value is what ``config.yaml`` records."""
    log_every_n_steps: int = 10
    """Write a history row every N optimizer steps."""
    output_dir: str | None = None
    """Run directory; ``null`` means ``runs/<experiment>``."""
    experiment: str = "default"
    """Experiment name; names the default output directory ``runs/<experiment>``."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint in the run directory), ``never``, or a checkpoint path."""
    compile: bool = False
    """Compile the model with ``torch.compile`` (faster steps after a one-time compilation)."""
    compile_backend: str = "inductor"
    """``torch.compile`` backend (``inductor``; ``aot_eager`` compiles fast, for debugging)."""
    export_format: Literal["native", "custom"] = "native"
    """Format of the final ``export/``: stock transformers classes or the project's own."""
    on_nonfinite: Literal["skip", "stop"] = "skip"
    """NaN/inf loss or gradient norm: ``skip`` drops that optimizer step (no update; counted in
    history as ``nonfinite_skips``), ``stop`` saves the last good state and exits with status 3."""
    max_nonfinite_skips: int = 25
    """With on_nonfinite=skip: stop as ``stop`` would after this many consecutive skipped steps."""
    demo_sentences: list[str] = field(default_factory=list)
    """Printed at the end: MicroBERT's top-5 guesses for these masked sentences; a decoder's greedy
    continuation of these prompts."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Periodic checkpoints."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Periodic evaluation on held-out data."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Where metrics go."""


@dataclass
class HubConfig:
    push: bool = False
    """Push the final export to the Hub."""
    repo_id: str | None = None
    """Target repository (``user/name``); required when push is true."""
    private: bool = True
    """Create the repository as private."""
    revision: str | None = None
    """Branch to push to; ``null`` for the default branch."""
    commit_message: str = "Upload model trained with hf_streamlm"
    """Commit message of the push."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer: trained from the stream, or loaded."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data stream."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """The learning-rate schedule and run length."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Seeds, precision, output, checkpoints, evaluation, logging."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Publishing to the Hugging Face Hub."""
    recipe: str | None = None
    """The recipe this config was built from (set by the loader)."""

    @property
    def output_dir(self) -> Path:
        return Path(self.runtime.output_dir or Path("runs") / self.runtime.experiment)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_yaml())


# --------------------------------------------------------------------------------------------------
# Field docs (the string literal under each field)
# --------------------------------------------------------------------------------------------------


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a config dataclass to the docstring written under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def iter_keys(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any, str]]:
    """Yield ``(dotted key, type, doc)`` for every leaf field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_keys(hints[f.name], key + ".")
        else:
            yield key, hints[f.name], field_docs(cls).get(f.name, "")


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the key
# --------------------------------------------------------------------------------------------------


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(valid)}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"'{key}' must be {type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"'{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            if dataclasses.is_dataclass(item) and isinstance(value, dict):
                value = [value]
            else:
                raise ConfigError(f"'{key}' must be a list of {type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping of {tp.__name__} keys, got {value!r}")
        return build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # YAML reads 1e6 as a float
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this file, not user input


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) mapping, refusing unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(prefix + str(key), names)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# Recipes and overrides
# --------------------------------------------------------------------------------------------------


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """``quickstart`` -> the shipped recipe; ``path/to/x.yaml`` -> that file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"recipe file '{name}' does not exist")
        return candidate
    shipped = RECIPES_DIR / f"{name}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"unknown recipe '{name}'. Available recipes: {', '.join(available_recipes())}")
    return shipped


def read_recipe(name: str) -> dict[str, Any]:
    path = recipe_path(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"recipe '{path}'{where} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(arg: str) -> tuple[list[str], Any]:
    """``optimizer.learning_rate=3e-4`` -> (["optimizer", "learning_rate"], 0.0003); values are YAML."""
    if "=" not in arg:
        raise ConfigError(f"argument '{arg}' is not of the form key=value (e.g. optimizer.learning_rate=3e-4)")
    key, raw = arg.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"argument '{arg}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: take it as the plain string the user typed
    # YAML 1.1 reads '3e-4' as a string (it wants '3.0e-4'); people type the former.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and not value.isalpha() else value
        except ValueError:
            pass
    return key.split("."), value


def _nest(parts: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _fix_yaml_floats(data: Any) -> Any:
    """PyYAML follows YAML 1.1, where ``1.8e-4`` without a dot in the mantissa is a string."""
    if isinstance(data, dict):
        return {k: _fix_yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_yaml_floats(v) for v in data]
    if isinstance(data, str):
        try:
            return float(data) if data.strip() and "e" in data.lower() and data.lower() not in ("e",) else data
        except ValueError:
            return data
    return data


def _apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Put a ``model.preset``'s values under the model section (recipe and command line win)."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("preset") is None:
        return data
    from hf_streamlm.models.presets import MODEL_PRESETS

    name = model["preset"]
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown 'model.preset' {name!r}. Presets: {', '.join(MODEL_PRESETS)}")
    return {**data, "model": _merge(MODEL_PRESETS[name], model)}


DECODER_ONLY_KEYS = ("num_key_value_heads", "rope_mode", "rope_theta", "rope_factor")
"""Model keys only a decoder has: a recipe that uses them without ``model.type`` (seed 004's
training.yaml, written for a decoder-only tool) means a decoder."""


def _infer_family(data: dict[str, Any]) -> None:
    model = data.get("model")
    if isinstance(model, dict) and "type" not in model and any(k in model for k in DECODER_ONLY_KEYS):
        model["type"] = "decoder"
        logger.info("model.type is not set but the model section has decoder keys (%s): model.type=decoder",
                    ", ".join(k for k in DECODER_ONLY_KEYS if k in model))


def load_config(args: list[str] | None = None, recipe: str | None = None) -> Config:
    """Resolve ``recipe=NAME key=value ...`` into a validated :class:`Config`.

    Precedence: command line > recipe > defaults.
    """
    args = list(args or [])
    overrides: dict[str, Any] = {}
    for arg in args:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
            continue
        parts, value = parse_override(arg)
        overrides = _merge(overrides, _nest(parts, value))
    data = _fix_yaml_floats(read_recipe(recipe)) if recipe else {}
    data = _merge(data, _fix_yaml_floats(overrides))
    data = _apply_preset(data)
    _infer_family(data)
    if recipe and not (data.get("data") or {}).get("sources") and not (data.get("data") or {}).get("train_shards"):
        logger.warning("recipe %s sets neither data.sources nor data.train_shards: training on the built-in "
                       "pydocs corpus", recipe)
    data["recipe"] = recipe
    config = build(Config, data)
    validate(config)
    return config


# --------------------------------------------------------------------------------------------------
# Cross-field validation
# --------------------------------------------------------------------------------------------------


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
    if m.type == "microbert" and m.attn_implementation not in ("sdpa", "eager"):
        raise ConfigError(
            f"'model.attn_implementation' of a microbert must be sdpa or eager; got {m.attn_implementation!r}"
        )
    if m.attn_implementation == "flex_attention" and (m.attn_dropout or 0) > 0:
        raise ConfigError(
            "'model.attn_implementation' flex_attention has no attention dropout: set 'model.attn_dropout' to 0"
        )
    if m.type == "microbert" and (m.rope_mode or m.rope_theta or m.rope_factor):
        raise ConfigError("'model.rope_mode'/'model.rope_theta'/'model.rope_factor' apply to model.type=decoder")
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
    if d.document_masking and m.type != "decoder":
        raise ConfigError("'data.document_masking' applies to model.type=decoder (MicroBERT blocks are [CLS]..[SEP])")
    _positive("data.retries", d.retries, allow_zero=True)
    _positive("data.retry_backoff", d.retry_backoff, allow_zero=True)
    if not 0 < d.mlm_probability < 1:
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
    for key in ("beta1", "beta2"):
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
    _positive("runtime.logging.peak_tflops", r.logging.peak_tflops)
    if r.resume not in ("auto", "never") and not Path(r.resume).exists():
        raise ConfigError(f"'runtime.resume' must be auto, never or an existing checkpoint path; got {r.resume!r}")
    if c.hub.push and not c.hub.repo_id:
        raise ConfigError("'hub.push' is true but 'hub.repo_id' is not set")


def describe() -> str:
    """All keys with their types, defaults and docs (for ``--help``)."""
    defaults = dataclasses.asdict(Config())
    lines = []
    for key, tp, doc in iter_keys():
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        lines.append(f"  {key} ({type_name(tp)}, default {value!r})\n      {doc}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """``docs/configuration.md``: every key with type, default and doc, generated from the dataclasses."""
    defaults = dataclasses.asdict(Config())
    lines = [
        "# Configuration reference",
        "",
        "A recipe is a YAML file of the sections below; any key can be overridden on the command line as",
        "`section.key=value` (values are YAML). Precedence: command line > recipe > defaults. Unknown keys,",
        "wrong types and impossible combinations stop the run with a one-line error naming the key.",
        "",
        "`python -m hf_streamlm.run --help` prints this list; `hf-streamlm config recipe=NAME [overrides]`",
        "prints a resolved config. This page is generated from `hf_streamlm/config.py` by",
        "`hf-streamlm config --reference > docs/configuration.md`; a test keeps it in sync.",
    ]
    section = None
    for key, tp, doc in iter_keys():
        top = key.split(".")[0]
        if top != section:
            section = top
            lines += ["", f"## `{top}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        kind = type_name(tp).replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | `{value!r}` | {' '.join(doc.split())} |")
    return "\n".join(lines) + "\n"
