"""PyTorch decoder: the Llama architecture as a causal LM, written for pretraining runs.

The module tree, and therefore every parameter name, is the one of `transformers.LlamaForCausalLM`:
`model.embed_tokens.weight`, `model.layers.0.input_layernorm.weight`, `model.layers.0.self_attn.q_proj.weight`
(`k_proj`, `v_proj`, `o_proj`), `model.layers.0.post_attention_layernorm.weight`, `model.layers.0.mlp.gate_proj.weight`
(`up_proj`, `down_proj`), `model.norm.weight`, `lm_head.weight`. No buffers are registered (the rotary frequencies are
recomputed per call), so the state dict loads into a stock `LlamaForCausalLM` unchanged and the native export is a
pure config translation.

What this file adds to (or does differently from) the stock implementation, for pretraining:

- Packed sequences: `document_ids` (batch, keys) restricts attention to earlier tokens of the same document
  (causal AND block-diagonal), in both attention paths; `position_ids` restarting at each document are honoured by
  RoPE. Without `document_ids`, the document boundaries are read off restarting `position_ids` the way
  transformers 5.23's `create_causal_mask` does (no attention mask, nothing cached), so the two models agree.
- `residual_dropout` on the embeddings and on each sublayer output (Llama has no dropout there).
- Attention chosen by `config._attn_implementation`: "eager" (softmax in float32) and "sdpa" here, sharing a
  boolean mask, with no mask at all when the plain causal pattern suffices (so SDPA can use its fastest kernels);
  any other name through transformers' attention interface, each handed the mask format it takes (`mask_format`):
  "flex_attention" a document-causal `BlockMask`, "flash_attention_2/3" the segments of the batch flattened into one
  sequence (`cu_seq_lens_q/k`, `max_length_q/k`: from the training collator, else derived once per forward), at any
  batch size, so packed documents never build a dense T x T mask there.
- A float32 shifted cross-entropy that honours the `num_items_in_batch` the Trainer passes under gradient
  accumulation. A forward that will be differentiated computes it fused with the LM head, `loss_chunk_size`
  positions at a time (`LinearCrossEntropy`): the (batch, seq, vocab) logits are never materialised, and their
  gradient is taken chunk by chunk in the forward (Liger's fused linear cross-entropy, in plain PyTorch).
- An optional z-loss in training (`config.z_loss`: coefficient x mean log(Z)^2, PaLM's and OLMo's), added to the
  loss and reported apart in the output's `z_loss` (`DecoderCausalLMOutput`).

This file is copied next to the weights by the "custom" export and imported with `trust_remote_code=True` in
processes where `hf_streamlm` is not installed: it imports only torch, transformers and, relatively, its config.
"""

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_decoder import SUPPORTED_ROPE_TYPES, DecoderConfig


if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


# transformers 5.24 renamed the key/value cache from `past_key_values` to `cache`: the argument `generate` passes to
# `forward`, and the field of the model outputs it reads the cache back from. Up to 5.23 both are `past_key_values`.
# The forwards take either name; outputs are built with the field this transformers declares (an output built with
# the other name is renamed by 5.24 with a deprecation warning, and would fail to build on 5.23).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None, caller: str) -> Cache | None:
    """The cache passed under either name (`past_key_values` is the pre-5.24 spelling); both at once is an error.

    Where the installed transformers has renamed it (5.24 on), `past_key_values` warns as transformers'
    `deprecate_kwarg` makes a stock model's `forward` warn (a FutureWarning, "`past_key_values` is deprecated");
    before 5.24 it is the name `generate` itself passes, and stays silent.
    """
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("Pass the key/value cache as `cache` or as `past_key_values`, not both.")
    if CACHE_FIELD == "cache" and not torch.compiler.is_compiling():
        warnings.warn(
            f"`past_key_values` is deprecated for `{caller}` (transformers 5.24 renamed it). Use `cache` instead.",
            FutureWarning,
            stacklevel=3,
        )
    return past_key_values


