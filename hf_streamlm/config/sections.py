"""One dataclass per config section, a docstring under every field (``--help`` and the reference print them).

Sections and key names follow the ``training.yaml`` of the RunPod 1B guide (seed 004): ``model``,
``tokenizer``, ``data``, ``optimizer``, ``scheduler``, ``runtime`` (with ``checkpoint``,
``evaluation``, ``logging``), plus ``hub``. Plain data only: loading is in :mod:`.recipes`, checks in
:mod:`.validation`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
class ModelConfig:
    preset: str | None = None
    """A named shape (``hf-streamlm models`` lists them) whose values fill this section; keys set in
    the recipe or on the command line win."""
    type: Literal["microbert", "decoder"] = "microbert"
    """Model family: ``microbert`` (BERT masked LM) or ``decoder`` (Llama-style causal LM)."""
    architecture: Literal["classic", "modern"] = "classic"
    """MicroBERT's design: ``classic`` (BERT: learned positions, post-LayerNorm, GELU MLP; native export
    ``BertForMaskedLM``) or ``modern`` (ModernBERT: rotary positions, pre-LayerNorm, GeGLU MLP, no biases,
    alternating local/global attention; native export ``ModernBertForMaskedLM``). See docs/models.md."""
    hidden_size: int = 64
    """Width of the residual stream (``hidden_size`` in transformers)."""
    intermediate_size: int | None = None
    """Width of the MLP; ``null`` means 4 x hidden_size (MicroBERT), 1.5 x hidden_size rounded up (modern
    MicroBERT's GeGLU, ModernBERT-base's ratio) or the SwiGLU 8/3 x hidden_size, rounded up (decoder)."""
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
    """Rotary base frequency for the decoder; ``null`` means 10000. For the modern MicroBERT, the base of its
    global layers; ``null`` means ModernBERT's 160000."""
    local_rope_theta: float | None = None
    """Modern MicroBERT: rotary base of the local (sliding-window) layers; ``null`` means ModernBERT's 10000."""
    local_attention: int | None = None
    """Modern MicroBERT: width of the local layers' sliding window (a token sees ``local_attention // 2`` tokens
    on each side); ``null`` means ModernBERT's 128."""
    global_attn_every_n_layers: int | None = None
    """Modern MicroBERT: layer ``i`` attends to the whole sequence when ``i % n == 0``, the others within the
    window; ``null`` means ModernBERT's 3, ``1`` makes every layer global."""
    rope_factor: float | None = None
    """Scaling factor of ``rope_mode`` (e.g. 2.0 doubles the usable context); required with it."""
    attn_implementation: str = "sdpa"
    """Attention kernel: ``sdpa`` (PyTorch's fused attention), ``eager`` (explicit softmax; the reference), and
    for the decoder and the modern MicroBERT also ``flex_attention`` (packed documents as a block mask that
    skips masked blocks) or
    ``flash_attention_2``/``flash_attention_3`` (packed documents from restarting positions; needs the
    flash-attn package and a CUDA GPU), or any name registered with transformers' ``AttentionInterface``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    loss_chunk_size: int = 512
    """Decoder training steps compute the LM head and the cross entropy together, this many positions at a time,
    without building the (batch, sequence, vocabulary) logits; ``0`` builds them as stock Llama does."""
    z_loss: float = 0.0
    """Decoder: coefficient of the z-loss added to the training loss, the mean of log(Z)^2 (Z: the softmax's
    normaliser; PaLM and OLMo use 1e-4), which keeps the output logits from drifting; logged as ``z_loss``, the
    logged ``loss`` stays the cross entropy. ``0`` disables it."""
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
    ``data.max_samples`` set too, the smaller of the two applies, and the documents are part of the capped pass."""
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
    """Git revision of a Hub dataset (branch, tag or commit); ``null``: its default branch."""
    pinned_revision: str | None = None
    """The commit a Hub source resolved to at the run's first start, written by the run into
    ``config.yaml``, checkpoints and the model card; a resume reads this commit, not the branch's
    current head. Leave unset (or set a commit sha to read exactly that)."""
    text_column: str = "text"
    """Column holding the document text."""
    weight: float = 1.0
    """Relative sampling weight in a mixture (``data.schedule``, when set, gives the weights instead)."""
    label: str | None = None
    """The source's name in ``data.schedule``, logs (``source_tokens/<label>``) and the model card; ``null``: its
    short name (``pydocs``, ``HuggingFaceFW/fineweb``, ``json:a.jsonl``)."""
    streaming: bool = True
    """Stream (``true``) or download and cache first (``false``)."""
    max_samples: int | None = None
    """Take at most this many documents from the source (after filtering), spread over its shards the
    way ``data.max_samples`` is: the same documents on every layout."""
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
    block_shuffle_size: int = 0
    """Packed blocks held in a second shuffle buffer, after packing, **per rank** (its DataLoader workers share
    it equally); 0 disables it. Packing a stream puts a document's blocks next to each other, so without it a batch
    holds several blocks of the same documents, where run_clm draws its blocks from the whole corpus. Never mixes
    passes. The data state holds these blocks' tokens: block_shuffle_size x sequence_length x 4 bytes per rank."""
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
    """Documents in each pass of the training stream: the first few of each source shard (up to
    the cap's share of it), the same documents on every number of ranks and workers (docs/data.md, "A capped
    pass"); ``null``: the whole stream."""
    min_words: int = 0
    """Skip documents with fewer words (applies to every source, on top of its own)."""
    stopping_strategy: Literal["first_exhausted", "all_exhausted", "all_exhausted_without_replacement"] = "all_exhausted"
    """When a mixture ends: when its first source runs out, or when all have (``all_exhausted`` repeats
    the documents of sources that ran out meanwhile; ``all_exhausted_without_replacement`` reads every
    document of every source once per pass)."""
    drop_last: bool = True
    """Drop the last partial block (``true``) or pad it (``false``)."""
    document_masking: bool = False
    """Decoder and modern MicroBERT: restart ``position_ids`` at each document inside a packed block and keep
    attention from crossing documents."""
    mix_by: Literal["documents", "tokens"] = "documents"
    """How sources are mixed: ``documents`` (a source's share of documents follows its weight; without a
    ``schedule``, ``datasets.interleave_datasets`` draws them) or ``tokens`` (its share of trained tokens does,
    whatever its documents' lengths). With ``tokens`` or a ``schedule`` each source is read, shuffled and
    tokenized on its own and the pipeline mixes whole documents (docs/data.md, "Data schedules")."""
    schedule: list[dict[str, Any]] = field(default_factory=list)
    """Stages of the mixture by tokens trained: ``{until, weights: {label: weight}, interpolate}`` (``none`` or
    ``linear``); ``until`` up to 1 is a fraction of the run's tokens, above 1 a number of tokens. Sources a stage does not
    name are not read in it; the last stage holds to the end of the run (docs/data.md, "Data schedules")."""
    mlm_probability: float | list[dict[str, Any]] = 0.15
    """Share of tokens masked for MicroBERT (80% [MASK], 10% random, 10% kept); or stages
    ``{until, value, interpolate}`` keyed as ``schedule`` is (mmBERT's 0.3 -> 0.15 -> 0.05). Evaluations mask at
    the first rate."""
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
    algorithm: Literal["adam_w", "muon"] = "adam_w"
    """Optimizer: ``adam_w`` (seed 004), or ``muon``: Muon (``torch.optim.Muon``) for the weights of the blocks'
    linear layers, AdamW for embeddings, the LM head, norms and biases. Muon scales its update to AdamW's size
    (``match_rms_adamw``), so learning_rate and weight_decay carry over. Needs whole matrices on each process:
    single device or DDP, not DeepSpeed ZeRO or FSDP."""
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
    muon_momentum: float = 0.95
    """``muon``: momentum of its update (Nesterov)."""


