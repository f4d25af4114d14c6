"""Saving MicroBERT checkpoints in the two formats the project publishes.

- ``"native"``: a stock ``transformers.BertForMaskedLM`` checkpoint (``model_type: "bert"``). MicroBERT keeps BERT's
  module tree and hyperparameter names, so the conversion is a config translation plus an unchanged state dict. Loads
  anywhere with plain ``AutoModelForMaskedLM.from_pretrained(path)``, no custom code involved.
- ``"custom"``: the MicroBERT checkpoint itself (``model_type: "microbert"``) with ``auto_map`` in config.json and the
  configuration/modeling files copied beside the weights, for ``from_pretrained(path, trust_remote_code=True)``.
"""

import os
from pathlib import Path

from transformers import BertConfig, BertForMaskedLM

from .microbert import MicroBertConfig, MicroBertForMaskedLM, MicroBertModel


EXPORT_FORMATS = ("native", "custom")

# MicroBertConfig fields that BertConfig has under the same name and meaning: the whole translation. Anything else
# BertConfig needs (is_decoder=False, add_cross_attention=False, ...) is already its default.
_SHARED_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
)


def to_bert_config(config: MicroBertConfig) -> BertConfig:
    """The `BertConfig` describing the same network as `config`."""
    return BertConfig(
        **{name: getattr(config, name) for name in _SHARED_CONFIG_FIELDS},
        architectures=["BertForMaskedLM"],
    )


def to_native(model: MicroBertForMaskedLM) -> BertForMaskedLM:
    """A `transformers.BertForMaskedLM` computing the same function as `model`.

    The weights are copied (not shared) with a strict `load_state_dict`: any key or shape difference between the two
    architectures raises rather than silently leaving weights random. The result has the dtype, device and
    train/eval mode of `model`.
    """
    if not isinstance(model, MicroBertForMaskedLM):
        raise TypeError(f"to_native expects a MicroBertForMaskedLM, got {type(model).__name__}.")
    native = BertForMaskedLM(to_bert_config(model.config))
    native.to(device=model.device, dtype=model.dtype)
    native.load_state_dict(model.state_dict(), strict=True)
    native.train(model.training)
    return native


def save_model(model: MicroBertForMaskedLM, output_dir: str | os.PathLike, format: str = "native") -> Path:
    """Save `model` to `output_dir` in `format` (``"native"`` or ``"custom"``) and return the directory."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {format!r}; valid formats are {list(EXPORT_FORMATS)}.")
    if not isinstance(model, MicroBertForMaskedLM):
        raise TypeError(f"save_model expects a MicroBertForMaskedLM, got {type(model).__name__}.")
    output_dir = Path(output_dir)

    if format == "native":
        # transformers 5 always writes safetensors (the `safe_serialization` argument is gone).
        to_native(model).save_pretrained(output_dir)
        return output_dir

    # Importing hf_streamlm.models already registered these; repeated here so that saving does not depend on it.
    MicroBertConfig.register_for_auto_class("AutoConfig")
    MicroBertForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
    # save_pretrained adds the AutoConfig and AutoModelForMaskedLM entries; AutoModel (the bare encoder) lives in the
    # same copied file, so advertising it lets `AutoModel.from_pretrained(..., trust_remote_code=True)` work too.
    auto_map = dict(getattr(model.config, "auto_map", None) or {})
    auto_map["AutoModel"] = f"{MicroBertModel.__module__.rsplit('.', 1)[-1]}.{MicroBertModel.__name__}"
    model.config.auto_map = auto_map
    model.save_pretrained(output_dir)
    return output_dir


__all__ = ["EXPORT_FORMATS", "save_model", "to_bert_config", "to_native"]
