"""Tests of the MicroBERT family: config, model, Auto registration and the two export formats.

Everything runs on CPU with tiny configs. The two export tests load the saved folders in a fresh interpreter that
cannot import hf_streamlm (isolated mode, a temporary cwd, and an import blocker in case the package is ever
installed), which is the situation of anyone downloading a published checkpoint.
"""

import importlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, BertForMaskedLM

import hf_streamlm.models
from hf_streamlm.models import MicroBertConfig, MicroBertForMaskedLM, MicroBertModel
from hf_streamlm.models.export_formats import EXPORT_FORMATS, save_model, to_native
from tests.models.isolated import run_isolated


VOCAB = 64


def tiny_config(**overrides) -> MicroBertConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    kwargs.update(overrides)
    return MicroBertConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> MicroBertForMaskedLM:
    torch.manual_seed(seed)
    model = MicroBertForMaskedLM(tiny_config(**overrides))
    # Random (not zero) MLM bias, so that the tests notice if the bias is dropped or mis-tied by an export.
    with torch.no_grad():
        model.cls.predictions.bias.normal_(0.0, 0.5)
    return model.eval()


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of length 10, the second one padded after 6 tokens (pad id 0, attention_mask 0)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (2, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, 6:] = 0
    attention_mask[1, 6:] = 0
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------------------------- config


def test_config_defaults():
    config = MicroBertConfig()
    assert config.model_type == "microbert"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        10000,
        16,
        6,
        8,
    )
    assert config.intermediate_size == 4 * config.hidden_size
    assert config.max_position_embeddings == 128
    assert config.hidden_act == "gelu"
    assert config.pad_token_id == 0
    assert config.tie_word_embeddings is True
    assert MicroBertConfig(hidden_size=24, num_attention_heads=12).intermediate_size == 96
    assert MicroBertConfig(intermediate_size=20).intermediate_size == 20


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 10, "num_attention_heads": 3}, "hidden_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"type_vocab_size": 0}, "type_vocab_size"),
        ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob"),
        ({"attention_probs_dropout_prob": -0.1}, "attention_probs_dropout_prob"),
        ({"hidden_act": "not_an_activation"}, "hidden_act"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"pad_token_id": 10000}, "pad_token_id"),
    ],
)
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        MicroBertConfig(**overrides)


def test_config_hidden_act_error_lists_valid_values():
    with pytest.raises(ValueError, match="gelu"):
        MicroBertConfig(hidden_act="nope")


def test_config_save_load_roundtrip(tmp_path):
    config = tiny_config(hidden_dropout_prob=0.0, custom_key="kept")
    config.save_pretrained(tmp_path)
    loaded = MicroBertConfig.from_pretrained(tmp_path)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "hidden_dropout_prob", "custom_key"):
        assert getattr(loaded, name) == getattr(config, name)


# ------------------------------------------------------------------------------------------------------ model


def test_forward_shapes_and_loss():
    model = tiny_model()
    config = model.config
    input_ids, attention_mask = padded_batch()
    labels = torch.full_like(input_ids, -100)
    labels[0, 2] = 5
    labels[1, 3] = 7

    base_out = model.bert(input_ids, attention_mask=attention_mask, output_hidden_states=True, output_attentions=True)
    assert base_out.last_hidden_state.shape == (2, 10, config.hidden_size)
    assert len(base_out.hidden_states) == config.num_hidden_layers + 1
    assert len(base_out.attentions) == config.num_hidden_layers
    assert base_out.attentions[0].shape == (2, config.num_attention_heads, 10, 10)
    # Padded keys get no attention.
    assert base_out.attentions[0][1, :, :, 6:].abs().max() == 0

    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (2, 10, config.vocab_size)
    expected = torch.nn.functional.cross_entropy(out.logits.view(-1, config.vocab_size), labels.view(-1))
    torch.testing.assert_close(out.loss, expected)
    # Only the two labelled positions count.
    manual = -(out.logits[0, 2].log_softmax(-1)[5] + out.logits[1, 3].log_softmax(-1)[7]) / 2
    torch.testing.assert_close(out.loss, manual)
    # Trainer-style normalisation under gradient accumulation: sum over this micro-batch / items in the whole batch.
    out_sum = model(input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=torch.tensor(4))
    torch.testing.assert_close(out_sum.loss, manual * 2 / 4)

    as_tuple = model(input_ids, attention_mask=attention_mask, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)