@dataclass
class SchedulerConfig:
    strategy: Literal["cosine_with_warmup", "linear", "constant", "wsd"] = "cosine_with_warmup"
    """Learning-rate schedule. ``wsd``: warm-up, then the peak rate held (stable), then a decay to min_lr over
    the last decay_steps; a run resumed in its stable phase with a larger total_steps trains as if planned
    that long."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 (``wsd``: from min_lr) to the peak learning rate."""
    total_steps: int | None = 1000
    """Optimizer steps to train for; ``null`` runs total_epochs over the stream."""
    total_epochs: int | None = None
    """Passes over the stream when total_steps is ``null``."""
    total_tokens: int | None = None
    """Token budget: when set, train for ceil(total_tokens / tokens per optimizer step) steps, where a
    step is batch_size x sequence_length x gradient_accumulation_steps x processes (overrides
    total_steps and total_epochs)."""
    decay_steps: int | None = None
    """``wsd``: steps of the final decay; ``null`` means a fifth of the run (fix it to extend a run later)."""
    decay_shape: Literal["1-sqrt", "linear", "cosine"] = "1-sqrt"
    """``wsd``: shape of the final decay (Hägele et al. 2024 found 1-sqrt best)."""
    min_lr: float = 0.0
    """Floor of the cosine and wsd schedules."""
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
    report_to: str | list[str] = "tensorboard"
    """Experiment trackers, by Accelerate's names (``tensorboard``, ``wandb``, ``mlflow``, ``comet_ml``,
    ``aim``, ``clearml``, ``dvclive``, ``swanlab``, ``trackio``), one or a list; ``all``: every one
    installed, ``none``: none (transformers' ``report_to``). They get the resolved config at the start and
    every logged row; W&B and MLflow name the project ``runtime.experiment``. A tracker that is not
    installed stops the run before it starts, naming the package to install."""
    tensorboard: str | bool | None = True
    """TensorBoard: ``true`` writes ``<output_dir>/tensorboard``, a path writes there, ``false`` off
    (even when ``report_to`` names it)."""
    tensorboard_flush_every_n: int = 100
    """Flush TensorBoard events every N logged steps."""
    progress_bar: bool = True
    """Show a tqdm progress bar with ETA (main process only)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device at the run's precision, for MFU; ``null`` looks the GPU up in a
    table of known devices (H100/H200, A100, L40S, ...) and omits MFU when it is unknown (CPU)."""


