"""PyTorch modern MicroBERT: the ModernBERT encoder and masked-LM head, written for tiny pretraining runs.

The design is ModernBERT's (Warner et al. 2024): token embeddings then LayerNorm (no positions: rotary ones in
attention), pre-LayerNorm blocks whose first block reuses the embedding norm, attention with a fused `Wqkv`
projection that alternates between global layers and local ones limited to a sliding window (each kind with its
own rotary base), a GeGLU MLP, no biases but the decoder's, a final LayerNorm, and a prediction head (dense,
activation, LayerNorm) before a vocabulary projection tied to the embeddings.

The module tree, and therefore every parameter name, is the one of `transformers.ModernBertForMaskedLM`:
`model.embeddings.tok_embeddings.weight`, `model.embeddings.norm.weight`, `model.layers.0.attn.Wqkv.weight`,
`model.layers.0.attn.Wo.weight`, `model.layers.0.mlp_norm.weight`, `model.layers.0.mlp.Wi.weight`,
`model.layers.0.mlp.Wo.weight`, `model.layers.1.attn_norm.weight`, ..., `model.final_norm.weight`,
`head.dense.weight`, `head.norm.weight`, `decoder.weight`, `decoder.bias`. No buffers are registered (the rotary
frequencies are recomputed per call), so the state dict loads into a stock `ModernBertForMaskedLM` of transformers
4.57 or 5.x unchanged: the native export is a config translation.

What this file adds to the stock implementation, for pretraining:

- Packed documents: `document_ids` (batch, seq) restricts attention to tokens of the same document (block-diagonal,
  intersected with the sliding window on local layers), and `position_ids` restarting per document are honoured by
  the rotary embeddings: a packed block computes for each document what the document computes alone.
- Attention chosen by `config._attn_implementation`: "eager" here (softmax in float32), every other name through
  transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`: "sdpa", "flex_attention", "flash_attention_2/3",
  kernels registered by the user), each given the mask format it takes: a boolean mask (or none when nothing is
  masked) for eager/sdpa, a `BlockMask` for flex, the segments of the flattened batch (`cu_seq_lens_q/k`,
  `max_length_q/k`, from the training collator) and the window as `sliding_window` for flash.
- Sparse prediction without a host sync: in training, the head and the decoder run only at the labelled positions,
  gathered with the integer `masked_positions` the collator computed on the CPU (ModernBERT's sparse prediction
  uses a boolean index, which reads the mask back from the GPU once per micro-batch).
- A float32 masked-LM loss that honours the `num_items_in_batch` the Trainer passes under gradient accumulation.

This file is copied next to the weights by the "custom" export and imported with `trust_remote_code=True` in
processes where `hf_streamlm` is not installed: it imports only torch, transformers and, relatively, its config.
"""

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_modern_microbert import ModernMicroBertConfig


if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


GLOBAL, LOCAL = "global", "local"
"""The two kinds of attention layer: the whole sequence, or the sliding window."""

