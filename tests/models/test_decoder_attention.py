"""Attention as configuration: every implementation available on this machine against eager, with packed documents
and padding, logits and gradients within 1e-5 (fp32), and the mask format each one is handed."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward as transformers_sdpa

from tests.models.test_decoder import ATOL, random_ids, tiny_model

# Two rows of 10: row 0 packs documents of 4, 3 and 3 tokens; row 1 is left-padded by 2, then 5 + 3 tokens.
POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 2, 3, 4, 0, 1, 2]])
DOCUMENTS = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 2, 2, 2]])
PADDING = torch.tensor([[1] * 10, [0, 0] + [1] * 8])
REAL = PADDING.bool()


def packed_inputs() -> dict[str, torch.Tensor]:
    return {
        "input_ids": random_ids((2, 10)).masked_fill(~REAL, 0),
        "attention_mask": PADDING,
        "position_ids": POSITIONS,
        "document_ids": DOCUMENTS,
    }


def masks_seen(model) -> list:
    """Record the `attention_mask` the first layer's attention is called with."""
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    return seen


def forward_and_grads(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(**inputs).logits
    # A loss over the real tokens only, so that padding rows (defined differently per kernel) do not enter.
    (logits[REAL].float().square().mean()).backward()
    return logits.detach()[REAL], {name: p.grad.clone() for name, p in model.named_parameters()}


def test_flex_attention_uses_a_block_mask_and_matches_eager():
    eager = tiny_model(attn_implementation="eager")
    flex = tiny_model(attn_implementation="flex_attention")
    assert flex.config._attn_implementation == "flex_attention"
    seen = masks_seen(flex)
    inputs = packed_inputs()
    with torch.no_grad():
        expected = eager(**inputs).logits[REAL]
        got = flex(**inputs).logits[REAL]
    # Documents and padding reach the kernel as a block mask, never as a dense (T x T) tensor.
    assert isinstance(seen[0], BlockMask)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # The mask matters: the same tokens as one document give other logits.
    with torch.no_grad():
        unpacked = flex(input_ids=inputs["input_ids"], attention_mask=PADDING).logits[REAL]
    assert not torch.allclose(unpacked, expected, atol=1e-3)


def test_registered_attention_function_is_dispatched_with_logits_and_gradients_of_eager():
    # A function registered with transformers' AttentionInterface (here transformers' own SDPA function) is what
    # `model.attn_implementation: NAME` selects, with the module-first signature and a dense boolean mask.
    AttentionInterface.register("streamlm_test_sdpa", transformers_sdpa)
    eager = tiny_model(attn_implementation="eager").train()
    other = tiny_model(attn_implementation="streamlm_test_sdpa").train()
    assert other.config._attn_implementation == "streamlm_test_sdpa"
    seen = masks_seen(other)
    inputs = packed_inputs()
    expected_logits, expected_grads = forward_and_grads(eager, inputs)
    logits, grads = forward_and_grads(other, inputs)
    assert seen[0].dtype == torch.bool and seen[0].shape == (2, 1, 10, 10)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_compiled_model_with_packed_documents_matches_eager(attn_implementation):
    eager = tiny_model(attn_implementation="eager").train()
    compiled = tiny_model(attn_implementation=attn_implementation).train()
    inputs = packed_inputs()
    expected_logits, expected_grads = forward_and_grads(eager, inputs)
    torch._dynamo.reset()
    compiled.forward = torch.compile(compiled.forward, backend="aot_eager", fullgraph=False)
    logits, grads = forward_and_grads(compiled, inputs)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
    for name in expected_grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=ATOL, rtol=0, msg=name)


def test_attn_implementation_is_configuration(tmp_path):
    from hf_streamlm.config import ConfigError, load_config
    from hf_streamlm.train.builders import build_model
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1}, "<pad>")))
    decoder = ["recipe=quickstart_decoder", "model.max_position_embeddings=64", "data.sequence_length=64"]
    model = build_model(load_config([*decoder, "model.attn_implementation=eager"]), tokenizer)
    assert model.config._attn_implementation == "eager"
    assert build_model(load_config(decoder), tokenizer).config._attn_implementation == "sdpa"
    # Refused in one line: a kernel that is not installed, MicroBERT beyond sdpa/eager, flex with attention dropout.
    with pytest.raises(ConfigError, match="flash_attention_2"):
        build_model(load_config([*decoder, "model.attn_implementation=flash_attention_2"]), tokenizer)
    if not torch.cuda.is_available():  # FlexAttention has no backward on the CPU: refused for training there
        with pytest.raises(ConfigError, match="flex_attention trains on a GPU"):
            build_model(load_config([*decoder, "model.attn_implementation=flex_attention"]), tokenizer)
    with pytest.raises(ConfigError, match="microbert must be sdpa or eager"):
        load_config(["recipe=quickstart", "model.architecture=classic", "model.attn_implementation=flex_attention"])
    with pytest.raises(ConfigError, match="no attention dropout"):
        load_config([*decoder, "model.attn_implementation=flex_attention", "model.attn_dropout=0.1"])