class DecoderRMSNorm(nn.Module):
    """Root-mean-square LayerNorm without centring or bias (Zhang & Sennrich 2019), Llama's normalisation.

    Statistics in float32 and the weight applied after casting back, in that order, as in `LlamaRMSNorm`, so that
    exported checkpoints reproduce these activations bit for bit. On float32 inputs and weights (training under
    autocast keeps the residual stream in float32) torch's fused `rms_norm` computes the same values in one kernel,
    forward and backward: bit for bit on the CPU (tests/models/test_decoder_norm.py) and a fraction of the time of the
    five elementwise kernels.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        if input_dtype == torch.float32 and self.weight.dtype == torch.float32:
            return nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class DecoderRotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings (Su et al. 2021, "RoFormer") for given `position_ids`.

    The inverse frequencies are `theta ** (-2i / head_dim)`, rescaled as the `rope_type` of `config.rope_parameters`
    says and recomputed on every call (head_dim / 2 numbers): no buffer means nothing to initialise after a
    meta-device `from_pretrained`, nothing to keep in float32 under `.to(bf16)`, and no extra state dict keys. The
    call is `LlamaRotaryEmbedding`'s, `(x, position_ids) -> (cos, sin)`, and `inv_freq` / `attention_scaling` read
    as its attributes do after initialisation. Each variant is the function of the same `rope_type` in transformers'
    `modeling_rope_utils`, in the same float operations, so that the tables equal a stock Llama's bit for bit
    (tests/models/test_decoder_contracts.py):

    - "linear" (kaiokendev 2023; Chen et al. 2023, "Extending Context Window ... via Positional Interpolation"):
      frequencies divided by `factor`, i.e. positions compressed by `factor`.
    - "dynamic" (NTK-aware, bloc97/emozilla 2023): while the longest position + 1 (`seq_len`) is within
      `max_position_embeddings` the frequencies are the plain ones; beyond it the base becomes
      `theta * (factor * seq_len / max_position_embeddings - (factor - 1)) ** (head_dim / (head_dim - 2))`.
      (transformers keeps the last grown table while later inputs stay longer than `max_position_embeddings`; this
      module always uses the current input's length, which only differs for inputs shorter than an earlier one.)
    - "yarn" (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models"): each frequency
      a blend of the plain one and the one divided by `factor`, by a linear ramp over the dimensions that make
      between `beta_fast` (32) and `beta_slow` (1) turns within `original_max_position_embeddings`; cos and sin are
      multiplied by `attention_factor`, by default the paper's 0.1 ln(factor) + 1 (Eq. 21; with `mscale` and
      `mscale_all_dim`, DeepSeek's ratio of two such terms).
    - "llama3" (Meta, Llama 3.1): frequencies whose wavelength exceeds `original_max_position_embeddings /
      low_freq_factor` divided by `factor`, those under `original_max_position_embeddings / high_freq_factor` kept,
      and the band between interpolated smoothly.
    - "longrope" (Ding et al. 2024, "LongRoPE"; Phi-3): frequency i divided by `short_factor[i]` while `seq_len` is
      within `original_max_position_embeddings`, by `long_factor[i]` beyond; cos and sin are multiplied by
      `attention_factor`, by default sqrt(1 + ln(factor) / ln(original_max_position_embeddings)), `factor`
      defaulting to `max_position_embeddings / original_max_position_embeddings`.

    `original_max_position_embeddings` defaults to `max_position_embeddings`, as transformers'
    `standardize_rope_params` fills it in.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config

    @property
    def inv_freq(self) -> torch.Tensor:
        """The inverse frequencies of inputs within the trained length (float32): what `LlamaRotaryEmbedding.inv_freq`
        holds after initialisation. Computed on each read, not a buffer."""
        return self.frequencies()[0]

    @property
    def attention_scaling(self) -> float:
        """The factor of cos and sin (1.0 but for "yarn" and "longrope"): `LlamaRotaryEmbedding.attention_scaling`."""
        return self.frequencies()[1]

    def frequencies(self, position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """`(inv_freq, attention_scaling)` for inputs at `position_ids` (None: inputs within the trained length); only
        "dynamic" and "longrope" depend on the positions, through their longest one."""
        rope = self.config.rope_parameters
        rope_type = rope.get("rope_type", "default")
        dim = self.config.head_dim
        base = rope["rope_theta"]
        device = None if position_ids is None else position_ids.device
        max_positions = self.config.max_position_embeddings
        original_length = rope.get("original_max_position_embeddings") or max_positions
        # int64 arange then float, as transformers does, so the exponents (hence the frequencies) are bit-identical.
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim

        if rope_type == "default":
            return 1.0 / base**exponents, 1.0
        if rope_type == "linear":
            return 1.0 / base**exponents / rope["factor"], 1.0
        if rope_type == "dynamic":
            factor = rope["factor"]
            seq_len = max_positions if position_ids is None else torch.max(position_ids) + 1
            # Data-dependent branch (a host sync), where transformers' `dynamic_rope_update` has it. Within the
            # trained length the formula is evaluated in Python floats at seq_len = max_position_embeddings (the
            # base is then theta, up to rounding when `factor` is not an integer), beyond it in float32 tensors:
            # the two ways transformers evaluates it, so the frequencies match a stock Llama bit for bit.
            if not seq_len > max_positions:
                seq_len = max_positions
            base = base * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))
            return 1.0 / base**exponents, 1.0
        if rope_type == "yarn":
            return self._yarn(rope, base, exponents, original_length)
        if rope_type == "llama3":
            inv_freq = 1.0 / base**exponents
            factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
            wavelength = 2 * math.pi / inv_freq
            long_waves = wavelength > original_length / low
            scaled = torch.where(long_waves, inv_freq / factor, inv_freq)
            smooth = (original_length / wavelength - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium_waves = ~(wavelength < original_length / high) * ~long_waves
            return torch.where(medium_waves, smoothed, scaled), 1.0
        if rope_type == "longrope":
            factor = rope.get("factor")
            if factor is None:
                factor = max_positions / original_length
            scaling = rope.get("attention_factor")
            if scaling is None:
                scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_length))
            powers = base**exponents
            short = 1.0 / (torch.tensor(rope["short_factor"], dtype=torch.float32, device=device) * powers)
            if position_ids is None:
                return short, scaling
            long = 1.0 / (torch.tensor(rope["long_factor"], dtype=torch.float32, device=device) * powers)
            # A 0-dim condition: no host sync (transformers' `longrope_frequency_update` selects the same way).
            return torch.where(torch.max(position_ids) + 1 > original_length, long, short), scaling
        raise ValueError(
            f"`rope_parameters` has rope_type {rope_type!r}; the decoder implements {list(SUPPORTED_ROPE_TYPES)}."
        )

    def _yarn(
        self, rope: dict, base: float, exponents: torch.Tensor, original_length: int
    ) -> tuple[torch.Tensor, float]:
        """YaRN's frequencies and cos/sin factor (transformers' `_compute_yarn_parameters`)."""
        dim = 2 * exponents.shape[0]
        factor = rope.get("factor")
        if factor is None:
            factor = self.config.max_position_embeddings / original_length
        scaling = rope.get("attention_factor")
        if scaling is None:
            mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                scaling = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
            else:
                scaling = _yarn_mscale(factor)

        def dimension(turns: float) -> float:
            # The dimension whose wavelength 2 pi theta^(2i/dim) fits `turns` times into the original length.
            return (dim * math.log(original_length / (turns * 2 * math.pi))) / (2 * math.log(base))

        low, high = dimension(rope.get("beta_fast") or 32), dimension(rope.get("beta_slow") or 1)
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # a ramp of zero width would divide by zero
        ramp = (torch.arange(dim // 2, dtype=torch.float32, device=exponents.device) - low) / (high - low)
        keep_plain = 1 - ramp.clamp(0, 1)  # the weight of the plain (extrapolated) frequency
        powers = base**exponents
        inv_freq = 1.0 / (factor * powers) * (1 - keep_plain) + 1.0 / powers * keep_plain
        return inv_freq, scaling

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(cos, sin)`, each `(batch or 1, seq, head_dim)` in `x.dtype` (`x` gives only the dtype); angles are
        computed in float32."""
        inv_freq, scaling = self.frequencies(position_ids)
        freqs = position_ids[..., None].float() * inv_freq
        # Llama's layout: the two halves of a head (not interleaved pairs) form the rotated pairs.
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if scaling != 1.0:
            cos, sin = cos * scaling, sin * scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature factor 0.1 mscale ln(scale) + 1 (Peng et al. 2023, Eq. 21), 1 for scale <= 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `(batch, heads, seq, head_dim)` queries and keys by the angles whose cos/sin are `(batch, seq, head_dim)`."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (query * cos) + (rotate_half(query) * sin), (key * cos) + (rotate_half(key) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """`(batch, kv_heads, seq, dim)` -> `(batch, kv_heads * n_rep, seq, dim)`, each key/value head serving `n_rep`
    consecutive query heads (grouped-query attention)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
    dropout: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax(QK^T * scaling) V; also returns the probabilities.

    `query` is `(batch, heads, q_len, head_dim)`, `key`/`value` `(batch, kv_heads, k_len, head_dim)`.
    `attention_mask` is boolean (True = may attend) broadcastable to `(batch, heads, q_len, k_len)`, or an additive
    float mask of that shape; when it is None and `is_causal`, queries are the last `q_len` positions of the keys.
    """
    n_rep = query.shape[1] // key.shape[1]
    key = repeat_kv(key, n_rep)
    value = repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is None and is_causal:
        q_len, k_len = scores.shape[-2:]
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    # Softmax in float32: under bf16/fp16 a half-precision softmax over long rows loses the small probabilities.
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=dropout > 0.0)
    return torch.matmul(probs, value), probs


def sdpa_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
    dropout: float,
) -> tuple[torch.Tensor, None]:
    """Same contract as `eager_attention_forward`, via `torch.nn.functional.scaled_dot_product_attention`."""
    n_rep = query.shape[1] // key.shape[1]
    use_gqa = False
    if n_rep > 1:
        # The fused kernels take grouped K/V natively only without a mask; with one, PyTorch would fall back to the
        # slow math kernel, so the heads are materialised instead (the rule of transformers' `use_gqa_in_sdpa`).
        if attention_mask is None:
            use_gqa = True
        else:
            key = repeat_kv(key, n_rep)
            value = repeat_kv(value, n_rep)
    output = nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        # SDPA's `is_causal` aligns the triangle top-left; callers only ask for it when q_len == k_len.
        is_causal=is_causal and attention_mask is None and query.shape[-2] > 1,
        scale=scaling,
        enable_gqa=use_gqa,
    )
    return output, None


def check_key_shape(name: str, tensor: torch.Tensor | None, batch_size: int, key_length: int) -> None:
    """A 2D per-key input (`attention_mask`, `document_ids`) covers the cached and the current tokens."""
    if tensor is not None and (tensor.dim() != 2 or tensor.shape[-1] != key_length):
        raise ValueError(
            f"`{name}` must have shape (batch_size, past + current sequence length) = "
            f"({batch_size}, {key_length}), got {tuple(tensor.shape)}."
        )


# transformers' `FlashAttentionKwargs` for padding-free batches: the segments of the batch flattened into one sequence.
FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def mask_format(attn_implementation: str, output_attentions: bool = False) -> str:
    """The attention inputs each attention implementation takes, as transformers' `masking_utils` hands them out:

    - "block": a FlexAttention `BlockMask`, built from the document/padding/causal rule (never a dense T x T);
    - "varlen": for the flash kernels, packed documents (and padding) as the segments of the batch flattened into
      one sequence (`cu_seq_lens_q/k`, `max_length_q/k`: `DecoderModel._flash_inputs`), at any batch size; no
      mask. transformers' own fallback, segments read off restarting `position_ids` in every layer, only works at
      batch size 1 (at batch 2 it runs plain causal flash, and documents attend to each other);
    - "dense": a boolean `(batch, 1, q, k)` mask, or None when the plain causal pattern suffices (eager, sdpa, and
      any other function registered with transformers' `AttentionInterface`).
    """
    if output_attentions:
        return "dense"  # probabilities only exist on the eager path
    if attn_implementation == "flex_attention":
        return "block"
    if attn_implementation.startswith("flash_attention"):
        return "varlen"
    return "dense"


def flex_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: "BlockMask",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' "flex_attention" function, with its kernel compiled for static shapes on the CPU.

    transformers compiles `flex_attention` once with torch.compile's default `dynamic=None`, so the first shape that
    changes (batch 1, then 2) makes dynamo recompile with symbolic sizes. Inductor's C++ FlexAttention template
    (torch 2.13, `_inductor/codegen/cpp_flex_attention_template.py`) then renames its block-size arguments back by
    plain text replacement (`ks1` -> `cur_qSplitSize`), which also rewrites any later size argument `ks1<digit>`,
    e.g. the batch size of the `document_ids` the mask function reads: the C++ does not compile (`'cur_qSplitSize8'
    was not declared`). Without automatic dynamic shapes, each new shape compiles static, as the first one did (up
    to torch._dynamo's `recompile_limit` shapes, then flex_attention's unfused implementation). The GPU's Triton
    template has no such replacement and keeps its dynamic kernel; inside a compiled model the caller's compile rules.
    """
    flex = ALL_ATTENTION_FUNCTIONS["flex_attention"]
    if query.device.type != "cpu" or torch.compiler.is_compiling():
        return flex(module, query, key, value, attention_mask, **kwargs)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        return flex(module, query, key, value, attention_mask, **kwargs)


class DecoderAttention(nn.Module):
    """Causal multi-head self-attention with grouped-query K/V heads, RoPE on queries and keys, and a KV cache."""

    # Read by transformers' attention functions (flash) when no `is_causal` is passed.
    is_causal = True

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.config = config
        # Position of this layer in the KV cache.
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        # Query heads per K/V head; transformers' attention functions read it from the module (as Llama's).
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **attention_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_kwargs` go to the functions of transformers' attention interface only (the flash kernels'
        `cu_seq_lens_q/k` and `max_length_q/k`; see `DecoderModel._flash_inputs`)."""
        batch_size, seq_length, _ = hidden_states.shape
        head_shape = (batch_size, seq_length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(head_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(head_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(head_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)

        if cache is not None:
            # Rotated keys are cached: a later step only rotates its own new keys.
            key, value = cache.update(key, value, self.layer_idx)

        # Read at call time (not cached in __init__) so `model.set_attn_implementation(...)` takes effect at once.
        # Probabilities only exist on the eager path, so asking for them selects it for this call.
        implementation = "eager" if output_attentions else self.config._attn_implementation
        dropout = self.config.attention_dropout if self.training else 0.0
        if implementation in ("eager", "sdpa"):
            attention_fn = sdpa_attention_forward if implementation == "sdpa" else eager_attention_forward
            context, probs = attention_fn(
                query, key, value, attention_mask, is_causal=is_causal, scaling=self.scaling, dropout=dropout
            )
            context = context.transpose(1, 2)
        else:
            # Any other name is dispatched through transformers' attention interface (flex_attention,
            # flash_attention_2/3, kernels registered by the user), with the module-first signature and the
            # (batch, q_len, heads, head_dim) output its functions share; flex_attention through its CPU wrapper.
            flex = implementation == "flex_attention"
            context, probs = (flex_attention_forward if flex else ALL_ATTENTION_FUNCTIONS[implementation])(
                self,
                query,
                key,
                value,
                attention_mask,
                scaling=self.scaling,
                dropout=dropout,
                is_causal=is_causal,
                **attention_kwargs,
            )
        context = context.reshape(batch_size, seq_length, -1)
        return self.o_proj(context), probs


class DecoderMLP(nn.Module):
    """Gated MLP, down(act(gate(x)) * up(x)): SwiGLU with the default SiLU (Shazeer 2020)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(GradientCheckpointingLayer):
    """One pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), with `residual_dropout` on each branch.

    Subclassing `GradientCheckpointingLayer` is how transformers 5 checkpoints: `gradient_checkpointing_enable()`
    flags every such layer and its `forward` is then re-run in backward. Tensors that need gradients must therefore
    be passed positionally. The cache must not be appended to twice by that replay: `DecoderModel.forward` passes
    none while checkpointing (the wrapper's own guard looks for `cache` from transformers 5.24 on and for
    `past_key_values` before).
    """

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = DecoderRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = DecoderAttention(config, layer_idx)
        self.post_attention_layernorm = DecoderRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = DecoderMLP(config)
        self.residual_dropout = nn.Dropout(config.residual_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **attention_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_output, probs = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings,
            attention_mask=attention_mask,
            is_causal=is_causal,
            cache=cache,
            output_attentions=output_attentions,
            **attention_kwargs,
        )
        hidden_states = hidden_states + self.residual_dropout(attention_output)
        mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + self.residual_dropout(mlp_output)
        return hidden_states, probs


class DecoderPreTrainedModel(PreTrainedModel):
    config_class = DecoderConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    # The cache is created on the first layer's device and grows there (accelerate must not move it).
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    # Through transformers' attention interface (see `DecoderAttention.forward`); names of transformers 5.x.
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers decides whether `set_attn_implementation` may switch a live model by grepping the modeling
        # source for `ALL_ATTENTION_FUNCTIONS.get_interface(`, and otherwise only warns and keeps the old value.
        # Switching is safe here: the attention reads `config._attn_implementation` on every call, and the
        # requested value is still validated against `_supports_sdpa` / eager by `set_attn_implementation`.
        return True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Llama initialisation: N(0, initializer_range) weights and embeddings, zero biases, unit RMSNorm weights.

        No embedding row is zeroed for `pad_token_id` (see `DecoderConfig`). The `transformers.initialization`
        functions skip tensors flagged as already loaded, so `from_pretrained` only initialises what the checkpoint
        lacks.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DecoderRMSNorm):
            init.ones_(module.weight)


class DecoderModel(DecoderPreTrainedModel):
    """The bare decoder: token embeddings, layers and final RMSNorm (Llama's `LlamaModel`)."""

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        # No `padding_idx`: the pad id is often the EOS id in decoder tokenizers, and EOS must get gradients.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.residual_dropout)
        self.layers = nn.ModuleList([DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
        self.norm = DecoderRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DecoderRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @staticmethod
    def _documents_from_positions(position_ids: torch.Tensor, batch_size: int) -> torch.Tensor | None:
        """Document index of every token of a packed row whose positions restart per document, or None if no row
        restarts: a new document starts wherever a position is not its predecessor + 1 (the rule of transformers'
        `find_packed_sequence_indices`)."""
        position_ids = position_ids.expand(batch_size, -1)
        previous = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], dim=-1)
        document_ids = (position_ids != previous + 1).cumsum(-1)
        # Data-dependent: skipped while compiling, where the (harmless) block mask is always built.
        if not torch.compiler.is_compiling() and not bool(document_ids[:, -1].any()):
            return None
        return document_ids

    @staticmethod
    def _build_attention_mask(
        attention_mask: torch.Tensor | None,
        document_ids: torch.Tensor | None,
        batch_size: int,
        query_length: int,
        past_length: int,
        key_length: int,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, bool]:
        """Return `(mask, is_causal)` for the attention functions.

        The mask is boolean `(batch, 1, q_len, k_len)`, True where query i (at cache index past_length + i) may
        attend key j: j <= past_length + i, key j not padding, and, with `document_ids`, both in the same document.
        Boolean rather than additive: dtype independent, and both attention paths take it. `(None, True)` means the
        plain causal pattern with queries at the end of the keys (no padding, no documents, and q_len == k_len or a
        single query), which SDPA computes without a mask tensor.
        """
        if attention_mask is not None and attention_mask.dim() == 4:
            # A prepared mask (e.g. the one `generate` builds for a static cache) is used as given.
            if document_ids is not None:
                raise ValueError("`document_ids` cannot be combined with a 4D `attention_mask`.")
            return attention_mask.to(device), False

        check_key_shape("attention_mask", attention_mask, batch_size, key_length)
        check_key_shape("document_ids", document_ids, batch_size, key_length)
        keep = None
        if attention_mask is not None:
            keep = attention_mask.to(device=device, dtype=torch.bool)
            # Without padding there is nothing to mask. The check reads the tensor, so it is skipped while compiling.
            if not torch.compiler.is_compiling() and bool(keep.all()):
                keep = None

        plain_causal = query_length == key_length or (query_length == 1 and key_length == past_length + 1)
        if keep is None and document_ids is None and plain_causal:
            return None, True

        query_index = torch.arange(past_length, past_length + query_length, device=device)
        key_index = torch.arange(key_length, device=device)
        mask = (key_index[None, :] <= query_index[:, None])[None, None]  # (1, 1, q, k)
        if keep is not None:
            mask = mask & keep[:, None, None, :]
        if document_ids is not None:
            document_ids = document_ids.to(device)
            query_documents = document_ids[:, past_length : past_length + query_length]
            mask = mask & (query_documents[:, None, :, None] == document_ids[:, None, None, :])
        mask = mask.expand(batch_size, 1, query_length, key_length)
        # A query that may attend nothing (a left-padding position) would give NaN in the fused kernels and then in
        # the gradients; let it attend everywhere instead (its output is padding and nothing real attends to it).
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        return mask, False

    @staticmethod
    def _build_block_mask(
        attention_mask: torch.Tensor | None,
        document_ids: torch.Tensor | None,
        batch_size: int,
        query_length: int,
        past_length: int,
        key_length: int,
        device: torch.device,
    ) -> tuple["BlockMask", bool]:
        """The rule of `_build_attention_mask` (causal, padding, same document) as a FlexAttention `BlockMask`.

        The mask function is evaluated per (query, key) block, and FlexAttention skips blocks that are wholly
        masked: the upper triangle and, with packed documents, every cross-document block (torchtitan's document
        masking). A query with nothing to attend (left padding) gets a zero output instead of NaN.
        """
        from torch.nn.attention.flex_attention import create_block_mask

        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("flex_attention takes a 2D padding `attention_mask` (or `document_ids`), not a 4D mask.")
        check_key_shape("attention_mask", attention_mask, batch_size, key_length)
        check_key_shape("document_ids", document_ids, batch_size, key_length)
        # Rows of 1 broadcast over the batch, as in the dense mask; the mask function indexes by batch row.
        keep = attention_mask.to(device, torch.bool).expand(batch_size, -1) if attention_mask is not None else None
        documents = document_ids.to(device).expand(batch_size, -1) if document_ids is not None else None

        def document_causal(batch, head, query, key):
            allowed = key <= query + past_length
            if documents is not None:
                allowed = allowed & (documents[batch, query + past_length] == documents[batch, key])
            if keep is not None:
                allowed = allowed & keep[batch, key]
            return allowed

        per_row = keep is not None or documents is not None
        block_mask = create_block_mask(
            document_causal,
            B=batch_size if per_row else None,
            H=None,
            Q_LEN=query_length,
            KV_LEN=key_length,
            device=device,
            # Compiled, the mask is built block by block instead of materialising (B, Q, KV) first.
            _compile=device.type == "cuda",
        )
        return block_mask, False

    @staticmethod
    def _flash_inputs(
        attention_mask: torch.Tensor | None,
        document_ids: torch.Tensor | None,
        varlen: dict,
        batch_size: int,
        query_length: int,
        past_length: int,
    ) -> tuple[torch.Tensor | None, dict]:
        """`(mask, attention_kwargs)` for the flash kernels (transformers' `_flash_attention_forward`).

        Packed documents or padding at the start of a sequence become segments of the batch flattened into one
        sequence: the kernels' variable-length entry point (`flash_attn_varlen_func`) then attends within each
        segment, at any batch size, the same attention as the document mask of the other kernels. `varlen` are
        the segments given by the caller (`FLASH_VARLEN_KWARGS`; the training collator computes them on the CPU,
        `hf_streamlm.data.collate.varlen_kwargs`): used as given, nothing is read back from the device. Without
        them they are derived here, once per forward (one read-back for the longest segment), rather than by
        transformers once per layer. The padding of a generation step with a cache goes as the 2D mask (the
        kernels' own unpadding).
        """
        if varlen:
            if len(varlen) < len(FLASH_VARLEN_KWARGS):
                missing = [key for key in FLASH_VARLEN_KWARGS if key not in varlen]
                raise ValueError(f"the flash kernels' segments need all of {FLASH_VARLEN_KWARGS}; missing {missing}")
            if past_length:
                raise ValueError("`cu_seq_lens_q/k` describe a whole flattened batch: not combinable with a cache")
            return None, varlen
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("the flash kernels take a 2D padding `attention_mask`, not a 4D mask.")
        if past_length or query_length == 1:  # a cached step, or one token: nothing to split
            if document_ids is not None and past_length:
                raise ValueError("`document_ids` with the flash kernels need the whole sequence (no cache)")
            return attention_mask, {}
        keep = attention_mask
        if keep is not None and bool(keep.all()):  # without padding there is nothing to mask
            keep = None
        if keep is None and document_ids is None:
            return None, {}  # the plain causal pattern: flash's dense entry point
        device = (keep if keep is not None else document_ids).device
        starts = torch.zeros(batch_size, query_length, dtype=torch.bool, device=device)
        starts[:, 0] = True
        if keep is not None:
            keep = keep.expand(batch_size, -1)
            starts[:, 1:] |= keep[:, 1:] != keep[:, :-1]
        if document_ids is not None:
            documents = document_ids.expand(batch_size, -1)
            starts[:, 1:] |= documents[:, 1:] != documents[:, :-1]
        total = torch.tensor([batch_size * query_length], device=device)
        offsets = torch.cat([starts.reshape(-1).nonzero().reshape(-1), total]).to(torch.int32)
        longest = int(offsets.diff().max())
        return None, {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest,
                      "max_length_k": longest}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        document_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids. Exactly one of `input_ids` and `inputs_embeds` must be given.
            attention_mask (`torch.Tensor` of shape `(batch_size, past + sequence_length)`, *optional*):
                1 for tokens to attend to, 0 for padding, covering the cached tokens too (as `generate` passes it).
                A 4D mask `(batch_size, 1, sequence_length, keys)`, boolean or additive, is used as given.
            position_ids (`torch.LongTensor` of shape `(batch_size or 1, sequence_length)`, *optional*):
                RoPE positions; `past .. past + sequence_length - 1` when omitted. Positions restarting at 0 for each
                packed document make every document see the positions it would see alone; when no `attention_mask`
                and no `document_ids` are given and nothing is cached, such restarts also separate the documents'
                attention (as in transformers' `LlamaModel`).
            cache (`Cache`, *optional*):
                Key/value cache of earlier tokens (a `DynamicCache` is created when `use_cache` and none is given).
                Returned in the output's `cache` field (`past_key_values` before transformers 5.24).
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Precomputed token embeddings, used instead of `input_ids`.
            use_cache (`bool`, *optional*):
                Return the key/value cache. Defaults to `config.use_cache` in evaluation mode and to False in
                training mode, where a cache is never read (and is dropped by gradient checkpointing anyway).
            output_attentions (`bool`, *optional*):
                Return the attention probabilities of every layer (computed on the eager path for this call).
            output_hidden_states (`bool`, *optional*):
                Return the embedding output, the input of every further layer and the final normed output
                (`num_hidden_layers + 1` tensors, the transformers 4 Llama convention).
            return_dict (`bool`, *optional*):
                Return a `BaseModelOutputWithPast` (default) rather than a tuple.
            document_ids (`torch.LongTensor` of shape `(batch_size, past + sequence_length)`, *optional*):
                Document index of every token of packed rows: a token attends only to earlier tokens with the same
                id (causal and block-diagonal). Combine with restarting `position_ids` to make each document compute
                exactly what it computes alone. Takes precedence over boundaries read off `position_ids` (pass zeros
                to let documents attend to each other while positions restart).
            past_key_values (`Cache`, *optional*):
                The name of `cache` before transformers 5.24, still accepted.
            kwargs:
                `cu_seq_lens_q`, `cu_seq_lens_k`, `max_length_q`, `max_length_k` (transformers'
                `FlashAttentionKwargs`): the segments of the batch flattened into one sequence, which the flash
                kernels attend within; the training collator emits them for packed documents. The other kernels take
                the documents from `document_ids` and ignore them. Other keys are accepted and ignored, so that extra
                collator, Trainer or `generate` keys do not break the call.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        cache = _one_cache(cache, past_key_values, f"{type(self).__name__}.forward")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.training and torch.is_grad_enabled() and any(layer.gradient_checkpointing for layer in self.layers):
            # Checkpointed layers run twice (forward, then again in backward): a cache would be appended to twice.
            use_cache, cache = False, None
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of `input_ids` and `inputs_embeds`.")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, query_length = inputs_embeds.shape[:2]

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        # Static caches expose their full allocated length as the keys; dynamic ones past + current.
        key_length = cache.get_mask_sizes(query_length, 0)[0] if cache is not None else query_length

        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + query_length, device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0)
        elif document_ids is None and attention_mask is None and past_length == 0 and query_length > 1:
            document_ids = self._documents_from_positions(position_ids, batch_size)

        mask_kind = mask_format(self.config._attn_implementation, output_attentions)
        attention_kwargs = {}
        if mask_kind == "block":
            mask, is_causal = self._build_block_mask(
                attention_mask, document_ids, batch_size, query_length, past_length, key_length, inputs_embeds.device
            )
        elif mask_kind == "varlen":
            varlen = {key: kwargs[key] for key in FLASH_VARLEN_KWARGS if kwargs.get(key) is not None}
            mask, attention_kwargs = self._flash_inputs(
                attention_mask, document_ids, varlen, batch_size, query_length, past_length
            )
            is_causal = True
        else:
            mask, is_causal = self._build_attention_mask(
                attention_mask,
                document_ids,
                batch_size=batch_size,
                query_length=query_length,
                past_length=past_length,
                key_length=key_length,
                device=inputs_embeds.device,
            )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = self.dropout(inputs_embeds)
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, probs = layer(
                hidden_states,
                position_embeddings,
                attention_mask=mask,
                is_causal=is_causal,
                cache=cache,
                output_attentions=output_attentions,
                **attention_kwargs,
            )
            if output_attentions:
                all_attentions += (probs,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()


def _is_shard(weight: torch.Tensor) -> bool:
    """Whether `weight` is a shard that only its module's own forward hook gathers: a DeepSpeed ZeRO-3 partition
    (`ds_id`), or an FSDP2 shard (a `DTensor`, when the head is a unit of its own, as size-based wrapping makes it)."""
    if hasattr(weight, "ds_id"):
        return True
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        return isinstance(weight, DTensor)
    return False


class LinearCrossEntropy(torch.autograd.Function):
    """Cross entropy of `hidden @ weight.T` against `labels`, summed and divided by `divisor`, without the logits.

    The forward walks the rows `chunk_size` at a time: one chunk's logits (float32), their log-sum-exp and target
    logit give its loss, and the same buffer then becomes the gradient of that loss with respect to the logits
    (softmax minus one-hot, zero on ignored rows), which is multiplied into the gradients of `hidden` and `weight`
    at once. The backward only scales them by the incoming gradient. Peak memory is one chunk of logits instead of
    the full (rows, vocab) logits plus their float32 copy, log-probabilities and gradient; the matrix products are
    the three the unfused LM head does. The trick is Liger Kernel's fused linear cross entropy (Hsu et al. 2024),
    here in plain PyTorch so that it runs, and compiles, wherever the model does.

    hidden: (rows, hidden_size); weight: (vocab, hidden_size); labels: (rows,), -100 = ignored; divisor: a number
    or 0-dim tensor (the target count for a mean); z_loss: the coefficient of a z-loss added to it (the sum of
    log(Z)^2 over kept rows, over the same divisor; its gradient is 2 z_loss log(Z) softmax). Returns two float32
    scalars: the loss, and the z-loss term it includes (not differentiable; 0 without one).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor, chunk_size: int, z_loss: float = 0.0):
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden_chunks = []
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            total_z = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_size):
                rows = hidden[start : start + chunk_size]
                targets = labels[start : start + chunk_size]
                logits = (rows @ weight.T).float()
                kept = targets != -100
                safe_targets = torch.where(kept, targets, 0).unsqueeze(1)
                log_normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
                target_logit = logits.gather(1, safe_targets)
                total = total + ((log_normaliser - target_logit).squeeze(1) * kept).sum()
                # d loss / d logits = (softmax - one_hot) / divisor on kept rows, built in the logits' buffer.
                grad_logits = logits.sub_(log_normaliser).exp_()
                if z_loss:  # + z_loss * log(Z)^2: its gradient adds 2 z_loss log(Z) softmax
                    total_z = total_z + (log_normaliser.squeeze(1).square() * kept).sum()
                    grad_logits.mul_(1 + 2 * z_loss * log_normaliser)
                grad_logits.scatter_add_(1, safe_targets, torch.full_like(target_logit, -1.0))
                grad_logits.mul_((kept / divisor).unsqueeze(1))
                grad_logits = grad_logits.to(hidden.dtype)
                grad_hidden_chunks.append(grad_logits @ weight)
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, rows)
                else:  # half-precision product, summed over the chunks in float32
                    grad_weight.add_(grad_logits.T @ rows)
            grad_hidden = torch.cat(grad_hidden_chunks) if grad_hidden_chunks else torch.zeros_like(hidden)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        z_term = z_loss * total_z / divisor
        ctx.mark_non_differentiable(z_term)
        return (total + z_loss * total_z) / divisor, z_term

    @staticmethod
    def backward(ctx, grad_loss, grad_z_term):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.to(grad_hidden.dtype), grad_loss.to(grad_weight.dtype)
        return grad_hidden * scale[0], grad_weight * scale[1], None, None, None, None


@dataclass
class DecoderCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast`, plus `z_loss`: the z-loss term a training forward added to `loss` (`config.z_loss`
    > 0; None otherwise), so that `loss - z_loss` is the cross entropy alone. MoE models report their auxiliary
    loss the same way (`MoeCausalLMOutputWithPast.aux_loss`)."""

    z_loss: torch.FloatTensor | None = None


class DecoderForCausalLM(DecoderPreTrainedModel, GenerationMixin):
    """The decoder with a linear LM head (optionally tied to the embeddings); `generate()` works on it.

    transformers 5 `PreTrainedModel` no longer includes `GenerationMixin`: inheriting it directly is what makes
    `can_generate()` true and gives the model a `generation_config`. Its default `prepare_inputs_for_generation`
    (slice the new tokens, pass the cache, the 2D mask and the position ids `generate` derives from the mask)
    fits this forward as is.
    """

    # transformers 5 format: {target: source}, applied by `post_init`/`tie_weights` when `config.tie_word_embeddings`.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def _fuses_loss(self, hidden_states: torch.Tensor, logits_to_keep) -> bool:
        """Whether this forward computes the loss with `LinearCrossEntropy`: a training-mode forward that will be
        differentiated, the LM head a plain bias-free linear layer whose weight is all here, every position kept."""
        head = self.lm_head
        return (
            self.config.loss_chunk_size > 0
            and self.training
            and torch.is_grad_enabled()
            and (hidden_states.requires_grad or head.weight.requires_grad)
            and type(head) is nn.Linear
            and head.bias is None
            and not _is_shard(head.weight)
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 0
        )

    @staticmethod
    def _targets(labels: torch.Tensor, shift_labels: torch.Tensor | None) -> torch.Tensor:
        """The target of every position, flattened: `shift_labels` as given (already aligned with the positions),
        else `labels` shifted left by one, as transformers' `ForCausalLMLoss` takes them."""
        if shift_labels is not None:
            return shift_labels.reshape(-1)
        # Shift the labels, not the logits: padding one -100 on the right avoids copying the (batch, seq, vocab)
        # logits.
        return nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)

    def _fused_loss(
        self, hidden_states: torch.Tensor, labels: torch.Tensor, num_items_in_batch, shift_labels=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss and the z-loss term it includes (None when `config.z_loss` is 0)."""
        targets, name = (labels, "labels") if shift_labels is None else (shift_labels, "shift_labels")
        if targets.shape[:2] != hidden_states.shape[:2]:
            raise ValueError(
                f"`{name}` have shape {tuple(targets.shape)} but the inputs cover {tuple(hidden_states.shape[:2])}."
            )
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        weight = self.lm_head.weight
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # What autocast does to the unfused head's matmul, once for all chunks (the casts stay differentiable).
            dtype = torch.get_autocast_dtype(device_type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        flat_labels = self._targets(labels, shift_labels).to(hidden.device)
        divisor = (flat_labels != -100).sum() if num_items_in_batch is None else num_items_in_batch
        if torch.is_tensor(divisor):
            divisor = divisor.to(hidden.device)
        z_loss, chunk_size = self.config.z_loss, self.config.loss_chunk_size
        loss, z_term = LinearCrossEntropy.apply(hidden, weight, flat_labels, divisor, chunk_size, z_loss)
        return loss, (z_term if z_loss else None)

    def _loss(
        self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch, shift_labels=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss and the z-loss term it includes: a training-mode forward adds one when `config.z_loss` > 0 (the
        unfused path trains under ZeRO-3 and FSDP2); an eval-mode loss is the cross entropy alone."""
        targets, name = (labels, "labels") if shift_labels is None else (shift_labels, "shift_labels")
        if targets.shape[-1] != logits.shape[-2]:
            raise ValueError(
                f"`{name}` cover {targets.shape[-1]} positions but logits were kept for {logits.shape[-2]} "
                "(leave `logits_to_keep` at 0 when computing the loss)."
            )
        # float32 cross entropy: the log-sum-exp over the vocabulary is where half precision hurts most.
        flat_logits = logits.float().reshape(-1, logits.shape[-1])
        flat_labels = self._targets(labels, shift_labels).to(flat_logits.device)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(flat_logits.device)
        if num_items_in_batch is None:
            loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
        else:
            loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
            loss = loss / num_items_in_batch
        if not (self.training and self.config.z_loss):
            return loss, None
        kept = flat_labels != -100
        divisor = kept.sum() if num_items_in_batch is None else num_items_in_batch
        z_term = self.config.z_loss * (torch.logsumexp(flat_logits, dim=-1).square() * kept).sum() / divisor
        return loss + z_term, z_term.detach()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        document_ids: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> DecoderCausalLMOutput | tuple:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Target ids aligned with the inputs (usually the inputs themselves), -100 where no loss is wanted;
                the model shifts them: position t predicts token t + 1. The target after a packed document's last
                token is the next document's first token, as in GPT-style packing; set it to -100 to drop it.
                In training mode with gradients enabled (a training step) and `config.loss_chunk_size` > 0, the loss
                is computed fused with the LM head and the output's `logits` is None; in eval mode, or under
                `torch.no_grad()`, the output has both. With `config.z_loss` > 0 a training-mode loss includes the
                z-loss, and the output's `z_loss` holds that term.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                Compute logits only for the last `logits_to_keep` positions (0 = all), or for the given sequence
                indices; `generate` passes 1 to skip the vocabulary projection of the prompt.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*):
                Number of target tokens in the whole accumulated batch. The Trainer passes it (this forward takes
                `**kwargs`, so it treats the model as accepting loss kwargs); the loss is then the sum over this
                micro-batch divided by it, which keeps gradient accumulation exact. Without it the loss is the mean.
            shift_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                The targets already aligned with the positions (position t predicts `shift_labels[:, t]`, -100 where
                no loss is wanted), taken instead of `labels` shifted by one. Under context or sequence parallelism
                the sequence is cut into shards after the shift, so that the last token of each shard keeps its
                target: transformers' Trainer and DeepSpeed's Ulysses pass them then. Read only when `labels` is
                given, as `LlamaForCausalLM` reads them.

            The other arguments are those of [`DecoderModel.forward`].
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values, f"{type(self).__name__}.forward"),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            document_ids=document_ids,
            **{key: kwargs[key] for key in FLASH_VARLEN_KWARGS if key in kwargs},
        )
        hidden_states = outputs.last_hidden_state
        if labels is not None and self._fuses_loss(hidden_states, logits_to_keep):
            # Differentiated forward: the loss without the logits (`logits` is None in the output).
            logits = None
            loss, z_term = self._fused_loss(hidden_states, labels, num_items_in_batch, shift_labels)
        else:
            if isinstance(logits_to_keep, int):
                if logits_to_keep > 0:
                    hidden_states = hidden_states[:, -logits_to_keep:]
            else:
                hidden_states = hidden_states[:, logits_to_keep]
            logits = self.lm_head(hidden_states)
            if labels is None:
                loss, z_term = None, None
            else:
                loss, z_term = self._loss(logits, labels, num_items_in_batch, shift_labels)

        output = DecoderCausalLMOutput(
            loss=loss,
            z_loss=z_term,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["DecoderPreTrainedModel", "DecoderModel", "DecoderForCausalLM", "DecoderCausalLMOutput"]
