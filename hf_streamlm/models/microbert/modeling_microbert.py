"""PyTorch MicroBERT: the BERT encoder and masked-LM head, written for tiny pretraining runs.

The module tree, and therefore every parameter name, is the one of `transformers.BertForMaskedLM` (whose
`BertModel` is built without a pooler): `bert.embeddings.word_embeddings.weight`,
`bert.encoder.layer.0.attention.self.query.weight`, ..., `cls.predictions.transform.dense.weight`,
`cls.predictions.decoder.weight`. That is what makes the native export a pure config translation: the state dict
loads into a stock `BertForMaskedLM` unchanged.

What differs from the stock implementation is only what this project needs: a single file without the decoder /
cross-attention / KV-cache machinery, attention selected by `config._attn_implementation` between an eager path and
`torch.nn.functional.scaled_dot_product_attention`, a softmax kept in float32 on the eager path, and a masked-LM loss
that honours the `num_items_in_batch` the Trainer passes under gradient accumulation.

This file is copied next to the weights by the "custom" export and imported with `trust_remote_code=True` in
processes where `hf_streamlm` is not installed: it imports only torch, transformers and, relatively, its config.
"""

import torch
from torch import nn

from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from .configuration_microbert import MicroBertConfig


class MicroBertEmbeddings(nn.Module):
    """Word + token type + learned absolute position embeddings, then LayerNorm and dropout (BERT order)."""

    def __init__(self, config: MicroBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        # `LayerNorm` (capitalised) is the attribute name in BERT checkpoints; keeping it keeps the key names.
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.max_position_embeddings = config.max_position_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch_size, seq_length = inputs_embeds.shape[:2]

        if position_ids is None:
            if seq_length > self.max_position_embeddings:
                # Caught here because the embedding lookup would fail with an opaque index error (or a device
                # assert on GPU).
                raise ValueError(
                    f"Sequence length {seq_length} exceeds `max_position_embeddings` ({self.max_position_embeddings})."
                )
            # Built on the fly rather than kept as a buffer: nothing to initialise, move or exclude from state dicts.
            position_ids = torch.arange(seq_length, device=inputs_embeds.device).unsqueeze(0)
        if token_type_ids is None:
            token_type_ids = torch.zeros((batch_size, seq_length), dtype=torch.long, device=inputs_embeds.device)

        # Same summation order as BERT, so exported checkpoints reproduce these activations bit for bit in fp32.
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        embeddings = self.LayerNorm(embeddings)
        embeddings = self.dropout(embeddings)
        return embeddings


def eager_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax(QK^T * scaling) V over `(batch, heads, seq, head_dim)` tensors; also returns the probabilities.

    `attention_mask` is boolean, broadcastable to `(batch, heads, q_len, k_len)`, True where a key may be attended.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    # Softmax in float32: under bf16/fp16 autocast a half-precision softmax over long rows loses the small
    # probabilities; in float32 runs this is a no-op.
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=dropout > 0.0)
    return torch.matmul(probs, value), probs


def sdpa_attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float,
) -> tuple[torch.Tensor, None]:
    """Same contract as `eager_attention_forward`, via the fused kernels; attention probabilities are not available."""
    output = nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=False,
        scale=scaling,
    )
    return output, None


