"""Small factories the training loop calls: model, optimizer, schedule."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_wsd_schedule,
)

from hf_streamlm.config import Config, ConfigError, ModelConfig, wsd_steps


def resolve_vocab_size(config: Config, tokenizer) -> int:
    """The model's vocabulary follows the tokenizer; an explicit, different value is an error."""
    size = len(tokenizer)
    if config.model.vocab_size is not None and config.model.vocab_size != size:
        raise ConfigError(
            f"'model.vocab_size' is {config.model.vocab_size} but the tokenizer has {size} tokens "
            "(leave model.vocab_size null to follow the tokenizer)"
        )
    return size


def hf_model_config(m: ModelConfig, vocab_size: int, special_ids: dict[str, int | None] | None = None):
    """The transformers config of the ``model`` section (MicroBertConfig, ModernMicroBertConfig or DecoderConfig)."""
    ids = special_ids or {}
    if m.type == "microbert" and m.architecture == "modern":
        from hf_streamlm.models.modernbert import ModernMicroBertConfig

        # ModernBERT's defaults where the section leaves a key null (its dropouts are 0, as in ModernBERT).
        return ModernMicroBertConfig(
            vocab_size=vocab_size,
            hidden_size=m.hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            intermediate_size=m.intermediate_size,
            max_position_embeddings=m.max_position_embeddings,
            attention_dropout=m.attn_dropout or 0.0,
            embedding_dropout=m.residual_dropout or 0.0,
            mlp_dropout=m.residual_dropout or 0.0,
            global_rope_theta=m.rope_theta or 160_000.0,
            local_rope_theta=m.local_rope_theta or 10_000.0,
            local_attention=m.local_attention or 128,
            global_attn_every_n_layers=m.global_attn_every_n_layers or 3,
            initializer_range=m.initializer_range,
            tie_word_embeddings=m.tie_word_embeddings,
            pad_token_id=ids.get("pad_token_id") or 0,
            bos_token_id=ids.get("bos_token_id"),
            eos_token_id=ids.get("eos_token_id"),
            cls_token_id=ids.get("cls_token_id"),
            sep_token_id=ids.get("sep_token_id"),
        )
    if m.type == "microbert":
        from hf_streamlm.models.microbert import MicroBertConfig

        return MicroBertConfig(
            vocab_size=vocab_size,
            hidden_size=m.hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            intermediate_size=m.intermediate_size or 4 * m.hidden_size,
            max_position_embeddings=m.max_position_embeddings,
            hidden_dropout_prob=0.1 if m.residual_dropout is None else m.residual_dropout,
            attention_probs_dropout_prob=0.1 if m.attn_dropout is None else m.attn_dropout,
            initializer_range=m.initializer_range,
            tie_word_embeddings=m.tie_word_embeddings,
            pad_token_id=ids.get("pad_token_id") or 0,
        )
    from hf_streamlm.models.decoder import DecoderConfig

    rope = {"rope_type": m.rope_mode or "default", "rope_theta": m.rope_theta or 10000.0}
    if m.rope_factor is not None:
        rope["factor"] = m.rope_factor
    return DecoderConfig(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads,
        max_position_embeddings=m.max_position_embeddings,
        attention_dropout=m.attn_dropout or 0.0,
        residual_dropout=m.residual_dropout or 0.0,
        rope_parameters=rope,
        initializer_range=m.initializer_range,
        tie_word_embeddings=m.tie_word_embeddings,
        loss_chunk_size=m.loss_chunk_size,
        z_loss=m.z_loss,
        pad_token_id=ids.get("pad_token_id"),
        bos_token_id=ids.get("bos_token_id"),
        eos_token_id=ids.get("eos_token_id"),
    )


NATIVE_MODEL_TYPES = ("bert", "modernbert", "llama")
"""``model_type`` of the stock classes the native exports load as (``from_native`` converts them back)."""

SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")
"""Tokenizer ids a fresh model's config records."""


def project_model_type(m: ModelConfig) -> str:
    """The ``model_type`` of the project class a ``model`` section builds."""
    if m.type == "decoder":
        return "streamlm_decoder"
    return "modern_microbert" if m.architecture == "modern" else "microbert"