# transformers' `FlashAttentionKwargs` for padding-free batches: the segments of the batch flattened into one sequence.
FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class ModernMicroBertEmbeddings(nn.Module):
    """Token embeddings, LayerNorm, dropout. No position embeddings: positions enter as rotations in attention."""

    def __init__(self, config: ModernMicroBertConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.drop = nn.Dropout(config.embedding_dropout)

    def forward(
        self, input_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        return self.drop(self.norm(inputs_embeds))


class ModernMicroBertRotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings (Su et al. 2021, "RoFormer") at a given base.

    Inverse frequencies `theta ** (-2i / head_dim)`, recomputed on every call (head_dim / 2 numbers): no buffer, so
    nothing to initialise after a meta-device load, nothing cast to bf16 by `.to()`, no extra state dict keys. The
    angles are computed in float32 as in ModernBERT's rotary module, halves layout (not interleaved pairs).
    """

    def __init__(self, config: ModernMicroBertConfig):
        super().__init__()
        self.head_dim = config.head_dim

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)`, each `(batch or 1, seq, head_dim)` in `x.dtype` (`x` only gives the dtype)."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
        inv_freq = 1.0 / theta ** (exponents / self.head_dim)
        freqs = position_ids[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `(batch, heads, seq, head_dim)` queries and keys by angles whose cos/sin are `(batch, seq, head_dim)`.

    In float32 and cast back, as transformers 5's ModernBERT does: under bf16 the rotation of large positions
    would otherwise lose the low bits of the angle's effect.
    """
    dtype = query.dtype
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query, key = query.float(), key.float()
    rotated_query = query * cos + rotate_half(query) * sin
    rotated_key = key * cos + rotate_half(key) * sin
    return rotated_query.to(dtype), rotated_key.to(dtype)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax(QK^T * scaling) V with the signature of transformers' attention interface.

    `query`/`key`/`value` are `(batch, heads, seq, head_dim)`; `attention_mask` is boolean (True = may attend)
    broadcastable to `(batch, heads, q_len, k_len)`. Returns the output as `(batch, seq, heads, head_dim)`, as the
    interface's functions do, and the probabilities.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    # Softmax in float32: under bf16/fp16 a half-precision softmax over long rows loses the small probabilities.
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=dropout > 0.0)
    return torch.matmul(probs, value).transpose(1, 2), probs


def flex_attention_forward(module: nn.Module, query, key, value, attention_mask: "BlockMask", **kwargs):
    """transformers' "flex_attention" function; on the CPU with static shapes per call.

    Inductor's C++ FlexAttention template (torch 2.13) fails to compile once dynamo switches to dynamic sizes at the
    second input shape (see the decoder's `flex_attention_forward`); without automatic dynamic shapes each new shape
    compiles static, as the first did. The GPU path keeps transformers' own compile settings.
    """
    flex = ALL_ATTENTION_FUNCTIONS["flex_attention"]
    if query.device.type != "cpu" or torch.compiler.is_compiling():
        return flex(module, query, key, value, attention_mask, **kwargs)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        return flex(module, query, key, value, attention_mask, **kwargs)


def mask_format(attn_implementation: str, output_attentions: bool = False) -> str:
    """The attention inputs an implementation takes: "block" (a FlexAttention `BlockMask`), "varlen" (flash: the
    segments of the flattened batch, no mask), or "dense" (a boolean mask or None: eager, sdpa and any other
    function registered with transformers' `AttentionInterface`)."""
    if output_attentions:
        return "dense"  # probabilities only exist on the eager path
    if attn_implementation == "flex_attention":
        return "block"
    if attn_implementation.startswith("flash_attention"):
        return "varlen"
    return "dense"


class ModernMicroBertAttention(nn.Module):
    """Bidirectional multi-head self-attention with rotary positions; global or within the sliding window."""

    # Read by transformers' attention functions (sdpa, flash) when no `is_causal` is passed.
    is_causal = False

    def __init__(self, config: ModernMicroBertConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        # transformers' attention functions read it (grouped-query attention); every head has its own K/V here.
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.kind = GLOBAL if config.is_global_layer(layer_idx) else LOCAL
        # The flash kernels take an inclusive window of `sliding_window - 1` tokens on each side (transformers'
        # `_flash_attention_forward`), hence the + 1: ModernBERT's own setting, the same tokens as the dense mask.
        self.sliding_window = config.sliding_window + 1 if self.kind == LOCAL else None
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.Wo.output_side = True  # initialised with the depth-scaled std (see `_init_weights`)
        self.out_drop = nn.Dropout(config.attention_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: "torch.Tensor | BlockMask | None" = None,
        output_attentions: bool = False,
        **attention_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_kwargs` go to the functions of transformers' attention interface only (the flash kernels'
        `cu_seq_lens_q/k`, `max_length_q/k`)."""
        batch_size, seq_length, _ = hidden_states.shape
        # (batch, seq, 3, heads, head_dim): ModernBERT's layout of the fused projection's outputs.
        qkv = self.Wqkv(hidden_states).view(batch_size, seq_length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)

        # Read at call time so `model.set_attn_implementation(...)` takes effect at once; probabilities only exist
        # on the eager path, so asking for them selects it for this call.
        implementation = "eager" if output_attentions else self.config._attn_implementation
        if implementation == "flex_attention":
            attention_fn = flex_attention_forward
        else:
            attention_fn = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        context, probs = attention_fn(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            sliding_window=self.sliding_window,
            is_causal=False,
            **attention_kwargs,
        )
        context = context.reshape(batch_size, seq_length, -1)
        return self.out_drop(self.Wo(context)), probs


class ModernMicroBertMLP(nn.Module):
    """GeGLU (Shazeer 2020): Wo(drop(act(x Wi_value) * x Wi_gate)), the value and gate halves from one projection."""

    def __init__(self, config: ModernMicroBertConfig):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_activation]
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.Wo.output_side = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        value, gate = self.Wi(hidden_states).chunk(2, dim=-1)
        return self.Wo(self.drop(self.act(value) * gate))


class ModernMicroBertLayer(GradientCheckpointingLayer):
    """One pre-LN block: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x)).

    The first layer's `attn_norm` is the identity: its input is the embedding LayerNorm's output already (ModernBERT).
    As a `GradientCheckpointingLayer`, tensors that need gradients are passed positionally.
    """

    def __init__(self, config: ModernMicroBertConfig, layer_idx: int):
        super().__init__()
        if layer_idx == 0:
            self.attn_norm = nn.Identity()
        else:
            self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.attn = ModernMicroBertAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.mlp = ModernMicroBertMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: "torch.Tensor | BlockMask | None" = None,
        output_attentions: bool = False,
        **attention_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_output, probs = self.attn(
            self.attn_norm(hidden_states),
            position_embeddings,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            **attention_kwargs,
        )
        hidden_states = hidden_states + attention_output
        hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states, probs


class ModernMicroBertPredictionHead(nn.Module):
    """Dense + activation + LayerNorm applied to the final hidden states before the vocabulary projection."""

    def __init__(self, config: ModernMicroBertConfig):
        super().__init__()
        # ModernBERT's `classifier_bias`, False in every released checkpoint: no bias here.
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.dense.output_side = True
        self.act = ACT2FN[config.classifier_activation]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden_states)))


class ModernMicroBertPreTrainedModel(PreTrainedModel):
    config_class = ModernMicroBertConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ModernMicroBertEmbeddings", "ModernMicroBertLayer"]
    _supports_sdpa = True
    # Through transformers' attention interface (see `ModernMicroBertAttention.forward`).
    _supports_flex_attn = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """ModernBERT's initialisation (its `_init_weights`): truncated normals cut at `initializer_cutoff_factor`
        standard deviations, `initializer_range` for the embeddings and the input-side matrices (`Wqkv`, `Wi`),
        `initializer_range / sqrt(2 * num_hidden_layers)` for the output-side ones (`Wo`, the head's dense, an untied
        decoder: flagged `output_side`), zero biases, unit LayerNorms. The `transformers.initialization` functions
        skip tensors flagged as already loaded, so `from_pretrained` only initialises what the checkpoint lacks.

        Decided per leaf module: transformers calls `_init_weights` of remote code only on modules that hold
        parameters themselves, so a branch on the attention or MLP module would never run from a custom export.
        """
        config = self.config
        std = config.initializer_range
        if getattr(module, "output_side", False):
            std = std / math.sqrt(2.0 * config.num_hidden_layers)
        cutoff = config.initializer_cutoff_factor * std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            # No zeroed padding row: ModernBERT's init overwrites it too (the row only gets no gradient).
            init.trunc_normal_(module.weight, mean=0.0, std=std, a=-cutoff, b=cutoff)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class ModernMicroBertModel(ModernMicroBertPreTrainedModel):
    """The bare encoder: embeddings, layers and the final LayerNorm (ModernBERT's `ModernBertModel`)."""

    def __init__(self, config: ModernMicroBertConfig):
        super().__init__(config)
        self.embeddings = ModernMicroBertEmbeddings(config)
        self.layers = nn.ModuleList([ModernMicroBertLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.rotary_emb = ModernMicroBertRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.tok_embeddings = value

    def _dense_masks(
        self, keep: torch.Tensor | None, document_ids: torch.Tensor | None, seq_length: int, device: torch.device
    ) -> dict[str, torch.Tensor | None]:
        """Boolean masks (True = may attend) per layer kind, broadcastable to `(batch, 1, seq, seq)`, or None where
        nothing is masked (SDPA then picks its fastest kernel): padding keys, other documents, and on local layers
        keys more than `sliding_window` tokens away."""
        mask = None
        if keep is not None:
            mask = keep[:, None, None, :]
        if document_ids is not None:
            same_document = document_ids[:, None, :, None] == document_ids[:, None, None, :]
            mask = same_document if mask is None else mask & same_document
        masks = {GLOBAL: mask, LOCAL: mask}
        if self.config.sliding_window < seq_length - 1:  # else the window covers the whole sequence
            index = torch.arange(seq_length, device=device)
            window = ((index[None, :] - index[:, None]).abs() <= self.config.sliding_window)[None, None]
            masks[LOCAL] = window if mask is None else mask & window
        return masks

    def _block_masks(
        self, keep: torch.Tensor | None, document_ids: torch.Tensor | None, batch_size: int, seq_length: int,
        device: torch.device,
    ) -> dict[str, "BlockMask"]:
        """The rule of `_dense_masks` as FlexAttention `BlockMask`s: blocks wholly masked (other documents, beyond
        the window) are skipped, and no dense seq x seq mask is built."""
        from torch.nn.attention.flex_attention import create_block_mask

        window = self.config.sliding_window

        def rule(local: bool):
            def allowed(batch, head, query, key):
                ok = query >= 0
                if keep is not None:
                    ok = ok & keep[batch, key]
                if document_ids is not None:
                    ok = ok & (document_ids[batch, query] == document_ids[batch, key])
                if local:
                    ok = ok & ((query - key).abs() <= window)
                return ok

            return allowed

        per_row = keep is not None or document_ids is not None
        masks = {}
        for kind in (GLOBAL, LOCAL):
            masks[kind] = create_block_mask(
                rule(kind == LOCAL),
                B=batch_size if per_row else None,
                H=None,
                Q_LEN=seq_length,
                KV_LEN=seq_length,
                device=device,
                _compile=device.type == "cuda",
            )
        return masks

    @staticmethod
    def _flash_inputs(keep: torch.Tensor | None, document_ids: torch.Tensor | None, varlen: dict) -> dict:
        """The flash kernels' `cu_seq_lens_q/k`, `max_length_q/k`: packed documents and padding runs as segments of
        the batch flattened into one sequence, which the varlen kernels attend within (padding a segment of its
        own, as `hf_streamlm.data.collate.varlen_kwargs` makes them). Given by the caller (the training collator
        computes them on the CPU) they are used as they are; otherwise derived here once per forward, with one
        read-back for the longest segment. Nothing to split: {} (flash's dense entry point)."""
        if varlen:
            missing = [key for key in FLASH_VARLEN_KWARGS if key not in varlen]
            if missing:
                raise ValueError(f"the flash kernels' segments need all of {FLASH_VARLEN_KWARGS}; missing {missing}")
            return varlen
        if keep is None and document_ids is None:
            return {}
        reference = keep if keep is not None else document_ids
        batch_size, seq_length = reference.shape
        starts = torch.zeros(batch_size, seq_length, dtype=torch.bool, device=reference.device)
        starts[:, 0] = True
        for segments in (keep, document_ids):
            if segments is not None:
                starts[:, 1:] |= segments[:, 1:] != segments[:, :-1]
        total = torch.tensor([batch_size * seq_length], device=reference.device)
        offsets = torch.cat([starts.reshape(-1).nonzero().reshape(-1), total]).to(torch.int32)
        longest = int(offsets.diff().max())
        return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest, "max_length_k": longest}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        document_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids. Exactly one of `input_ids` and `inputs_embeds` must be given.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for tokens to attend to, 0 for padding.
            position_ids (`torch.LongTensor` of shape `(batch_size or 1, sequence_length)`, *optional*):
                Rotary positions; `0..sequence_length-1` when omitted. Packed documents pass positions restarting
                at 0 per document, together with `document_ids`.
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Precomputed token embeddings, used instead of `input_ids` (the embedding LayerNorm still applies).
            document_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Document index of every token of packed rows: a token attends only to tokens with the same id.
            output_attentions (`bool`, *optional*):
                Return the attention probabilities of every layer (computed on the eager path for this call).
            output_hidden_states (`bool`, *optional*):
                Return the embedding output and the output of every layer (before the final LayerNorm).
            return_dict (`bool`, *optional*):
                Return a `BaseModelOutput` (default) rather than a tuple.
            kwargs:
                `cu_seq_lens_q`, `cu_seq_lens_k`, `max_length_q`, `max_length_k` (transformers'
                `FlashAttentionKwargs`): the segments the flash kernels attend within; the training collator emits
                them for packed documents, the other kernels ignore them. Other keys (`token_type_ids` from a BERT
                tokenizer, collator or Trainer keys) are accepted and ignored.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of `input_ids` and `inputs_embeds`.")

        hidden_states = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)
        batch_size, seq_length = hidden_states.shape[:2]
        device = hidden_states.device

        keep = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                shape = tuple(attention_mask.shape)
                raise ValueError(f"`attention_mask` must have shape (batch_size, sequence_length), got {shape}.")
            keep = attention_mask.to(device=device, dtype=torch.bool)
            # A sequence made only of padding would give all-masked rows, which the fused kernels turn into NaN;
            # let it attend everywhere instead (its outputs mean nothing).
            keep = keep | ~keep.any(dim=-1, keepdim=True)
            # Without padding there is nothing to mask. The check reads the tensor back, so the training loop drops
            # an all-ones mask before the forward; it is skipped while compiling (no data-dependent branch).
            if not torch.compiler.is_compiling() and bool(keep.all()):
                keep = None
        if document_ids is not None:
            if document_ids.shape[-1] != seq_length:
                raise ValueError(
                    f"`document_ids` must have shape (batch_size, {seq_length}), got {tuple(document_ids.shape)}."
                )
            document_ids = document_ids.to(device).expand(batch_size, -1)

        attention_kwargs = {}
        kind = mask_format(self.config._attn_implementation, output_attentions)
        if kind == "block":
            masks = self._block_masks(keep, document_ids, batch_size, seq_length, device)
        elif kind == "varlen":
            varlen = {key: kwargs[key] for key in FLASH_VARLEN_KWARGS if kwargs.get(key) is not None}
            attention_kwargs = self._flash_inputs(keep, document_ids, varlen)
            masks = {GLOBAL: None, LOCAL: None}
        else:
            masks = self._dense_masks(keep, document_ids, seq_length, device)

        if position_ids is None:
            position_ids = torch.arange(seq_length, device=device).unsqueeze(0)
        position_ids = position_ids.to(device)
        thetas = {GLOBAL: self.config.global_rope_theta, LOCAL: self.config.local_rope_theta}
        kinds = {layer.attn.kind for layer in self.layers}
        position_embeddings = {k: self.rotary_emb(hidden_states, position_ids, thetas[k]) for k in kinds}

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, probs = layer(
                hidden_states,
                position_embeddings[layer.attn.kind],
                attention_mask=masks[layer.attn.kind],
                output_attentions=output_attentions,
                **attention_kwargs,
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        hidden_states = self.final_norm(hidden_states)

        output = BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )
        return output if return_dict else output.to_tuple()


class ModernMicroBertForMaskedLM(ModernMicroBertPreTrainedModel):
    """Modern MicroBERT with ModernBERT's masked-LM head: prediction head, then a decoder tied to the embeddings."""

    # transformers 5 format: {target: source}, applied by `post_init`/`tie_weights` when `config.tie_word_embeddings`.
    _tied_weights_keys = {"decoder.weight": "model.embeddings.tok_embeddings.weight"}

    def __init__(self, config: ModernMicroBertConfig):
        super().__init__(config)
        self.model = ModernMicroBertModel(config)
        self.head = ModernMicroBertPredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)
        # Tied, the weight is the embedding's and keeps its std (as in ModernBERT).
        self.decoder.output_side = not config.tie_word_embeddings
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        document_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        masked_positions: torch.LongTensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Target ids at the masked positions and -100 everywhere else. In training mode the head and the
                decoder then run only at the labelled positions (sparse prediction), and `logits` has shape
                `(n_labelled, vocab_size)`; in eval mode, or without labels, the logits are dense.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*):
                Labelled tokens in the whole accumulated batch: the loss is then the sum over this micro-batch
                divided by it (exact under gradient accumulation). Without it the loss is the mean.
            masked_positions (`torch.LongTensor` of shape `(n_labelled,)`, *optional*):
                The labelled positions as increasing indices into the flattened `(batch_size * sequence_length)`
                tokens (where `labels` is not -100), computed by the training collator on the CPU: the training
                head gathers them with an integer index (no host sync). Without them it finds them itself, with a
                read-back of the labels.

            The other arguments are those of [`ModernMicroBertModel.forward`].
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            document_ids=document_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **{key: kwargs[key] for key in FLASH_VARLEN_KWARGS if key in kwargs},
        )
        hidden = outputs.last_hidden_state
        if self.training and labels is not None:
            # Sparse prediction (ModernBERT's): the head and the vocabulary projection, most of a small model's
            # compute, only where there is a label (mlm_probability of the tokens). Same loss and gradients.
            labels = labels.to(hidden.device).reshape(-1)
            if masked_positions is None:  # a boolean read: the positions come back from the device
                masked_positions = (labels != -100).nonzero().reshape(-1)
            masked_positions = masked_positions.to(hidden.device)
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, masked_positions)
            labels = labels.index_select(0, masked_positions)
        logits = self.decoder(self.head(hidden))

        loss = None
        if labels is not None:
            # float32 cross entropy: the log-sum-exp over the vocabulary is where half precision hurts most.
            flat_logits = logits.reshape(-1, logits.shape[-1]).float()
            flat_labels = labels.reshape(-1).to(flat_logits.device)
            if num_items_in_batch is None:
                loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
            else:
                loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
                if torch.is_tensor(num_items_in_batch):
                    num_items_in_batch = num_items_in_batch.to(loss.device)
                loss = loss / num_items_in_batch

        output = MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()


__all__ = ["ModernMicroBertPreTrainedModel", "ModernMicroBertModel", "ModernMicroBertForMaskedLM"]
