"""Saving checkpoints in the two formats the project publishes.

- ``"native"``: a stock transformers checkpoint, loadable anywhere with plain ``AutoModelFor*.from_pretrained(path)``,
  no custom code involved. MicroBERT becomes ``transformers.BertForMaskedLM`` (``model_type: "bert"``), its modern
  tier ``transformers.ModernBertForMaskedLM`` (``model_type: "modernbert"``) and the decoder
  ``transformers.LlamaForCausalLM`` (``model_type: "llama"``). All keep the module tree and hyperparameter names of
  their stock counterpart, so the conversion is a config translation plus an unchanged state dict.
- ``"custom"``: the project checkpoint itself (``model_type: "microbert"`` / ``"modern_microbert"`` /
  ``"streamlm_decoder"``) with ``auto_map``
  in config.json and the configuration/modeling files copied beside the weights, for
  ``from_pretrained(path, trust_remote_code=True)``.
"""

import copy
import json
import os
from pathlib import Path

from transformers import (
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedModel,
)

from .decoder import DecoderConfig, DecoderForCausalLM, DecoderModel
from .microbert import MicroBertConfig, MicroBertForMaskedLM, MicroBertModel
from .modernbert import ModernMicroBertConfig, ModernMicroBertForMaskedLM, ModernMicroBertModel


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

# DecoderConfig fields that LlamaConfig has under the same name and meaning. `rope_parameters` is copied separately
# (deep, since transformers fills RoPE dicts in place); `residual_dropout` has no Llama counterpart and is dropped,
# which changes nothing at inference. LlamaConfig's other fields (pretraining_tp=1, ...) keep their defaults.
_SHARED_DECODER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "head_dim",
)


# ModernMicroBertConfig fields that ModernBertConfig has under the same name and meaning, in transformers 4.57 and 5.x.
# The layer pattern and rotary bases are written in the 4.x form as well (`_MODERNBERT_LEGACY_FIELDS`): 5.x derives
# `layer_types` and `rope_parameters` from them and writes those, which 4.x ignores.
_SHARED_MODERNBERT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_activation",
    "max_position_embeddings",
    "initializer_range",
    "initializer_cutoff_factor",
    "norm_eps",
    "norm_bias",
    "attention_bias",
    "attention_dropout",
    "local_attention",
    "embedding_dropout",
    "mlp_bias",
    "mlp_dropout",
    "decoder_bias",
    "classifier_activation",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "cls_token_id",
    "sep_token_id",
    "tie_word_embeddings",
)
_MODERNBERT_LEGACY_FIELDS = ("global_attn_every_n_layers", "global_rope_theta", "local_rope_theta")


def to_bert_config(config: MicroBertConfig) -> BertConfig:
    """The `BertConfig` describing the same network as `config`."""
    return BertConfig(
        **{name: getattr(config, name) for name in _SHARED_CONFIG_FIELDS},
        architectures=["BertForMaskedLM"],
    )


def to_llama_config(config: DecoderConfig) -> LlamaConfig:
    """The `LlamaConfig` describing the same network as `config` (same RoPE parameters, tying and token ids)."""
    if config.hidden_size % config.num_attention_heads != 0:
        # LlamaConfig's validation insists on it even when head_dim is explicit.
        raise ValueError(
            f"The native (Llama) format needs `hidden_size` ({config.hidden_size}) divisible by "
            f"`num_attention_heads` ({config.num_attention_heads}); save this model with format='custom'."
        )
    return LlamaConfig(
        **{name: copy.deepcopy(getattr(config, name)) for name in _SHARED_DECODER_FIELDS},
        rope_parameters=copy.deepcopy(config.rope_parameters),
        architectures=["LlamaForCausalLM"],
    )


def to_modernbert_config(config: ModernMicroBertConfig) -> ModernBertConfig:
    """The `ModernBertConfig` describing the same network as `config`.

    transformers 5 takes the 4.x fields (`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`) as
    constructor arguments and turns them into `layer_types` / `rope_parameters`; 4.x takes them as they are. The
    prediction head has no bias (`classifier_bias` False) and `sparse_prediction` stays off: a stock model returns
    dense logits, as `pipeline("fill-mask")` needs.
    """
    return ModernBertConfig(
        **{name: getattr(config, name) for name in _SHARED_MODERNBERT_FIELDS + _MODERNBERT_LEGACY_FIELDS},
        classifier_bias=False,
        architectures=["ModernBertForMaskedLM"],
    )


