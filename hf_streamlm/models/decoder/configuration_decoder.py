"""Decoder (Llama-architecture causal LM) model configuration.

The decoder is the Llama architecture (pre-RMSNorm blocks, rotary positions, grouped-query attention, gated SiLU
MLP) at the sizes this project pretrains. Every field keeps the name and meaning it has in the installed
`transformers.LlamaConfig`, so exporting a checkpoint to a stock Llama is a plain copy of these values. The only
additions are `residual_dropout` (Llama has none; it only acts in training) and the model type.

RoPE parameters follow transformers 5: the canonical field is `rope_parameters`, a dict such as
`{"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}`, which is also what `LlamaConfig` stores and writes
to config.json. The transformers 4 spellings still work as constructor arguments (`rope_theta=...`,
`rope_scaling={"rope_type": "linear", "factor": 2.0}`) and as attributes (`config.rope_theta`,
`config.rope_scaling`); they are views of `rope_parameters`, never stored separately.

This file is copied next to the weights by the "custom" export and imported by `trust_remote_code=True` loaders in
processes where `hf_streamlm` is not installed: it must import nothing but `transformers` (and the standard library).
"""

import math
import numbers
from typing import Any

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN


# The RoPE variants the decoder implements (in `DecoderRotaryEmbedding`): the `rope_type`s of transformers'
# `ROPE_INIT_FUNCTIONS` that stock Llama runs, so the native export keeps the same `rope_parameters`. Not
# "proportional" (Gemma 4's, for partial rotation, which the decoder does not do).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def swiglu_intermediate_size(hidden_size: int) -> int:
    """The default MLP width of a gated (SwiGLU) MLP with `hidden_size` inputs.

    8/3 * hidden_size gives the three gated matrices the parameter count of a non-gated 4x MLP (Shazeer 2020, "GLU
    Variants Improve Transformer", sec. 2). It is then rounded up to a multiple of 256, as Meta's Llama reference code
    does (`multiple_of=256` in `llama/model.py`: 4096 -> 11008, 2048 -> 5632); below hidden_size 1024 to a multiple
    of 32 instead, so that tiny models are not inflated (64 -> 192, not 256).
    """
    multiple_of = 256 if hidden_size >= 1024 else 32
    return multiple_of * math.ceil(int(8 * hidden_size / 3) / multiple_of)