def build_model(config: Config, tokenizer) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    m = config.model
    auto = AutoModelForMaskedLM if m.type == "microbert" else AutoModelForCausalLM
    if m.pretrained:
        from hf_streamlm.models.export_formats import from_native
        from hf_streamlm.train.zero import without_zero3_init

        # Whole, even under ZeRO-3: from_native copies full tensors; DeepSpeed partitions the model in prepare.
        with without_zero3_init():
            model = auto.from_pretrained(m.pretrained)
            if model.config.model_type in NATIVE_MODEL_TYPES:  # a native export: continue in the project's classes
                model = from_native(model)
        expected = project_model_type(m)
        if model.config.model_type != expected:
            wanted = f"model.type={m.type}" + (f" model.architecture={m.architecture}" if m.type == "microbert" else "")
            raise ConfigError(
                f"'model.pretrained' {m.pretrained!r} holds a {model.config.model_type} model, not {wanted}"
            )
        if model.config.vocab_size != len(tokenizer):
            raise ConfigError(
                f"'model.pretrained' {m.pretrained!r} has a vocabulary of {model.config.vocab_size} but the tokenizer "
                f"has {len(tokenizer)} tokens"
            )
    else:
        ids = {k: getattr(tokenizer, k, None) for k in SPECIAL_IDS}
        model = auto.from_config(hf_model_config(m, resolve_vocab_size(config, tokenizer), ids))
    if m.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError(
            "'model.attn_implementation' flex_attention trains on a GPU: PyTorch has no FlexAttention backward on the "
            "CPU (use sdpa here; the model still runs flex_attention on the CPU for inference)"
        )
    if m.attn_implementation != model.config._attn_implementation:
        try:
            model.set_attn_implementation(m.attn_implementation)
        except (ImportError, ValueError) as err:  # e.g. flash-attn not installed, or no CUDA
            reason = str(err).strip().splitlines()[0]
            message = f"'model.attn_implementation' {m.attn_implementation!r} cannot be used here: {reason}"
            raise ConfigError(message) from None
    if m.gradient_checkpointing:  # renamed in recent transformers; the old name warns
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model


def meta_model(m: ModelConfig, vocab_size: int) -> PreTrainedModel:
    """The model a ``model`` section describes, on the meta device (shapes, no memory)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if m.type == "microbert" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(hf_model_config(m, vocab_size))


def count_parameters(m: ModelConfig, vocab_size: int) -> int:
    """Parameters of the model a ``model`` section describes, counted on the meta device (no memory)."""
    return meta_model(m, vocab_size).num_parameters()


def build_optimizer(
    model: torch.nn.Module, config: Config, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """AdamW, or Muon with AdamW (``optimizer.algorithm``); no weight decay on biases and norm weights (1-D tensors),
    as in GPT-2/BERT practice.

    `device` is where training runs (`accelerator.device`). The optimizer is built before `accelerator.prepare`
    moves the parameters there, so it is the device, not the parameters, that decides the fused CUDA kernel (one
    launch for all parameters instead of a loop of small ones).
    """
    o = config.optimizer
    # Under DeepSpeed ZeRO-3 a model built in zero.Init holds empty partitions; ds_shape is the real shape.
    ndim = {id(p): len(getattr(p, "ds_shape", p.shape)) for p in model.parameters()}
    muon = {id(p) for p in muon_parameters(model)} if o.algorithm == "muon" else set()
    trained = [p for p in model.parameters() if p.requires_grad and id(p) not in muon]
    decay = [p for p in trained if ndim[id(p)] >= 2]
    no_decay = [p for p in trained if ndim[id(p)] < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    peak = config.scheduler.max_lr if config.scheduler.max_lr is not None else o.learning_rate
    on_cuda = device.type == "cuda" if device is not None else all(p.is_cuda for p in model.parameters())
    fused = on_cuda and all(p.is_floating_point() for p in model.parameters())
    adamw = torch.optim.AdamW(groups, lr=peak, betas=(o.beta1, o.beta2), eps=o.epsilon, fused=fused or None)
    if not muon:
        return adamw
    matrices = [p for p in model.parameters() if id(p) in muon]
    return MuonWithAdamW(torch.optim.Muon(matrices, lr=peak, weight_decay=o.weight_decay, momentum=o.muon_momentum,
                                          adjust_lr_fn="match_rms_adamw"), adamw)


def muon_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What Muon trains: the weight of every ``nn.Linear`` but the LM head (the blocks' attention and MLP
    projections, MicroBERT's pooler and head transform). Embeddings, the head (tied to them or not), norms and
    biases stay with AdamW, as in Keller Jordan's and Moonlight's setups."""
    head = model.get_output_embeddings()
    skip = {id(head.weight)} if head is not None else set()
    return [m.weight for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.weight.requires_grad and id(m.weight) not in skip]


