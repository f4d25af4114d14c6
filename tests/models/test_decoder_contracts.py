"""The decoder's contracts with transformers that transformers' common tests (tests/models/test_transformers_suite.py)
check only loosely, pinned exactly: every RoPE type's cos/sin tables equal stock Llama's bit for bit (the common test
only compares a variant with the plain one), without a buffer; a loss from `shift_labels` is the loss of those targets
(fused and unfused, as stock `LlamaForCausalLM` computes it); the cache's pre-5.24 name still works and warns."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hf_streamlm.models.decoder import modeling_decoder
from hf_streamlm.models.decoder.modeling_decoder import CACHE_FIELD, DecoderRotaryEmbedding
from hf_streamlm.models.export_formats import to_llama_config, to_native
from tests.models.test_decoder import ATOL, random_ids, tiny_config, tiny_model

MAX_POSITIONS = 32  # tiny_config's max_position_embeddings; its heads are 8 wide (4 frequencies)

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
    # DeepSeek-style: its own trained length, betas, and the attention factor from mscale / mscale_all_dim.
    "yarn-options": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 10000.0, "original_max_position_embeddings": 8,
                     "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "attention_factor": 0.9},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8, "rope_theta": 500000.0},
    # No `factor`: max_position_embeddings / original_max_position_embeddings (Phi-3's way).
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
                 "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.5, 2.0, 3.0, 5.0]},
}


@pytest.mark.parametrize("name", sorted(ROPE_PARAMETERS))
def test_rotary_tables_equal_stock_llama_bit_for_bit(name):
    """Within and beyond the trained length, and back (the dynamic and longrope variants switch on the length):
    the same cos/sin as `LlamaRotaryEmbedding`, and the same `inv_freq` / `attention_scaling` after construction."""
    rope = ROPE_PARAMETERS[name]
    config = tiny_config(rope_parameters=copy.deepcopy(rope))
    ours, stock = DecoderRotaryEmbedding(config), LlamaRotaryEmbedding(to_llama_config(config))
    assert torch.equal(ours.inv_freq, stock.original_inv_freq) and ours.attention_scaling == stock.attention_scaling
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(1, dtype=dtype)
        for length in (10, MAX_POSITIONS, 3 * MAX_POSITIONS, 7):
            positions = torch.arange(length)[None]
            for got, expected in zip(ours(x, positions), stock(x, positions)):
                assert got.dtype == dtype and torch.equal(got, expected), (name, dtype, length)
    # Per-row positions (packed documents restart at 0) go through the same arithmetic.
    positions = torch.tensor([[0, 1, 2, 0, 1], [5, 6, 7, 8, 9]])
    for got, expected in zip(ours(x, positions), stock(x, positions)):
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("name", ["yarn", "llama3", "longrope"])
def test_scaled_rope_model_matches_its_native_export(name):
    """The whole model with the newer RoPE types: no buffer in the state dict, and the stock Llama it exports to
    computes the same logits (a 50-token input passes the longrope switch at 16)."""
    model = tiny_model(rope_parameters=copy.deepcopy(ROPE_PARAMETERS[name]))
    assert list(model.buffers()) == [] and not any("rotary" in key for key in model.state_dict())
    stock = to_native(model).eval()
    assert stock.config.rope_parameters == model.config.rope_parameters
    for length in (12, 50):
        ids = random_ids((2, length))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, stock(ids).logits, atol=ATOL, rtol=0)


def test_unknown_rope_type_is_refused_not_run_as_plain_rope():
    with pytest.raises(ValueError, match="proportional"):
        tiny_config(rope_parameters={"rope_type": "proportional", "rope_theta": 10000.0})
    # Set after construction (transformers' own tests do that): the forward refuses it too.
    config = tiny_config()
    config.rope_parameters = {"rope_type": "proportional", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="proportional"):
        DecoderRotaryEmbedding(config)(torch.zeros(1), torch.arange(4)[None])


@pytest.mark.parametrize(
    ("rope", "field"),
    [
        ({"rope_type": "yarn"}, "factor"),
        ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
        ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "low_freq_factor"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, "high_freq_factor"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 4}, "long_factor"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4}, "short_factor"),
        ({"rope_type": "longrope", "factor": 0.5, "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}, "factor"),
    ],
)
def test_scaled_rope_parameters_are_validated(rope, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(rope_parameters={**rope, "rope_theta": 10000.0})


# ------------------------------------------------------------------------------------------------ shift_labels


def shifted_by_hand(labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


@pytest.mark.parametrize("chunk", [0, 5])  # 0: the unfused head; 5: the fused head + cross entropy, in chunks
@pytest.mark.parametrize("num_items_in_batch", [None, 13])
def test_shift_labels_are_the_targets(chunk, num_items_in_batch):
    """`shift_labels` replaces `labels` shifted by one: the loss and its gradients are those of the labels shifted by
    hand, `labels` no longer matter, and a context-parallel shard's own targets (its last position's target is the
    next shard's first token, which a shift inside the shard would drop) give stock Llama's loss."""
    ids = random_ids((2, 9))
    labels = random_ids((2, 9), seed=2)
    labels[0, 3:5] = -100
    kwargs = {"num_items_in_batch": num_items_in_batch}
    model = tiny_model(loss_chunk_size=chunk).train()

    def loss_and_grads(**inputs):
        model.zero_grad()
        out = model(input_ids=ids, **inputs, **kwargs)
        out.loss.backward()
        assert (out.logits is None) == (chunk > 0)  # the path under test ran
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    expected_loss, expected_grads = loss_and_grads(labels=labels)
    loss, grads = loss_and_grads(labels=torch.zeros_like(labels), shift_labels=shifted_by_hand(labels))
    assert torch.equal(loss, expected_loss)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    shard_targets = random_ids((2, 9), seed=3)  # every position has a target, the last ones included
    stock = to_native(model).train()
    with torch.no_grad():
        got = model(input_ids=ids, labels=labels, shift_labels=shard_targets, **kwargs).loss
        expected = stock(input_ids=ids, labels=labels, shift_labels=shard_targets, **kwargs).loss
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_shift_labels_alone_give_no_loss_as_in_llama():
    """As `LlamaForCausalLM` (and the Trainer's evaluation, which reads a loss only when it passed `labels`)."""
    ids = random_ids((2, 6))
    with torch.no_grad():
        assert tiny_model()(input_ids=ids, shift_labels=ids).loss is None


def test_shift_labels_of_another_length_are_refused():
    ids = random_ids((2, 6))
    for model in (tiny_model(loss_chunk_size=0).eval(), tiny_model().train()):
        with pytest.raises(ValueError, match="shift_labels"):
            model(input_ids=ids, labels=ids, shift_labels=ids[:, :5])


# ---------------------------------------------------------------------------------------------- the cache name


def test_past_key_values_still_works_and_warns_where_renamed(monkeypatch):
    """From transformers 5.24 on `cache` is the name and `past_key_values` warns as a stock model's does
    (transformers' `test_bc_cache_name_forward` looks for "`past_key_values` is deprecated"); before 5.24 it is what
    `generate` passes, and stays silent."""
    model = tiny_model()
    ids = random_ids((1, 6))
    with torch.no_grad():
        prefix = getattr(model(ids[:, :4]), CACHE_FIELD)
        expected = model(ids[:, 4:], cache=copy.deepcopy(prefix)).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            legacy = model(ids[:, 4:], past_key_values=copy.deepcopy(prefix)).logits
        monkeypatch.setattr(modeling_decoder, "CACHE_FIELD", "past_key_values")  # as on transformers <= 5.23
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
            model(ids[:, 4:], past_key_values=copy.deepcopy(prefix))
    assert torch.equal(legacy, expected)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    if CACHE_FIELD == "cache":
        assert len(deprecations) == 1 and "`past_key_values` is deprecated" in deprecations[0], deprecations
        assert "DecoderForCausalLM.forward" in deprecations[0]
    else:
        assert deprecations == []


def test_generate_passes_no_deprecated_name():
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
        out = model.generate(random_ids((1, 4)), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