class MicroBertSelfAttention(nn.Module):
    """Multi-head bidirectional self-attention (the `attention.self` submodule of a BERT layer)."""

    def __init__(self, config: MicroBertConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.attention_head_size**-0.5

        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        # Kept as a module (not just a float) so that `model.eval()` / `model.train()` switch it like BERT's.
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_length, _ = hidden_states.shape
        head_shape = (batch_size, seq_length, self.num_attention_heads, self.attention_head_size)
        query = self.query(hidden_states).view(head_shape).transpose(1, 2)
        key = self.key(hidden_states).view(head_shape).transpose(1, 2)
        value = self.value(hidden_states).view(head_shape).transpose(1, 2)

        # Read at call time (not cached in __init__) so `model.set_attn_implementation(...)` takes effect at once.
        # Probabilities only exist on the eager path, so asking for them selects it for this call.
        if self.config._attn_implementation == "sdpa" and not output_attentions:
            attention_fn = sdpa_attention_forward
        else:
            attention_fn = eager_attention_forward
        context, probs = attention_fn(
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.dropout.p if self.training else 0.0,
        )
        context = context.transpose(1, 2).reshape(batch_size, seq_length, -1)
        return context, probs


class MicroBertSelfOutput(nn.Module):
    """Attention output projection, dropout, residual add and post-LayerNorm."""

    def __init__(self, config: MicroBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(hidden_states + input_tensor)


class MicroBertAttention(nn.Module):
    """`self` (attention proper) + `output` (projection and residual), the two children BERT checkpoints name."""

    def __init__(self, config: MicroBertConfig):
        super().__init__()
        self.self = MicroBertSelfAttention(config)
        self.output = MicroBertSelfOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, probs = self.self(hidden_states, attention_mask, output_attentions=output_attentions)
        return self.output(context, hidden_states), probs


class MicroBertIntermediate(nn.Module):
    """First half of the MLP: expansion to `intermediate_size` and activation."""

    def __init__(self, config: MicroBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class MicroBertOutput(nn.Module):
    """Second half of the MLP: projection back, dropout, residual add and post-LayerNorm."""

    def __init__(self, config: MicroBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.dense(hidden_states))
        return self.LayerNorm(hidden_states + input_tensor)


class MicroBertLayer(GradientCheckpointingLayer):
    """One post-LN encoder block: attention sublayer then MLP sublayer.

    Subclassing `GradientCheckpointingLayer` is how transformers 5 checkpoints: `activation_checkpointing_enable()`
    flags every such layer and its `forward` is then re-run in backward. Tensors that need gradients must therefore
    be passed positionally (keyword arguments are bound outside the checkpoint).
    """

    def __init__(self, config: MicroBertConfig):
        super().__init__()
        self.attention = MicroBertAttention(config)
        self.intermediate = MicroBertIntermediate(config)
        self.output = MicroBertOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_output, probs = self.attention(hidden_states, attention_mask, output_attentions=output_attentions)
        layer_output = self.output(self.intermediate(attention_output), attention_output)
        return layer_output, probs


class MicroBertEncoder(nn.Module):
    """The stack of layers; collects per-layer hidden states and attention probabilities on request."""

    def __init__(self, config: MicroBertConfig):
        super().__init__()
        self.layer = nn.ModuleList([MicroBertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutput:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer_module in self.layer:
            hidden_states, probs = layer_module(hidden_states, attention_mask, output_attentions=output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        return BaseModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


class MicroBertPredictionHeadTransform(nn.Module):
    """Dense + activation + LayerNorm applied to hidden states before the vocabulary projection."""

    def __init__(self, config: MicroBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class MicroBertLMPredictionHead(nn.Module):
    """Transform, then a projection onto the vocabulary whose weight is the word embedding matrix.

    The output-only bias lives in `bias` and `decoder.bias` is tied to it (both keys exist in BERT checkpoints), so
    that `resize_token_embeddings` can resize the two together.
    """

    def __init__(self, config: MicroBertConfig):
        super().__init__()
        self.transform = MicroBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class MicroBertOnlyMLMHead(nn.Module):
    """Wrapper that exists only to reproduce the `cls.predictions.*` parameter names."""

    def __init__(self, config: MicroBertConfig):
        super().__init__()
        self.predictions = MicroBertLMPredictionHead(config)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.predictions(sequence_output)


class MicroBertPreTrainedModel(PreTrainedModel):
    config_class = MicroBertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MicroBertEmbeddings", "MicroBertLayer"]
    _supports_sdpa = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers decides whether `set_attn_implementation` may switch a live model by grepping the modeling
        # source for `ALL_ATTENTION_FUNCTIONS.get_interface(`, and otherwise only warns and keeps the old value.
        # Switching is safe here: the attention reads `config._attn_implementation` on every call, and the
        # requested value is still validated against `_supports_sdpa` / eager by `set_attn_implementation`.
        return True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorm.

        The `transformers.initialization` functions skip tensors flagged as already loaded, so `from_pretrained`
        only initialises what the checkpoint lacks.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            # Indexing a row drops the "already loaded" flag, hence the explicit check on the full matrix.
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MicroBertLMPredictionHead):
            init.zeros_(module.bias)


class MicroBertModel(MicroBertPreTrainedModel):
    """The bare encoder: embeddings and layers, no pooler (as `BertModel(config, add_pooling_layer=False)`)."""

    def __init__(self, config: MicroBertConfig):
        super().__init__(config)
        self.embeddings = MicroBertEmbeddings(config)
        self.encoder = MicroBertEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @staticmethod
    def _prepare_attention_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Turn a `(batch, seq)` 1/0 padding mask into a boolean `(batch, 1, 1, seq)` key mask, or None.

        Boolean rather than additive: it is dtype independent (no float32 minimum overflowing to -inf once autocast
        casts an additive mask to fp16) and both attention paths accept it.
        """
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError(
                f"`attention_mask` must have shape (batch_size, sequence_length), got {tuple(attention_mask.shape)}."
            )
        keep = attention_mask.bool()
        # A sequence made only of padding would give all-masked rows, which the fused kernels turn into NaN that
        # then reaches the gradients; let such a sequence attend everywhere instead (its outputs mean nothing).
        keep = keep | ~keep.any(dim=-1, keepdim=True)
        # Without padding there is nothing to mask, and no mask lets SDPA pick its fastest (flash) kernel. The
        # check reads the tensor, so it is skipped while compiling to keep the graph free of data-dependent branches.
        if not torch.compiler.is_compiling() and bool(keep.all()):
            return None
        return keep[:, None, None, :]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
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
            token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Segment ids; zeros when omitted.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Positions; `0..sequence_length-1` when omitted.
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Precomputed word embeddings, used instead of `input_ids`.
            output_attentions (`bool`, *optional*):
                Return the attention probabilities of every layer (computed on the eager path for this call).
            output_hidden_states (`bool`, *optional*):
                Return the embedding output and the output of every layer.
            return_dict (`bool`, *optional*):
                Return a `BaseModelOutput` (default) rather than a tuple.
            kwargs:
                Accepted and ignored, so that extra collator or Trainer keys do not break the call.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of `input_ids` and `inputs_embeds`.")

        embedding_output = self.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        )
        outputs = self.encoder(
            embedding_output,
            attention_mask=self._prepare_attention_mask(attention_mask),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return outputs if return_dict else outputs.to_tuple()


class MicroBertForMaskedLM(MicroBertPreTrainedModel):
    """MicroBERT with the BERT masked-LM head (`cls.predictions`), decoder tied to the word embeddings."""

    # transformers 5 format: {target: source}, applied by `post_init`/`tie_weights` when `config.tie_word_embeddings`.
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: MicroBertConfig):
        super().__init__(config)
        self.bert = MicroBertModel(config)
        self.cls = MicroBertOnlyMLMHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.bert.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
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
                Target token ids for the masked positions and -100 everywhere else (ignored by the loss). In training
                mode the head then runs only at the labelled positions, and `logits` has shape `(n_labelled, vocab)`.
            num_items_in_batch (`int` or `torch.Tensor`, *optional*):
                Number of labelled tokens in the whole accumulated batch. The Trainer passes it (this forward takes
                `**kwargs`, so it treats the model as accepting loss kwargs); the loss is then the sum over this
                micro-batch divided by it, which keeps gradient accumulation exact. Without it the loss is the mean.
            masked_positions (`torch.LongTensor` of shape `(n_labelled,)`, *optional*):
                The labelled positions, as indices into the flattened `(batch_size * sequence_length)` tokens, in
                increasing order: where `labels` is not -100. The training collator computes them on the CPU; the
                training head then gathers those rows with an integer index instead of a boolean one, which on a GPU
                reads the mask back to the host (a sync per micro-batch). Without them the head finds the rows itself.

            The other arguments are those of [`MicroBertModel.forward`].
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        if self.training and labels is not None:
            # Training: the head only where there is a label (15% of positions), as ModernBERT's sparse prediction
            # does. The vocabulary projection is most of a small model's compute (quickstart: 128 x 8000 per token
            # against ~0.5M multiply-adds for its 2 layers), measured 1.4x the tokens/s of a 150-step quickstart run, same
            # eval figures); the loss and the gradients are the same. The logits are then those of the labelled positions, (n_labelled, vocab).
            labels = labels.to(hidden.device).reshape(-1)
            if masked_positions is None:  # a boolean index: the positions are read back from the device
                masked_positions = (labels != -100).nonzero().reshape(-1)
            masked_positions = masked_positions.to(hidden.device)
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, masked_positions)
            labels = labels.index_select(0, masked_positions)
        logits = self.cls(hidden)

        loss = None
        if labels is not None:
            # float32 cross entropy: the log-sum-exp over the vocabulary is where half precision hurts most.
            flat_logits = logits.view(-1, self.config.vocab_size).float()
            flat_labels = labels.reshape(-1).to(flat_logits.device)
            if num_items_in_batch is None:
                loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
            else:
                loss = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
                if torch.is_tensor(num_items_in_batch):
                    num_items_in_batch = num_items_in_batch.to(loss.device)
                loss = loss / num_items_in_batch

        output = MaskedLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["MicroBertPreTrainedModel", "MicroBertModel", "MicroBertForMaskedLM"]