def check_optimizer_engine(config: Config, distributed_type: str) -> None:
    """Muon orthogonalises whole matrices: refuse it where each process holds only a shard of them."""
    if config.optimizer.algorithm == "muon" and distributed_type in ("DEEPSPEED", "FSDP"):
        engine = "DeepSpeed ZeRO" if distributed_type == "DEEPSPEED" else "FSDP"
        raise ConfigError(f"optimizer.algorithm=muon needs whole weight matrices on each process, and {engine} "
                          "shards them: launch without it (one device or DDP) or use optimizer.algorithm=adam_w")


class MuonWithAdamW(torch.optim.Optimizer):
    """Two optimizers as one, for accelerate, the learning-rate scheduler and the checkpoint: ``param_groups``
    are the two optimizers' own group dicts (a scheduler's rate reaches both), ``step`` and ``zero_grad`` run
    both, the state dict holds both."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw
        # defaults: the schedules that read the peak rate from optimizer.defaults["lr"] find it (both share it)
        super().__init__([p for group in (*muon.param_groups, *adamw.param_groups) for p in group["params"]],
                         {"lr": adamw.defaults["lr"]})
        self.param_groups = [*muon.param_groups, *adamw.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, total_steps: int):
    s = config.scheduler
    if s.strategy == "cosine_with_warmup":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=s.warmup_steps, num_training_steps=total_steps, min_lr=s.min_lr
        )
    if s.strategy == "linear":
        return get_linear_schedule_with_warmup(optimizer, s.warmup_steps, total_steps)
    if s.strategy == "wsd":
        # The floor as a share of each group's own peak; the stable phase's length is fixed by total_steps, so a
        # resume with a larger total_steps (in the stable phase) goes on as a run planned that long from the start.
        # The peak is the optimizer's own rate (build_optimizer's), as the cosine schedule reads it.
        stable, decay = wsd_steps(s, total_steps)
        return get_wsd_schedule(
            optimizer, num_warmup_steps=s.warmup_steps, num_stable_steps=stable, num_decay_steps=decay,
            decay_type=s.decay_shape, min_lr_ratio=s.min_lr / optimizer.defaults["lr"],
        )
    return get_constant_schedule_with_warmup(optimizer, s.warmup_steps)


def estimate(m: ModelConfig, vocab_size: int, sequence_length: int, batch_size: int, optimizer: str = "adam_w") -> dict:
    """Size, compute and training memory of a ``model`` section, without allocating it (``optimizer``: the
    ``optimizer.algorithm``, for its state)."""
    config = hf_model_config(m, vocab_size)
    model = meta_model(m, vocab_size)
    n = model.num_parameters()
    # fp32 weights and gradients, 8 bytes each; AdamW's two moments, 8 more; Muon's one momentum, 4 for its matrices.
    state = 16 * n - (4 * sum(p.numel() for p in muon_parameters(model)) if optimizer == "muon" else 0)
    layers, d, heads = m.num_layers, m.hidden_size, m.num_attention_heads
    # Kaplan et al. (2020): 6N FLOPs per token for forward + backward, plus 12·L·d·T for attention scores.
    flops = 6 * n + 12 * layers * d * sequence_length
    # Korthikanti et al. (2022), eq. 2: activation bytes per layer = T·b·d·(34 + 5·a·T/d) in 16-bit.
    activations = layers * sequence_length * batch_size * d * (34 + 5 * heads * sequence_length / d)
    # The LM head's logits and the loss on them, about 12 bytes per (position, vocabulary) entry at their peak
    # (16-bit logits, their float32 copy and its gradient, the 16-bit gradient): every position of the micro-batch
    # at once, or one chunk of the decoder's fused loss (`model.loss_chunk_size`).
    positions = sequence_length * batch_size
    if m.type == "decoder" and m.loss_chunk_size:
        positions = min(positions, m.loss_chunk_size)
    logits = 12 * positions * vocab_size
    return {
        "type": "modernbert" if project_model_type(m) == "modern_microbert" else m.type,
        "layers": layers,
        "heads": heads,
        "kv_heads": m.num_key_value_heads or heads,
        "hidden": d,
        "intermediate": config.intermediate_size,
        "vocab": vocab_size,
        "params": n,
        "flops_per_token": flops,
        "train_memory_gib": (state + activations + logits) / 2**30,
    }