@dataclass
class SpikesConfig:
    """Loss spikes (docs/stability.md): a step whose loss or gradient norm is more than ``sigma`` standard
    deviations above the mean of the last ``window`` applied steps is not applied. Defaults are OLMo-core's
    ``SkipStepAdamW`` (``sigma_factor=6``, ``rolling_interval_length=128``, active from half the window)."""

    enabled: bool = False
    """Skip spiking steps: the update is not applied (weights and optimizer state untouched), the step is counted
    in history as ``spike_skips`` and described in ``<output_dir>/spikes.jsonl``."""
    sigma: float = 6.0
    """How many standard deviations above the window's mean a step's loss or gradient norm must be to be skipped."""
    window: int = 128
    """Steps in the rolling window the mean and standard deviation are computed over (part of every checkpoint)."""
    min_steps: int = 64
    """Steps the window must hold before any step is judged (OLMo-core: half the window)."""
    rollback_after: int = 3
    """Roll back after this many skipped steps within ``rollback_within`` steps: the run returns to the last
    checkpoint before the first of them and skips their documents (``<output_dir>/skipped_documents.jsonl``); 0: never
    roll back, skip spikes one by one."""
    rollback_within: int = 128
    """The span of steps (the window's default) in which ``rollback_after`` skipped steps trigger a rollback."""
    max_rollbacks: int = 3
    """Rollbacks a run may make; at the next one due it stops instead (one line, exit status 5)."""


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
    """``auto`` (the checkpoint the run last completed, named by ``checkpoints/latest.json``; without it the newest
    complete one; with no complete one and ``hub.repo_id`` set, the newest complete one on the Hub), ``never``, a
    checkpoint path (newer checkpoints of the run are then moved aside), or ``hub:<repo_id>[@revision]``: the newest
    complete checkpoint pushed there (``hub.strategy``), downloaded into the run's checkpoints first."""
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
    spikes: SpikesConfig = field(default_factory=SpikesConfig)
    """Finite loss spikes: skip the step (off by default)."""
    demo_sentences: list[str] = field(default_factory=list)
    """Printed at the end: MicroBERT's top-5 guesses for these masked sentences (``[MASK]``, or
    ``[MASK=word]`` to also print the true word's rank); a decoder's greedy continuation of these prompts."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Periodic checkpoints."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Periodic evaluation on held-out data."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Where metrics go."""


@dataclass
class HubConfig:
    push: bool = False
    """Push to the Hub: the final export, and during training what ``strategy`` says (uploaded in the background
    by the main process; training never waits for the network)."""
    repo_id: str | None = None
    """Target repository (``user/name``); required when push is true."""
    private: bool = True
    """Create the repository as private."""
    revision: str | None = None
    """Branch to push to (and where ``runtime.resume=auto`` looks for checkpoints); ``null`` for the default branch."""
    commit_message: str = "Upload model trained with hf_streamlm"
    """Commit message of the push; a checkpoint's commit adds its step (``... (step 1500)``)."""
    strategy: Literal["end", "every_save", "checkpoint", "all_checkpoints"] = "end"
    """What is pushed when (transformers' ``hub_strategy``): ``end`` the final export only; ``every_save`` also the
    export of every checkpoint (at the repository's root); ``checkpoint`` also the checkpoint itself under
    ``checkpoints/step-<N>/``, the newest one kept (older ones deleted by the same commit): a run resumes from it on an
    empty machine; ``all_checkpoints`` every checkpoint kept. One commit per checkpoint, and a branch ``step-<N>``."""
    keep_every_n_steps: int | None = None
    """Milestones: checkpoints at multiples of N steps are always pushed (never coalesced away when the Hub is
    slower than the checkpoints, as the best one and the last one never are) and ``checkpoint`` keeps them on the
    Hub; ``null``: none but the best and the last."""
    min_commit_interval: float = 30.0
    """Seconds between two commits to the repository: the Hub allows about 128 commits per hour and repository.
    Checkpoints that come faster coalesce to the newest (milestones wait their turn)."""
    retries: int = 10
    """Tries of a push that failed with 429, a 5xx or a network error before it is given up (and listed)."""
    retry_backoff: float = 5.0
    """Seconds before the first retry of a push, doubled at each one (at most 10 minutes); a ``Retry-After`` of the
    Hub is waited for instead when it is longer."""
    flush_timeout: float = 900.0
    """Seconds the end of the run (or a stop signal) waits for the pushes still queued; what is not pushed by
    then is listed in the log, and stays in the run directory."""
    license: str | None = None
    """License of the model, as a Hub license id (``apache-2.0``, ``mit``, ``other`` ...), written into the
    model card's metadata; ``null`` leaves it out (the data's licenses decide what it may be)."""
    tags: list[str] = field(default_factory=list)
    """Extra tags for the model card's metadata (``hf_streamlm`` and the family's are always there)."""


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