def test_training_runs_the_head_only_at_labelled_positions_with_the_same_loss_and_gradients():
    input_ids, attention_mask = padded_batch()
    labels = torch.full_like(input_ids, -100)
    labels[0, 2], labels[1, 3], labels[1, 4] = 5, 7, 9
    model = tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    full = model(input_ids, attention_mask=attention_mask, labels=labels)  # eval mode: every position
    full.loss.backward()
    dense = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sparse = model.train()(input_ids, attention_mask=attention_mask, labels=labels)
    sparse.loss.backward()
    assert full.logits.shape == (2, 10, model.config.vocab_size) and sparse.logits.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(sparse.logits, full.logits[labels != -100])
    torch.testing.assert_close(sparse.loss, full.loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, dense[name], atol=1e-6, rtol=1e-5, msg=name)


def test_init_weights_bert_style():
    model = MicroBertForMaskedLM(tiny_config(vocab_size=4000, hidden_size=32, num_attention_heads=4))
    embedding = model.bert.embeddings.word_embeddings.weight
    assert embedding[0].abs().max() == 0  # pad row
    assert abs(embedding[1:].std().item() - model.config.initializer_range) < 2e-3
    layer = model.bert.encoder.layer[0]
    assert layer.attention.self.query.bias.abs().max() == 0
    assert torch.equal(layer.output.LayerNorm.weight, torch.ones_like(layer.output.LayerNorm.weight))
    assert layer.output.LayerNorm.bias.abs().max() == 0
    assert model.cls.predictions.bias.abs().max() == 0


def test_position_limit_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, model.config.max_position_embeddings + 1, dtype=torch.long))


def test_eager_and_sdpa_agree_with_padding():
    model = tiny_model()
    assert model.config._attn_implementation == "sdpa"  # the transformers default when supported
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        sdpa_logits = model(input_ids, attention_mask=attention_mask).logits
        # Asking for attention probabilities falls back to the eager path for that call only.
        with_probs = model(input_ids, attention_mask=attention_mask, output_attentions=True)
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        eager_logits = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(sdpa_logits, eager_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_probs.logits, eager_logits, atol=1e-5, rtol=0)
    assert with_probs.attentions is not None and len(with_probs.attentions) == model.config.num_hidden_layers
    # The mask matters: without it the padded sequence's real tokens see the padding.
    unmasked = model(input_ids).logits
    assert not torch.allclose(unmasked[1, :6], eager_logits[1, :6], atol=1e-4)
    torch.testing.assert_close(unmasked[0], eager_logits[0], atol=1e-5, rtol=0)


def test_attn_implementation_from_config():
    config = tiny_config(attn_implementation="eager")
    assert MicroBertForMaskedLM(config).config._attn_implementation == "eager"


