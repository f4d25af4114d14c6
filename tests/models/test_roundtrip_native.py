"""A native export read back into the project's classes (to continue pretraining) is lossless."""

from __future__ import annotations

import torch

from hf_streamlm.models.decoder import DecoderConfig, DecoderForCausalLM
from hf_streamlm.models.export_formats import from_native, save_model
from hf_streamlm.models.microbert import MicroBertConfig, MicroBertForMaskedLM
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM


def _roundtrip(model, auto, tmp_path):
    save_model(model, tmp_path, format="native")
    native = auto.from_pretrained(tmp_path)
    back = from_native(native)
    assert type(back) is type(model)
    for (name, a), (name_b, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, back.eval()(ids).logits)
    return back


def test_microbert_native_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = MicroBertForMaskedLM(MicroBertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=2,
                                                 num_attention_heads=2))
    _roundtrip(model, AutoModelForMaskedLM, tmp_path)


def test_decoder_native_roundtrip_keeps_rope_and_tying(tmp_path):
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0})
    back = _roundtrip(DecoderForCausalLM(config), AutoModelForCausalLM, tmp_path)
    assert back.config.rope_parameters["factor"] == 2.0 and back.config.tie_word_embeddings
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