class DecoderConfig(PreTrainedConfig):
    r"""
    Configuration of a [`DecoderModel`] / [`DecoderForCausalLM`].

    Args:
        vocab_size (`int`, *optional*, defaults to 32000):
            Number of tokens in the vocabulary (rows of the embedding and of the LM head).
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the residual stream.
        intermediate_size (`int`, *optional*):
            Width of the gated MLP (gate_proj/up_proj outputs). `None` means [`swiglu_intermediate_size`]:
            8/3 * hidden_size rounded up to a multiple of 256 (of 32 below hidden_size 1024).
        num_hidden_layers (`int`, *optional*, defaults to 8):
            Number of decoder layers.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Number of query heads per layer.
        num_key_value_heads (`int`, *optional*):
            Number of key/value heads (grouped-query attention, Ainslie et al. 2023). Must divide
            `num_attention_heads`; `None` means `num_attention_heads` (plain multi-head attention), 1 is multi-query.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            Activation of the MLP gate; any key of `transformers.activations.ACT2FN`.
        max_position_embeddings (`int`, *optional*, defaults to 2048):
            Context length the model is trained for. RoPE has no position table, so longer inputs run; the value
            matters for `dynamic` RoPE scaling, which starts stretching the frequencies beyond it.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of all weight matrices and embeddings.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of every RMSNorm (the `LlamaConfig` default).
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether an evaluation-mode forward returns the key/value cache (training-mode forwards do not unless
            asked, see [`DecoderModel.forward`]).
        pad_token_id (`int`, *optional*):
            Padding token id. Unlike BERT/Llama, the embedding row of this id is initialised and trained like any
            other: decoder tokenizers often pad with the EOS token, whose embedding must learn.
        bos_token_id (`int`, *optional*):
            Beginning-of-sequence token id (used by `generate`).
        eos_token_id (`int` or `list[int]`, *optional*):
            End-of-sequence token id(s) (`generate` stops on them).
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the LM head shares its weight with the input embeddings (the `LlamaConfig` default is untied).
        rope_parameters (`dict`, *optional*):
            RoPE settings in the transformers 5 format: `rope_type` (`"default"`, `"linear"`, `"dynamic"`,
            `"yarn"`, `"llama3"` or `"longrope"`), `rope_theta` (base wavelength, default 10000.0, Su et al. 2021)
            and, for the scaled types, `factor` (>= 1; optional for `"longrope"`) and the keys of that type in
            transformers' `modeling_rope_utils` (`"llama3"`: `low_freq_factor`, `high_freq_factor`; `"longrope"`:
            `short_factor`, `long_factor`, lists of head_dim / 2 numbers; `"yarn"`: optionally `beta_fast`,
            `beta_slow`, `attention_factor`, `mscale`, `mscale_all_dim`, `truncate`; the last three types:
            `original_max_position_embeddings`, the trained length, default `max_position_embeddings`). `None` means
            `{"rope_type": "default", "rope_theta": 10000.0}`. May also be given through the legacy arguments
            `rope_theta` and `rope_scaling` (a dict with `rope_type` and `factor`, or `None`).
        attention_bias (`bool`, *optional*, defaults to `False`):
            Whether q/k/v/o projections have biases.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities (training only). Also accepted as `attn_dropout`.
        residual_dropout (`float`, *optional*, defaults to 0.0):
            Dropout (training only) on the embedding output and on the output of every attention and MLP sublayer,
            just before it is added to the residual stream (GPT-2's `embd_pdrop` + `resid_pdrop`). Not a Llama
            field: the native export drops it, which changes nothing at inference.
        mlp_bias (`bool`, *optional*, defaults to `False`):
            Whether gate/up/down projections have biases.
        head_dim (`int`, *optional*):
            Width of each attention head; `None` means `hidden_size // num_attention_heads`. Must be even (RoPE
            rotates pairs of dimensions).
        loss_chunk_size (`int`, *optional*, defaults to 512):
            Positions per chunk of the fused LM head + cross entropy that a training-mode forward with `labels` uses
            when it will be differentiated: the (batch, seq, vocab) logits are never materialised and `logits` is
            None in the output. 0 computes the full logits and then the loss, as `LlamaForCausalLM` does. Not a
            Llama field (dropped by the native export); it changes no result beyond float rounding.
        z_loss (`float`, *optional*, defaults to 0.0):
            Coefficient of the z-loss a training-mode forward with `labels` adds to the cross entropy: the mean over
            the predicted positions of log(Z)^2, Z the softmax's normaliser (PaLM, OLMo: 1e-4). It keeps the
            output logits from drifting in long bf16 runs; the output's `z_loss` holds the term added. Eval-mode
            losses are the cross entropy alone. 0 disables it. Not a Llama field (dropped by the native export).

    Example:

    ```python
    >>> from hf_streamlm.models import DecoderConfig, DecoderForCausalLM
    >>> config = DecoderConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    ...                        num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})
    >>> model = DecoderForCausalLM(config)
    ```
    """

    model_type = "streamlm_decoder"
    keys_to_ignore_at_inference = ["past_key_values"]
    # `attn_dropout` is the project recipe's name for the field (`model.attn_dropout`).
    attribute_map = {"attn_dropout": "attention_dropout"}

    # Dataclass fields (see `PreTrainedConfig.__init_subclass__`): the generated keyword-only `__init__` assigns them
    # and forwards every other key (`rope_theta`, `rope_scaling`, `attn_dropout`, `architectures`, `auto_map`, ...)
    # to `__post_init__`.
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int | None = None
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    mlp_bias: bool = False
    head_dim: int | None = None
    loss_chunk_size: int = 512
    z_loss: float = 0.0

    def __post_init__(self, **kwargs):
        # An explicit head_dim frees hidden_size from being a multiple of the head count (as in LlamaConfig).
        derive_head_dim = self.head_dim is None
        if derive_head_dim and _is_positive_int(self.hidden_size) and _is_positive_int(self.num_attention_heads):
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None and _is_positive_int(self.hidden_size):
            self.intermediate_size = swiglu_intermediate_size(self.hidden_size)
        # The base class fills `rope_type`/`rope_theta` into the dict in place: copy so that a dict the caller keeps
        # (or shares between configs) is never modified.
        if isinstance(self.rope_parameters, dict):
            self.rope_parameters = dict(self.rope_parameters)
        if isinstance(kwargs.get("rope_scaling"), dict):
            kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
        # The base `__post_init__` turns legacy `rope_theta`/`rope_scaling` kwargs into `rope_parameters` and applies
        # the remaining kwargs (`attn_dropout` included), so the checks run after it, still inside construction (and
        # inside `from_pretrained`, which builds the config through `__init__` too).
        super().__post_init__(**kwargs)
        if isinstance(self.rope_parameters, dict):
            # transformers 4 configs spelled the key "type"; the base class copied it to "rope_type".
            self.rope_parameters.pop("type", None)
        self._check_fields(derive_head_dim)

    # ------------------------------------------------------------------------------------- legacy RoPE views

    @property
    def rope_theta(self) -> float:
        """RoPE base wavelength, stored as `rope_parameters["rope_theta"]` (transformers 5 layout)."""
        rope_parameters = self.__dict__.get("rope_parameters") or {}
        return rope_parameters.get("rope_theta", self.default_theta)

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        current = self.__dict__.get("rope_parameters") or {"rope_type": "default"}
        self.rope_parameters = {**current, "rope_theta": value}

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        """The scaling part of `rope_parameters` (`rope_type`, `factor`), or None for unscaled RoPE.

        Overrides the transformers 5 base property, which returns all of `rope_parameters` (theta included) and
        warns on assignment; this keeps the transformers 4 meaning "None or a scaling dict".
        """
        rope_parameters = self.__dict__.get("rope_parameters") or {}
        if rope_parameters.get("rope_type", "default") == "default":
            return None
        return {key: value for key, value in rope_parameters.items() if key != "rope_theta"}

    @rope_scaling.setter
    def rope_scaling(self, value: dict[str, Any] | None) -> None:
        scaling = dict(value) if value else {"rope_type": "default"}
        if "type" in scaling:
            scaling.setdefault("rope_type", scaling.pop("type"))
        self.rope_parameters = {**scaling, "rope_theta": self.rope_theta}
        if getattr(self, "_post_init_done", False):
            self._check_rope_parameters()

    # ---------------------------------------------------------------------------------------------- checks

    def _check_fields(self, derived_head_dim: bool) -> None:
        # Plain ValueErrors naming the field (huggingface_hub's `@strict` would raise StrictDataclass*Error instead).
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "head_dim",
        ):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")

        chunk = self.loss_chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ValueError(f"`loss_chunk_size` must be a non-negative integer, got {self.loss_chunk_size!r}.")
        if isinstance(self.z_loss, bool) or not isinstance(self.z_loss, (int, float)) or not self.z_loss >= 0:
            raise ValueError(f"`z_loss` must be a non-negative number, got {self.z_loss!r}.")

        if derived_head_dim and self.hidden_size % self.num_attention_heads != 0:
            # A derived head_dim would silently drop hidden_size % num_attention_heads dimensions.
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}), or `head_dim` must be given."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_key_value_heads` "
                f"({self.num_key_value_heads})."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"`head_dim` must be even (RoPE rotates pairs of dimensions), got {self.head_dim}.")

        for name in ("attention_dropout", "residual_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be a probability in [0, 1), got {value!r}.")

        for name in ("initializer_range", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")

        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}.")

        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None:
                continue
            # Only eos may be a list (several stop tokens), as in LlamaConfig.
            ids = value if name == "eos_token_id" and isinstance(value, (list, tuple)) else [value]
            if not ids or not all(_is_int(token_id) and 0 <= token_id < self.vocab_size for token_id in ids):
                raise ValueError(
                    f"`{name}` must be None or an integer in [0, vocab_size={self.vocab_size}), got {value!r}."
                )

        self._check_rope_parameters()

    def _check_rope_parameters(self) -> None:
        rope_parameters = self.rope_parameters
        if not isinstance(rope_parameters, dict):
            raise ValueError(f"`rope_parameters` must be a dict, got {rope_parameters!r}.")
        rope_type = rope_parameters.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"`rope_parameters` (or `rope_scaling`) has rope_type {rope_type!r}; the decoder supports "
                f"{list(SUPPORTED_ROPE_TYPES)}."
            )
        theta = rope_parameters.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not theta > 1:
            raise ValueError(f"`rope_theta` (in `rope_parameters`) must be a number > 1, got {theta!r}.")
        # longrope may leave `factor` out (then max_position_embeddings / original_max_position_embeddings).
        if rope_type != "default" and not (rope_type == "longrope" and rope_parameters.get("factor") is None):
            factor = rope_parameters.get("factor")
            if not _is_number(factor) or not factor >= 1:
                raise ValueError(
                    f"`rope_parameters` (or `rope_scaling`) of rope_type {rope_type!r} needs a `factor` >= 1, "
                    f"got {factor!r}."
                )
        if rope_type in ("yarn", "llama3", "longrope"):
            original = rope_parameters.get("original_max_position_embeddings")
            if original is not None and not _is_positive_int(original):
                raise ValueError(
                    "`rope_parameters['original_max_position_embeddings']` must be a positive integer, "
                    f"got {original!r}."
                )
        required = {"llama3": ("low_freq_factor", "high_freq_factor"), "longrope": ("short_factor", "long_factor")}
        missing = [key for key in required.get(rope_type, ()) if key not in rope_parameters]
        if missing:
            raise ValueError(f"`rope_parameters` of rope_type {rope_type!r} needs {missing}, got {rope_parameters!r}.")
        if rope_type == "llama3":
            low, high = rope_parameters["low_freq_factor"], rope_parameters["high_freq_factor"]
            if not (_is_number(low) and _is_number(high) and 0 < low < high):
                raise ValueError(
                    f"`rope_parameters` of rope_type 'llama3' needs 0 < low_freq_factor < high_freq_factor, got "
                    f"low_freq_factor={low!r}, high_freq_factor={high!r}."
                )
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                factors = rope_parameters[key]
                if not (isinstance(factors, (list, tuple)) and len(factors) == self.head_dim // 2
                        and all(_is_number(value) and value > 0 for value in factors)):
                    raise ValueError(
                        f"`rope_parameters['{key}']` must be a list of head_dim / 2 = {self.head_dim // 2} positive "
                        f"numbers, got {factors!r}."
                    )
        partial = rope_parameters.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ValueError(
                f"`rope_parameters` sets partial_rotary_factor={partial!r}; the decoder rotates whole heads only."
            )


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


__all__ = ["DecoderConfig", "swiglu_intermediate_size"]