def test_gradient_checkpointing_same_gradients():
    input_ids, attention_mask = padded_batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)

    def gradients(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        model = tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
        if checkpointing:
            # `activation_checkpointing_enable` is the name from transformers 5.2x on; older 5.x call it gradient_.
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            assert all(layer.gradient_checkpointing for layer in model.bert.encoder.layer)
        calls = []
        # A checkpointed layer re-runs its forward during backward, so its submodules are called twice.
        model.bert.encoder.layer[0].attention.register_forward_hook(lambda *args: calls.append(1))
        model(input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}, len(calls)

    plain, plain_calls = gradients(checkpointing=False)
    checkpointed, checkpointed_calls = gradients(checkpointing=True)
    assert (plain_calls, checkpointed_calls) == (1, 2)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_tied_weights():
    model = tiny_model()
    decoder = model.get_output_embeddings()
    assert decoder is model.cls.predictions.decoder
    assert decoder.weight is model.get_input_embeddings().weight
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert decoder.bias is model.cls.predictions.bias

    model.resize_token_embeddings(VOCAB + 8)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight.shape[0] == VOCAB + 8
    assert model.cls.predictions.decoder.bias.shape[0] == VOCAB + 8
    assert model(torch.tensor([[1, VOCAB + 7]])).logits.shape == (1, 2, VOCAB + 8)

    untied = MicroBertForMaskedLM(tiny_config(tie_word_embeddings=False))
    assert untied.cls.predictions.decoder.weight is not untied.bert.embeddings.word_embeddings.weight


def test_parameter_names_match_bert_for_masked_lm():
    model = tiny_model()
    native = BertForMaskedLM(to_native(model).config)
    assert sorted(model.state_dict()) == sorted(native.state_dict())
    assert "bert.encoder.layer.0.attention.self.query.weight" in model.state_dict()
    assert "cls.predictions.transform.dense.weight" in model.state_dict()
    assert not any("pooler" in name for name in model.state_dict())


# ------------------------------------------------------------------------------------------------- Auto classes


def test_auto_classes_after_import():
    config = tiny_config()
    assert isinstance(AutoModelForMaskedLM.from_config(config), MicroBertForMaskedLM)
    assert isinstance(AutoModel.from_config(config), MicroBertModel)
    assert isinstance(AutoConfig.for_model("microbert", vocab_size=VOCAB), MicroBertConfig)
    # Registration is idempotent: executing the package again must not raise "already used".
    importlib.reload(hf_streamlm.models)


def test_custom_format_roundtrip_in_process(tmp_path):
    model = tiny_model()
    path = save_model(model, tmp_path / "custom", format="custom")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "microbert"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_microbert.MicroBertConfig",
        "AutoModel": "modeling_microbert.MicroBertModel",
        "AutoModelForMaskedLM": "modeling_microbert.MicroBertForMaskedLM",
    }
    assert (path / "modeling_microbert.py").is_file() and (path / "configuration_microbert.py").is_file()

    loaded = AutoModelForMaskedLM.from_pretrained(path).eval()
    assert isinstance(loaded, MicroBertForMaskedLM)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids, attention_mask=attention_mask).logits,
            model(input_ids, attention_mask=attention_mask).logits,
            atol=1e-5,
            rtol=0,
        )


def test_to_native_keeps_dtype_and_weights():
    model = tiny_model().to(torch.bfloat16)
    native = to_native(model)
    assert isinstance(native, BertForMaskedLM)
    assert native.dtype == torch.bfloat16
    assert native.config.architectures == ["BertForMaskedLM"]
    assert native.bert.pooler is None
    assert native.cls.predictions.decoder.weight is native.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(native.cls.predictions.bias, model.cls.predictions.bias, atol=0, rtol=0)
    # Copied, not shared: training the export must not change the project model.
    assert native.bert.embeddings.word_embeddings.weight is not model.bert.embeddings.word_embeddings.weight


def test_save_model_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="native.*custom"):
        save_model(tiny_model(), tmp_path, format="onnx")
    assert EXPORT_FORMATS == ("native", "custom")


# ------------------------------------------------------------------------ exports loaded without hf_streamlm

_LOAD_AND_RUN = """
    import torch
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(model_dir, trust_remote_code=trust).eval()
    inputs = torch.load(inputs_file)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save(logits, outputs_file)
"""


def load_in_clean_process(model_dir: Path, tmp_path: Path, trust_remote_code: bool):
    input_ids, attention_mask = padded_batch()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    report, logits = run_isolated(_LOAD_AND_RUN, model_dir, tmp_path, inputs, trust_remote_code)
    return report, logits, (input_ids, attention_mask)


def test_native_export_loads_with_stock_transformers(tmp_path):
    model = tiny_model()
    path = save_model(model, tmp_path / "native", format="native")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForMaskedLM"]
    assert "auto_map" not in config
    assert not list(path.glob("*.py"))
    assert (path / "model.safetensors").is_file()

    report, logits, (input_ids, attention_mask) = load_in_clean_process(path, tmp_path, trust_remote_code=False)
    assert report["class"] == "transformers.models.bert.modeling_bert.BertForMaskedLM"
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_custom_export_loads_with_trust_remote_code(tmp_path):
    model = tiny_model()
    path = save_model(model, tmp_path / "custom", format="custom")

    report, logits, (input_ids, attention_mask) = load_in_clean_process(path, tmp_path, trust_remote_code=True)
    assert report["class"].startswith("transformers_modules.")
    assert report["class"].endswith("modeling_microbert.MicroBertForMaskedLM")
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