def modernbert_legacy_fields(config) -> dict:
    """What transformers 4.x needs in a ModernBERT config.json besides the fields 5.x writes: the layer pattern and
    the two rotary bases in their 4.x form, read from `config` (a ModernMicroBertConfig or a ModernBertConfig of
    either version), and `reference_compile: false` (4.57 would otherwise compile parts of the model wherever
    Triton is importable)."""
    fields = {name: getattr(config, name, None) for name in _MODERNBERT_LEGACY_FIELDS}
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("full_attention"):  # a 5.x config: the rotary bases live in rope_parameters
        fields["global_rope_theta"] = rope["full_attention"]["rope_theta"]
        fields["local_rope_theta"] = rope["sliding_attention"]["rope_theta"]
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        fields["global_attn_every_n_layers"] = _every_n(layer_types, fields["global_attn_every_n_layers"])
    return {**fields, "reference_compile": False}


def _every_n(layer_types: list[str], stated: int | None) -> int:
    """The `global_attn_every_n_layers` that yields `layer_types` (layer i global iff i % n == 0): `stated` if it
    does (several values fit a short stack), else the smallest that does."""
    def fits(n: int) -> bool:
        return all((t == "full_attention") == (i % n == 0) for i, t in enumerate(layer_types))

    if stated and fits(stated):
        return stated
    for n in range(1, len(layer_types) + 1):
        if fits(n):
            return n
    raise ValueError(f"layer_types {layer_types} are not 'global every n layers from the first': no modern MicroBERT "
                     "(nor transformers 4.x's ModernBERT) has that pattern")


def from_modernbert_config(native: ModernBertConfig) -> ModernMicroBertConfig:
    """The inverse of `to_modernbert_config`, for a stock config of transformers 4.57 or 5.x."""
    if getattr(native, "classifier_bias", False):
        raise ValueError("this ModernBERT's prediction head has a bias (classifier_bias), which the modern MicroBERT "
                         "does not have")
    shared = {name: getattr(native, name) for name in _SHARED_MODERNBERT_FIELDS}
    legacy = {k: v for k, v in modernbert_legacy_fields(native).items() if k in _MODERNBERT_LEGACY_FIELDS}
    return ModernMicroBertConfig(**shared, **legacy)


def _write_modernbert_legacy_fields(config_file: Path, config: ModernBertConfig) -> None:
    settings = json.loads(config_file.read_text())
    settings.update(modernbert_legacy_fields(config))
    config_file.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def legacy_rope_fields(rope_parameters: dict) -> dict:
    """``rope_theta`` and ``rope_scaling``: the rotary settings as transformers 4.x reads them.

    transformers 5 writes only ``rope_parameters``, which 4.x ignores: it would run a model trained with
    ``rope_theta=500000`` (or linear scaling) at 10000 (or unscaled), silently. 5.x reads both forms and
    lets a non-null ``rope_scaling`` replace ``rope_parameters``, taking ``rope_theta`` beside it
    (``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict``), so the two forms written here say the
    same thing to both. ``rope_scaling`` leaves out ``rope_theta`` (4.x warns on keys it does not know
    there) and is null for plain RoPE, as 4.x configs have it.
    """
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    scaling = {k: v for k, v in rope_parameters.items() if k not in ("rope_theta", "type")}
    return {
        "rope_theta": rope_parameters.get("rope_theta", 10000.0),
        "rope_scaling": None if rope_type == "default" else {**scaling, "rope_type": rope_type},
    }


def _write_legacy_rope_fields(config_file: Path, rope_parameters: dict) -> None:
    settings = json.loads(config_file.read_text())
    settings.update(legacy_rope_fields(rope_parameters))
    config_file.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


# Project class -> (stock class, config translation, bare-model class advertised as AutoModel in the custom format,
# Auto class of the head model).
_FAMILIES = {
    MicroBertForMaskedLM: (BertForMaskedLM, to_bert_config, MicroBertModel, "AutoModelForMaskedLM"),
    ModernMicroBertForMaskedLM: (
        ModernBertForMaskedLM, to_modernbert_config, ModernMicroBertModel, "AutoModelForMaskedLM"
    ),
    DecoderForCausalLM: (LlamaForCausalLM, to_llama_config, DecoderModel, "AutoModelForCausalLM"),
}


def _family(model: PreTrainedModel, caller: str):
    for project_class, family in _FAMILIES.items():
        if isinstance(model, project_class):
            return project_class, family
    expected = " or ".join(cls.__name__ for cls in _FAMILIES)
    raise TypeError(f"{caller} expects a {expected}, got {type(model).__name__}.")


