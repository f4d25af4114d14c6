"""Small factories the training loop calls: model, optimizer, schedule."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from hf_streamlm.config import Config, ConfigError


def resolve_vocab_size(config: Config, tokenizer) -> int:
    """The model's vocabulary follows the tokenizer; an explicit, different value is an error."""
    size = len(tokenizer)
    if config.model.vocab_size is not None and config.model.vocab_size != size:
        raise ConfigError(
            f"'model.vocab_size' is {config.model.vocab_size} but the tokenizer has {size} tokens "
            "(leave model.vocab_size null to follow the tokenizer)"
        )
    return size


def build_model(config: Config, tokenizer) -> PreTrainedModel:
    m = config.model
    vocab_size = resolve_vocab_size(config, tokenizer)
    if m.type == "microbert":
        from hf_streamlm.models.microbert import MicroBertConfig, MicroBertForMaskedLM

        if m.pretrained:
            return MicroBertForMaskedLM.from_pretrained(m.pretrained)
        model_config = MicroBertConfig(
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
            pad_token_id=tokenizer.pad_token_id,
        )
        return MicroBertForMaskedLM(model_config)
    raise ConfigError(f"model.type={m.type} is not available in this version; use model.type=microbert")


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D tensors), as in GPT-2/BERT practice."""
    o = config.optimizer
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    peak = config.scheduler.max_lr if config.scheduler.max_lr is not None else o.learning_rate
    fused = torch.cuda.is_available() and all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(groups, lr=peak, betas=(o.beta1, o.beta2), eps=o.epsilon, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config, total_steps: int):
    s = config.scheduler
    if s.strategy == "cosine_with_warmup":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=s.warmup_steps, num_training_steps=total_steps, min_lr=s.min_lr
        )
    if s.strategy == "linear":
        return get_linear_schedule_with_warmup(optimizer, s.warmup_steps, total_steps)
    return get_constant_schedule_with_warmup(optimizer, s.warmup_steps)
