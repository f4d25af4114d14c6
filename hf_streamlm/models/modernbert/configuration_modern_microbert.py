"""Modern MicroBERT model configuration.

The modern MicroBERT tier is the ModernBERT architecture (Warner et al. 2024, "Smarter, Better, Faster, Longer: A
Modern Bidirectional Encoder"): pre-LayerNorm blocks without biases, rotary positions, a GeGLU MLP, attention that
alternates between a sliding window (local layers) and the whole sequence (every `global_attn_every_n_layers`-th
layer, from the first), each kind with its own rotary base, a final LayerNorm and a dense + activation + LayerNorm
prediction head before a decoder tied to the embeddings. Fields keep the names and meanings of
`transformers.ModernBertConfig` in its transformers 4.x form (`global_attn_every_n_layers`, `global_rope_theta`,
`local_rope_theta`), which transformers 5 still reads, so the native export is a copy of these values.

This file is copied next to the weights by the "custom" export and imported by `trust_remote_code=True` loaders in
processes where `hf_streamlm` is not installed: it must import nothing but `transformers` (and the standard library).
"""

import math
import numbers

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN


class ModernMicroBertConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ModernMicroBertModel`] / [`ModernMicroBertForMaskedLM`].

    Args:
        vocab_size (`int`, *optional*, defaults to 10000):
            Number of tokens in the vocabulary (rows of the token embedding and of the tied decoder).
        hidden_size (`int`, *optional*, defaults to 16):
            Width of the residual stream. Must be divisible by `num_attention_heads`.
        intermediate_size (`int`, *optional*):
            Width of the GeGLU MLP's hidden layer (its input projection `Wi` has twice as many outputs: the value and
            the gate). `None` means `ceil(1.5 * hidden_size)`, ModernBERT-base's ratio (768 -> 1152).
        num_hidden_layers (`int`, *optional*, defaults to 6):
            Number of encoder layers.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Number of attention heads per layer.
        hidden_activation (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLP's value half (GELU: GeGLU); any key of `transformers.activations.ACT2FN`.
        max_position_embeddings (`int`, *optional*, defaults to 128):
            Longest sequence the model is meant for (rotary positions have no table; informational, as in
            ModernBERT).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation of the input-side matrices and embeddings;
            output-side matrices get `initializer_range / sqrt(2 * num_hidden_layers)` (ModernBERT's `_init_weights`).
        initializer_cutoff_factor (`float`, *optional*, defaults to 2.0):
            The truncated normal is cut at this many standard deviations.
        norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every LayerNorm.
        norm_bias (`bool`, *optional*, defaults to `False`):
            Whether the LayerNorms have a bias.
        attention_bias (`bool`, *optional*, defaults to `False`):
            Whether the attention projections (`Wqkv`, `Wo`) have biases.
        mlp_bias (`bool`, *optional*, defaults to `False`):
            Whether the MLP projections (`Wi`, `Wo`) have biases.
        decoder_bias (`bool`, *optional*, defaults to `True`):
            Whether the vocabulary projection has a bias (ModernBERT's does).
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities and on the attention output projection (ModernBERT uses the one
            value for both).
        embedding_dropout (`float`, *optional*, defaults to 0.0):
            Dropout after the embedding LayerNorm.
        mlp_dropout (`float`, *optional*, defaults to 0.0):
            Dropout between the GeGLU and the MLP's output projection.
        global_attn_every_n_layers (`int`, *optional*, defaults to 3):
            Layer `i` attends globally when `i % global_attn_every_n_layers == 0`, else within the sliding window
            (1: every layer global).
        local_attention (`int`, *optional*, defaults to 128):
            Total width of the sliding window: a local layer's token attends to the tokens at most
            `local_attention // 2` positions away, on either side.
        global_rope_theta (`float`, *optional*, defaults to 160000.0):
            Rotary base of the global layers.
        local_rope_theta (`float`, *optional*, defaults to 10000.0):
            Rotary base of the local layers.
        classifier_activation (`str`, *optional*, defaults to `"gelu"`):
            Activation of the prediction head's dense layer.
        pad_token_id (`int`, *optional*, defaults to 0):
            Padding token id; its embedding row gets no gradient from the lookup (`padding_idx`, as in ModernBERT).
        bos_token_id, eos_token_id, cls_token_id, sep_token_id (`int`, *optional*):
            Special token ids (informational, as in `ModernBertConfig`).
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Whether the decoder shares its weight with the token embeddings.

    Example:

    ```python
    >>> from hf_streamlm.models import ModernMicroBertConfig, ModernMicroBertForMaskedLM
    >>> config = ModernMicroBertConfig(num_hidden_layers=3, num_attention_heads=2, hidden_size=8)
    >>> model = ModernMicroBertForMaskedLM(config)
    ```
    """

    model_type = "modern_microbert"

    # Dataclass fields, as in every transformers 5 config (see MicroBertConfig).
    vocab_size: int = 10000
    hidden_size: int = 16
    intermediate_size: int | None = None
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 128
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    decoder_bias: bool = True
    attention_dropout: float = 0.0
    embedding_dropout: float = 0.0
    mlp_dropout: float = 0.0
    global_attn_every_n_layers: int = 3
    local_attention: int = 128
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    classifier_activation: str = "gelu"
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = math.ceil(1.5 * self.hidden_size)
        self._check_fields()
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def sliding_window(self) -> int:
        """How far a local layer sees on each side: `local_attention // 2` (ModernBERT's `sliding_window`)."""
        return self.local_attention // 2

    def is_global_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` attends to the whole sequence (ModernBERT 4.x's rule, which 5.x turns into
        `layer_types`)."""
        return layer_idx % self.global_attn_every_n_layers == 0

    def _check_fields(self) -> None:
        # Plain ValueErrors naming the field, raised at construction and when a config.json is loaded.
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "global_attn_every_n_layers",
            "local_attention",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.head_dim % 2:
            # Rotary embeddings turn pairs of dimensions.
            raise ValueError(
                f"`hidden_size / num_attention_heads` must be even for rotary positions, got {self.head_dim}."
            )
        for name in ("attention_dropout", "embedding_dropout", "mlp_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be a probability in [0, 1), got {value!r}.")
        for name in (
            "initializer_range",
            "initializer_cutoff_factor",
            "norm_eps",
            "global_rope_theta",
            "local_rope_theta",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        for name in ("hidden_activation", "classifier_activation"):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in ACT2FN:
                raise ValueError(f"`{name}` must be one of {sorted(ACT2FN)}, got {value!r}.")
        if self.pad_token_id is not None and (
            isinstance(self.pad_token_id, bool)
            or not isinstance(self.pad_token_id, numbers.Integral)
            or not 0 <= self.pad_token_id < self.vocab_size
        ):
            raise ValueError(
                f"`pad_token_id` must be None or an integer in [0, vocab_size={self.vocab_size}), "
                f"got {self.pad_token_id!r}."
            )


__all__ = ["ModernMicroBertConfig"]
