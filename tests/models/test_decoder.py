"""Tests of the decoder family: config, model, KV cache and generation, packed documents, Auto registration and the
two export formats.

Everything runs on CPU with tiny configs. The two export tests load the saved folders in a fresh interpreter that
cannot import hf_streamlm (isolated mode, a temporary cwd, and an import blocker in case the package is ever
installed), which is the situation of anyone downloading a published checkpoint.
"""

import copy
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_streamlm.models
from hf_streamlm.models import DecoderConfig, DecoderForCausalLM, DecoderModel
from hf_streamlm.models.decoder.configuration_decoder import swiglu_intermediate_size
from hf_streamlm.models.decoder.modeling_decoder import CACHE_FIELD
from hf_streamlm.models.export_formats import save_model, to_llama_config, to_native
from tests.models.isolated import run_isolated


VOCAB = 64
ATOL = 1e-5


def tiny_config(**overrides) -> DecoderConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return DecoderConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> DecoderForCausalLM:
    torch.manual_seed(seed)
    model = DecoderForCausalLM(tiny_config(**overrides))
    # Random (not unit) norm weights, so that the tests notice a norm that is skipped or mis-named by an export.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                parameter.normal_(1.0, 0.2)
    return model.eval()


def random_ids(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def padded_batch(seed: int = 1, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of length 10, the second one with 4 padding tokens (pad id 0, attention_mask 0)."""
    input_ids = random_ids((2, 10), seed)
    attention_mask = torch.ones_like(input_ids)
    padding = slice(6, None) if side == "right" else slice(None, 4)
    input_ids[1, padding] = 0
    attention_mask[1, padding] = 0
    return input_ids, attention_mask


def out_cache(output):
    """The key/value cache of a model output, under the field name of the installed transformers (`cache` from
    5.24, `past_key_values` before)."""
    return getattr(output, CACHE_FIELD)


def logits_of(model, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs).logits


# ----------------------------------------------------------------------------------------------------- config


def test_config_defaults():
    config = DecoderConfig()
    assert config.model_type == "streamlm_decoder"
    assert config.hidden_act == "silu"
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    assert config.intermediate_size == swiglu_intermediate_size(config.hidden_size)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert config.rope_theta == 10000.0 and config.rope_scaling is None
    assert (config.attention_dropout, config.residual_dropout) == (0.0, 0.0)
    assert config.tie_word_embeddings is False and config.use_cache is True
    # SwiGLU default: 8/3 * hidden rounded up to 256 (Llama's 11008 for 4096), to 32 below 1024.
    assert [swiglu_intermediate_size(h) for h in (64, 512, 2048, 4096)] == [192, 1376, 5632, 11008]
    assert DecoderConfig(hidden_size=10, num_attention_heads=4, head_dim=4).head_dim == 4


def test_config_legacy_rope_arguments_and_aliases():
    scaling = {"rope_type": "linear", "factor": 2.0}
    config = DecoderConfig(rope_theta=500000.0, rope_scaling=scaling, attn_dropout=0.1)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    assert scaling == {"rope_type": "linear", "factor": 2.0}  # the caller's dict is not modified
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.attention_dropout == 0.1 and config.attn_dropout == 0.1
    # transformers 4 spelling "type".
    assert DecoderConfig(rope_scaling={"type": "dynamic", "factor": 4.0}).rope_parameters == {
        "rope_type": "dynamic",
        "factor": 4.0,
        "rope_theta": 10000.0,
    }
    config.rope_scaling = None
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    config.rope_theta = 1e6
    assert config.rope_parameters["rope_theta"] == 1e6


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 10, "num_attention_heads": 3}, "hidden_size"),
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_key_value_heads": 0}, "num_key_value_heads"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"head_dim": 7}, "head_dim"),
        ({"attention_dropout": 1.0}, "attention_dropout"),
        ({"attn_dropout": -0.1}, "attention_dropout"),
        ({"residual_dropout": 1.5}, "residual_dropout"),
        ({"hidden_act": "not_an_activation"}, "hidden_act"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"rope_scaling": {"rope_type": "proportional", "factor": 2.0}}, "rope"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0.5}}, "factor"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"vocab_size": 100, "pad_token_id": 100}, "pad_token_id"),
        ({"vocab_size": 100, "eos_token_id": [2, 100]}, "eos_token_id"),
    ],
)
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        DecoderConfig(**overrides)


def test_config_save_load_roundtrip(tmp_path):
    config = tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0}, residual_dropout=0.1, custom_key="kept")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert "rope_theta" not in saved and "rope_scaling" not in saved
    loaded = DecoderConfig.from_pretrained(tmp_path)
    for name in ("num_key_value_heads", "intermediate_size", "head_dim", "rope_parameters", "residual_dropout"):
        assert getattr(loaded, name) == getattr(config, name)
    assert loaded.custom_key == "kept"


# ------------------------------------------------------------------------------------------------------ model


def test_forward_shapes_and_loss():
    model = tiny_model()
    config = model.config
    input_ids, attention_mask = padded_batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)

    base_out = model.model(input_ids, attention_mask=attention_mask, output_hidden_states=True, output_attentions=True)
    assert base_out.last_hidden_state.shape == (2, 10, config.hidden_size)
    assert len(base_out.hidden_states) == config.num_hidden_layers + 1
    torch.testing.assert_close(base_out.hidden_states[-1], base_out.last_hidden_state)
    assert base_out.attentions[0].shape == (2, config.num_attention_heads, 10, 10)
    probs = base_out.attentions[0]
    assert probs.triu(diagonal=1).abs().max() == 0  # causal
    assert probs[1, :, :, 6:].abs().max() == 0  # nothing attends to the (right) padding

    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (2, 10, config.vocab_size)
    assert out_cache(out) is not None  # eval mode, use_cache defaults to config.use_cache
    # Position t predicts token t + 1; padding labels (-100) and the last position do not count.
    log_probs = out.logits.float().log_softmax(-1)
    terms = [-log_probs[b, t, labels[b, t + 1]] for b in range(2) for t in range(9) if labels[b, t + 1] != -100]
    manual = torch.stack(terms).mean()
    torch.testing.assert_close(out.loss, manual)
    # Trainer-style normalisation under gradient accumulation: sum over this micro-batch / items in the whole batch.
    out_sum = model(input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(out_sum.loss, manual * len(terms) / 40)

    as_tuple = model(input_ids, attention_mask=attention_mask, labels=labels, return_dict=False, use_cache=False)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)

    last = model(input_ids, attention_mask=attention_mask, logits_to_keep=1).logits
    torch.testing.assert_close(last, out.logits[:, -1:])

    model.train()
    assert out_cache(model(input_ids, labels=labels)) is None  # no cache built while training


def test_init_weights_llama_style():
    model = DecoderForCausalLM(tiny_config(vocab_size=4000, hidden_size=64))
    embedding = model.model.embed_tokens.weight
    assert model.model.embed_tokens.padding_idx is None
    assert abs(embedding.std().item() - model.config.initializer_range) < 2e-3
    assert embedding[model.config.pad_token_id].abs().max() > 0  # the pad (often = EOS) row is a normal row
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert abs(layer.mlp.down_proj.weight.std().item() - model.config.initializer_range) < 2e-3
    assert layer.self_attn.q_proj.bias is None and layer.mlp.gate_proj.bias is None
    biased = DecoderForCausalLM(tiny_config(attention_bias=True, mlp_bias=True))
    assert biased.model.layers[0].self_attn.k_proj.bias.abs().max() == 0
    assert biased.model.layers[0].mlp.up_proj.bias.abs().max() == 0


def test_grouped_query_attention_shapes_and_mqa():
    for kv_heads in (4, 2, 1):
        model = tiny_model(num_key_value_heads=kv_heads)
        attention = model.model.layers[0].self_attn
        assert attention.q_proj.weight.shape == (4 * 8, 32)
        assert attention.k_proj.weight.shape == (kv_heads * 8, 32)
        assert attention.v_proj.weight.shape == (kv_heads * 8, 32)
        out = model(random_ids((2, 6)))
        assert out_cache(out).layers[0].keys.shape == (2, kv_heads, 6, 8)


@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_eager_and_sdpa_agree(padding):
    model = tiny_model()
    assert model.config._attn_implementation == "sdpa"  # the transformers default when supported
    if padding is None:
        input_ids, attention_mask = random_ids((2, 10)), None
    else:
        input_ids, attention_mask = padded_batch(side=padding)
    sdpa = logits_of(model, input_ids, attention_mask=attention_mask)
    # Asking for attention probabilities falls back to the eager path for that call only.
    with_probs = model(input_ids, attention_mask=attention_mask, output_attentions=True)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    eager = logits_of(model, input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(sdpa, eager, atol=ATOL, rtol=0)
    torch.testing.assert_close(with_probs.logits.detach(), eager, atol=ATOL, rtol=0)
    if padding == "left":
        # The mask matters: without it the padded sequence's real tokens see the padding before them.
        unmasked = logits_of(model, input_ids)
        real = attention_mask[1].bool()
        assert not torch.allclose(unmasked[1, real], eager[1, real], atol=1e-4)
        torch.testing.assert_close(unmasked[0], eager[0], atol=ATOL, rtol=0)


def test_attn_implementation_from_config():
    assert DecoderForCausalLM(tiny_config(attn_implementation="eager")).config._attn_implementation == "eager"


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_cached_and_uncached_logits_agree(attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation)
    input_ids, attention_mask = padded_batch(side="left")
    full = logits_of(model, input_ids, attention_mask=attention_mask, use_cache=False)

    # Prefill 6 tokens, then one token at a time with the cache, as `generate` does (positions from the mask).
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(
            input_ids[:, :6], attention_mask=attention_mask[:, :6], position_ids=position_ids[:, :6], use_cache=True
        )
        steps = [out.logits]
        cache = out_cache(out)
        for t in range(6, 10):
            out = model(
                input_ids[:, t : t + 1],
                attention_mask=attention_mask[:, : t + 1],
                position_ids=position_ids[:, t : t + 1],
                cache=cache,
            )
            steps.append(out.logits)
    assert cache.get_seq_length() == 10
    incremental = torch.cat(steps, dim=1)
    real = attention_mask.bool()
    torch.testing.assert_close(incremental[real], full[real], atol=ATOL, rtol=0)
    # Without padding the default positions line up too: chunked prefill of 4 + 6 tokens.
    ids = random_ids((2, 10), seed=3)
    full = logits_of(model, ids, use_cache=False)
    with torch.no_grad():
        first = model(ids[:, :4])
        second = model(ids[:, 4:], cache=out_cache(first))
        # The pre-5.24 name of the argument is still accepted; both names at once are refused.
        legacy = model(ids[:, 4:], past_key_values=out_cache(model(ids[:, :4])))
        with pytest.raises(ValueError, match="not both"):
            model(ids[:, 4:], cache=out_cache(first), past_key_values=out_cache(first))
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, atol=ATOL, rtol=0)
    torch.testing.assert_close(legacy.logits, second.logits, atol=0, rtol=0)


def test_generate_with_and_without_cache():
    model = tiny_model()
    input_ids = random_ids((2, 7))
    with_cache = model.generate(input_ids, max_new_tokens=5, do_sample=False)
    without_cache = model.generate(input_ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert with_cache.shape == (2, 12)
    torch.testing.assert_close(with_cache, without_cache, atol=0, rtol=0)
    # Left-padded batch: the padded row continues as it would alone.
    input_ids, attention_mask = padded_batch(side="left")
    batched = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False)
    alone = model.generate(input_ids[1:, 4:], max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(batched[1, 10:], alone[0, 6:], atol=0, rtol=0)


def test_gradient_checkpointing_same_gradients():
    input_ids, attention_mask = padded_batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)

    def gradients(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        model = tiny_model().train()
        if checkpointing:
            # `activation_checkpointing_enable` is the name from transformers 5.2x on; older 5.x call it gradient_.
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        calls = []
        # A checkpointed layer re-runs its forward during backward, so its submodules are called twice.
        model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
        # Asking for a cache while checkpointing gets none: the replay in backward would append to it twice.
        out = model(input_ids, attention_mask=attention_mask, labels=labels, use_cache=True)
        assert (out_cache(out) is None) == checkpointing
        out.loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, len(calls)

    plain, plain_calls = gradients(checkpointing=False)
    checkpointed, checkpointed_calls = gradients(checkpointing=True)
    assert (plain_calls, checkpointed_calls) == (1, 2)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_dropout_only_in_training():
    input_ids = random_ids((2, 10))
    model = tiny_model(residual_dropout=0.2, attention_dropout=0.2)
    torch.testing.assert_close(logits_of(model, input_ids), logits_of(model, input_ids), atol=0, rtol=0)
    model.train()
    assert not torch.allclose(logits_of(model, input_ids), logits_of(model, input_ids))
    no_dropout = tiny_model().train()
    torch.testing.assert_close(logits_of(no_dropout, input_ids), logits_of(no_dropout.eval(), input_ids))


def test_tied_and_untied_embeddings():
    tied = tiny_model(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.get_output_embeddings() is tied.lm_head
    untied = tiny_model(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == VOCAB * 32

    tied.resize_token_embeddings(VOCAB + 8)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied(torch.tensor([[1, VOCAB + 7]])).logits.shape == (1, 2, VOCAB + 8)


def test_parameter_names_match_llama_for_causal_lm():
    for tie in (True, False):
        model = tiny_model(tie_word_embeddings=tie)
        llama = LlamaForCausalLM(to_llama_config(model.config))
        assert sorted(model.state_dict()) == sorted(llama.state_dict())
        for name, tensor in llama.state_dict().items():
            assert model.state_dict()[name].shape == tensor.shape, name
    names = set(model.state_dict())
    for name in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert name in names


# -------------------------------------------------------------------------------------------- packed documents


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_documents_match_documents_alone(attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation)
    doc_a, doc_b = random_ids((1, 5), seed=4), random_ids((1, 7), seed=5)
    packed = torch.cat([doc_a, doc_b], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    document_ids = torch.tensor([[0] * 5 + [1] * 7])
    alone = torch.cat([logits_of(model, doc_a), logits_of(model, doc_b)], dim=1)

    explicit = logits_of(model, packed, position_ids=position_ids, document_ids=document_ids)
    torch.testing.assert_close(explicit, alone, atol=ATOL, rtol=0)
    # With an (all-ones) attention mask, document_ids still separate the documents.
    masked = logits_of(
        model, packed, attention_mask=torch.ones_like(packed), position_ids=position_ids, document_ids=document_ids
    )
    torch.testing.assert_close(masked, alone, atol=ATOL, rtol=0)
    # No mask and nothing cached: restarting positions alone mark the boundaries (transformers' packed format).
    implicit = logits_of(model, packed, position_ids=position_ids, use_cache=False)
    torch.testing.assert_close(implicit, alone, atol=ATOL, rtol=0)
    # Restarting positions but one document id: the second document sees the first one.
    crossing = logits_of(model, packed, position_ids=position_ids, document_ids=torch.zeros_like(packed))
    torch.testing.assert_close(crossing[:, :5], alone[:, :5], atol=ATOL, rtol=0)
    assert not torch.allclose(crossing[:, 5:], alone[:, 5:], atol=1e-4)
    # Several rows with different layouts.
    batch = torch.cat([packed, packed.flip(1)])
    batch_docs = torch.cat([document_ids, torch.tensor([[0] * 7 + [1] * 5])])
    batch_positions = torch.cat([position_ids, torch.cat([torch.arange(7), torch.arange(5)])[None]])
    rows = logits_of(model, batch, position_ids=batch_positions, document_ids=batch_docs)
    torch.testing.assert_close(rows[:1], alone, atol=ATOL, rtol=0)
    flipped_alone = torch.cat([logits_of(model, packed.flip(1)[:, :7]), logits_of(model, packed.flip(1)[:, 7:])], 1)
    torch.testing.assert_close(rows[1:], flipped_alone, atol=ATOL, rtol=0)


def test_packed_documents_match_stock_llama():
    model = tiny_model()
    native = to_native(model)
    packed = random_ids((2, 12), seed=6)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, -1)
    ours = logits_of(model, packed, position_ids=position_ids, document_ids=torch.tensor([[0] * 5 + [1] * 7] * 2))
    # transformers 5.23 infers the boundaries from restarting positions when there is no mask and no cache.
    stock = logits_of(native, packed, position_ids=position_ids, use_cache=False)
    torch.testing.assert_close(ours, stock, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------- RoPE


def test_rope_scaling_changes_logits_and_native_export_follows():
    input_ids = random_ids((2, 24))
    plain = tiny_model(max_position_embeddings=16)
    reference = logits_of(plain, input_ids)
    for rope_scaling in ({"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}):
        model = tiny_model(max_position_embeddings=16, rope_scaling=rope_scaling)
        logits = logits_of(model, input_ids)
        assert not torch.allclose(logits, reference, atol=1e-4), rope_scaling
        native = to_native(model)
        assert native.config.rope_parameters == model.config.rope_parameters
        # 24 > max_position_embeddings, so dynamic scaling is active too.
        torch.testing.assert_close(logits_of(native, input_ids), logits, atol=ATOL, rtol=0)
    # Dynamic scaling leaves inputs within max_position_embeddings unchanged.
    dynamic = tiny_model(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    torch.testing.assert_close(logits_of(dynamic, input_ids[:, :16]), reference[:, :16], atol=ATOL, rtol=0)
    theta = tiny_model(rope_theta=500.0)
    assert not torch.allclose(logits_of(theta, input_ids), logits_of(tiny_model(), input_ids), atol=1e-4)


# ------------------------------------------------------------------------------------------------- Auto classes


def test_auto_classes_after_import():
    config = tiny_config()
    assert isinstance(AutoModelForCausalLM.from_config(config), DecoderForCausalLM)
    assert isinstance(AutoModel.from_config(config), DecoderModel)
    assert isinstance(AutoConfig.for_model("streamlm_decoder", vocab_size=VOCAB), DecoderConfig)
    # Registration is idempotent: executing the package again must not raise "already used".
    importlib.reload(hf_streamlm.models)


def test_custom_format_roundtrip_in_process(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    path = save_model(model, tmp_path / "custom", format="custom")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "streamlm_decoder"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_decoder.DecoderConfig",
        "AutoModel": "modeling_decoder.DecoderModel",
        "AutoModelForCausalLM": "modeling_decoder.DecoderForCausalLM",
    }
    assert (path / "modeling_decoder.py").is_file() and (path / "configuration_decoder.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert isinstance(loaded, DecoderForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    input_ids, attention_mask = padded_batch()
    torch.testing.assert_close(
        logits_of(loaded, input_ids, attention_mask=attention_mask),
        logits_of(model, input_ids, attention_mask=attention_mask),
        atol=ATOL,
        rtol=0,
    )


def test_to_native_config_dtype_and_weights():
    model = tiny_model(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 4.0}).to(torch.bfloat16)
    native = to_native(model)
    assert isinstance(native, LlamaForCausalLM)
    assert native.dtype == torch.bfloat16
    config = native.config
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    for name in ("num_key_value_heads", "intermediate_size", "head_dim", "tie_word_embeddings", "eos_token_id"):
        assert getattr(config, name) == getattr(model.config, name), name
    assert native.lm_head.weight is native.model.embed_tokens.weight
    # Copied, not shared: training the export must not change the project model.
    assert native.model.embed_tokens.weight is not model.model.embed_tokens.weight
    # Translation copies RoPE dicts: transformers fills them in place.
    assert to_llama_config(model.config).rope_parameters is not model.config.rope_parameters


def test_save_model_rejects_other_models(tmp_path):
    with pytest.raises(TypeError, match="DecoderForCausalLM"):
        save_model(DecoderModel(tiny_config()), tmp_path)


# ------------------------------------------------------------------------ exports loaded without hf_streamlm

# Runs in `python -I` (no PYTHONPATH, no user site, no cwd on sys.path) from a temporary directory. The meta-path
# blocker also covers an installed (e.g. editable) hf_streamlm: any attempt to import it fails loudly.
_LOAD_AND_RUN = """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust).eval()
    inputs = torch.load(inputs_file)
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    torch.save({"logits": logits, "generated": generated}, outputs_file)
"""


def load_in_clean_process(model_dir: Path, tmp_path: Path, trust_remote_code: bool):
    input_ids, attention_mask = padded_batch(side="left")
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    report, outputs = run_isolated(_LOAD_AND_RUN, model_dir, tmp_path, inputs, trust_remote_code)
    return report, outputs, inputs


def check_against_model(model: DecoderForCausalLM, outputs: dict, inputs: dict) -> None:
    real = inputs["attention_mask"].bool()
    expected = logits_of(model, **inputs)
    # Left-padding positions attend nowhere in a stock model and everywhere here: only real tokens are compared.
    torch.testing.assert_close(outputs["logits"][real], expected[real], atol=ATOL, rtol=0)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(outputs["generated"], generated, atol=0, rtol=0)


def test_native_export_loads_with_stock_transformers(tmp_path):
    model = tiny_model(rope_scaling={"rope_type": "linear", "factor": 2.0})
    path = save_model(model, tmp_path / "native", format="native")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert "auto_map" not in config
    assert not list(path.glob("*.py"))
    assert (path / "model.safetensors").is_file()

    report, outputs, inputs = load_in_clean_process(path, tmp_path, trust_remote_code=False)
    assert report["class"] == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    check_against_model(model, outputs, inputs)


def test_custom_export_loads_with_trust_remote_code(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    path = save_model(model, tmp_path / "custom", format="custom")

    report, outputs, inputs = load_in_clean_process(path, tmp_path, trust_remote_code=True)
    assert report["class"].startswith("transformers_modules.")
    assert report["class"].endswith("modeling_decoder.DecoderForCausalLM")
    check_against_model(model, outputs, inputs)