def to_native(
    model: MicroBertForMaskedLM | ModernMicroBertForMaskedLM | DecoderForCausalLM,
) -> BertForMaskedLM | ModernBertForMaskedLM | LlamaForCausalLM:
    """A stock `transformers.BertForMaskedLM` / `ModernBertForMaskedLM` / `LlamaForCausalLM` computing the same
    function as `model`.

    The weights are copied (not shared) with a strict `load_state_dict`: any key or shape difference between the two
    architectures raises rather than silently leaving weights random. The result has the dtype, device and
    train/eval mode of `model`; a causal LM also gets a copy of its generation config.
    """
    _, (native_class, translate, _, _) = _family(model, "to_native")
    native = native_class(translate(model.config))
    native.to(device=model.device, dtype=model.dtype)
    native.load_state_dict(model.state_dict(), strict=True)
    native.train(model.training)
    if model.can_generate():
        native.generation_config = copy.deepcopy(model.generation_config)
    return native


def from_native(
    native: BertForMaskedLM | ModernBertForMaskedLM | LlamaForCausalLM,
) -> MicroBertForMaskedLM | ModernMicroBertForMaskedLM | DecoderForCausalLM:
    """The inverse of `to_native`: a stock BERT/ModernBERT/Llama model (e.g. a native export) as the project's class,
    with the same weights (strict load), to continue pretraining it here."""
    if isinstance(native, ModernBertForMaskedLM):
        project = ModernMicroBertForMaskedLM(from_modernbert_config(native.config))
    elif isinstance(native, BertForMaskedLM):
        project = MicroBertForMaskedLM(
            MicroBertConfig(**{name: getattr(native.config, name) for name in _SHARED_CONFIG_FIELDS})
        )
    elif isinstance(native, LlamaForCausalLM):
        project = DecoderForCausalLM(
            DecoderConfig(
                **{name: copy.deepcopy(getattr(native.config, name)) for name in _SHARED_DECODER_FIELDS},
                rope_parameters=copy.deepcopy(native.config.rope_parameters),
            )
        )
        project.generation_config = copy.deepcopy(native.generation_config)
    else:
        expected = "a BertForMaskedLM, ModernBertForMaskedLM or LlamaForCausalLM"
        raise TypeError(f"from_native expects {expected}, got {type(native).__name__}.")
    project.to(device=native.device, dtype=native.dtype)
    # BERT checkpoints may carry a pooler that MicroBERT does not have; everything else must match exactly.
    state = {k: v for k, v in native.state_dict().items() if not k.startswith("bert.pooler.")}
    project.load_state_dict(state, strict=True)
    project.train(native.training)
    return project


def save_model(
    model: MicroBertForMaskedLM | ModernMicroBertForMaskedLM | DecoderForCausalLM,
    output_dir: str | os.PathLike,
    format: str = "native",
) -> Path:
    """Save `model` to `output_dir` in `format` (``"native"`` or ``"custom"``) and return the directory."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {format!r}; valid formats are {list(EXPORT_FORMATS)}.")
    project_class, (_, _, base_class, auto_class) = _family(model, "save_model")
    output_dir = Path(output_dir)

    if format == "native":
        # transformers 5 always writes safetensors (the `safe_serialization` argument is gone).
        native = to_native(model)
        native.save_pretrained(output_dir)
        if isinstance(native, LlamaForCausalLM):  # readable by transformers 4.x too
            _write_legacy_rope_fields(output_dir / "config.json", native.config.rope_parameters)
        if isinstance(native, ModernBertForMaskedLM):  # readable by transformers 4.x too
            _write_modernbert_legacy_fields(output_dir / "config.json", native.config)
        return output_dir

    # Importing hf_streamlm.models already registered these; repeated here so that saving does not depend on it.
    project_class.config_class.register_for_auto_class("AutoConfig")
    project_class.register_for_auto_class(auto_class)
    # save_pretrained adds the AutoConfig and head-model entries; the bare model lives in the same copied file, so
    # advertising it lets `AutoModel.from_pretrained(..., trust_remote_code=True)` work too.
    auto_map = dict(getattr(model.config, "auto_map", None) or {})
    auto_map["AutoModel"] = f"{base_class.__module__.rsplit('.', 1)[-1]}.{base_class.__name__}"
    model.config.auto_map = auto_map
    model.save_pretrained(output_dir)
    return output_dir


__all__ = [
    "EXPORT_FORMATS",
    "from_modernbert_config",
    "from_native",
    "legacy_rope_fields",
    "modernbert_legacy_fields",
    "save_model",
    "to_bert_config",
    "to_llama_config",
    "to_modernbert_config",
    "to_native",
]
