"""MicroBERT model configuration.

MicroBERT is the BERT architecture (learned absolute positions, token type embeddings, post-LayerNorm blocks,
GELU MLP, tied masked-LM head) at the tiny sizes this project pretrains. Every field keeps the name and meaning it
has in `transformers.BertConfig`, so exporting a checkpoint to a stock BERT is a plain copy of these values.

This file is copied next to the weights by the "custom" export and imported by `trust_remote_code=True` loaders in
processes where `hf_streamlm` is not installed: it must import nothing but `transformers` (and the standard library).
"""

import numbers

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN


class MicroBertConfig(PreTrainedConfig):
    r"""
    Configuration of a [`MicroBertModel`] / [`MicroBertForMaskedLM`].

    Args:
        vocab_size (`int`, *optional*, defaults to 10000):
            Number of tokens in the vocabulary (rows of the word embedding and of the tied MLM decoder).
        hidden_size (`int`, *optional*, defaults to 16):
            Width of the residual stream. Must be divisible by `num_attention_heads`.
        num_hidden_layers (`int`, *optional*, defaults to 6):
            Number of encoder layers.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Number of attention heads per layer.
        intermediate_size (`int`, *optional*):
            Width of the MLP hidden layer. `None` means `4 * hidden_size`, the BERT ratio.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLP and of the MLM head transform; any key of `transformers.activations.ACT2FN`.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on embeddings and on the outputs of the attention and MLP sublayers.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1):
            Dropout on the attention probabilities.
        max_position_embeddings (`int`, *optional*, defaults to 128):
            Longest sequence the learned position table can encode.
        type_vocab_size (`int`, *optional*, defaults to 2):
            Number of token type (segment) ids.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of all weight matrices and embeddings.
        layer_norm_eps (`float`, *optional*, defaults to 1e-12):
            Epsilon of every LayerNorm.
        pad_token_id (`int`, *optional*, defaults to 0):
            Padding token id; its word embedding row is zero-initialised and gets no gradient from the lookup.
        bos_token_id (`int`, *optional*):
            Beginning-of-sequence token id (informational, as in `BertConfig`).
        eos_token_id (`int`, *optional*):
            End-of-sequence token id (informational, as in `BertConfig`).
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Whether the MLM decoder shares its weight with the word embeddings.

    Example:

    ```python
    >>> from hf_streamlm.models import MicroBertConfig, MicroBertForMaskedLM
    >>> config = MicroBertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=4)
    >>> model = MicroBertForMaskedLM(config)
    ```
    """

    model_type = "microbert"

    # Fields are dataclass fields, as in every transformers 5 config: `PreTrainedConfig.__init_subclass__` turns
    # the class into a keyword-only dataclass whose generated `__init__` assigns them, forwards unknown keys
    # (`architectures`, `auto_map`, `attn_implementation`, ...) to `__post_init__` and never drops them.
    vocab_size: int = 10000
    hidden_size: int = 16
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 128
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        # `__post_init__` is the last step of the generated `__init__`, so a bad value fails at construction (and
        # when a config.json is loaded), before any model is built from it.
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self._check_fields()
        super().__post_init__(**kwargs)

    def _check_fields(self) -> None:
        # Plain ValueErrors naming the field. (Decorating the class with huggingface_hub's `@strict` would wrap
        # them in StrictDataclass*Error, which is not a ValueError.)
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")

        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )

        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be a probability in [0, 1), got {value!r}.")

        for name in ("initializer_range", "layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")

        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of {sorted(ACT2FN)}, got {self.hidden_act!r}.")

        if self.pad_token_id is not None and (
            isinstance(self.pad_token_id, bool)
            or not isinstance(self.pad_token_id, numbers.Integral)
            or not 0 <= self.pad_token_id < self.vocab_size
        ):
            # The embedding uses it as `padding_idx`, which torch rejects outside the vocabulary.
            raise ValueError(
                f"`pad_token_id` must be None or an integer in [0, vocab_size={self.vocab_size}), "
                f"got {self.pad_token_id!r}."
            )


__all__ = ["MicroBertConfig"]
