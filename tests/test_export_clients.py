"""Exports as the ecosystem's tools read them: transformers 4.57 (the last 4.x) and 5.x, optimum's ONNX export
run in onnxruntime, pipelines on long inputs. The 4.x and ONNX checks run in a second environment
(tests/compat_env.py; optimum-onnx pins transformers < 4.58), without hf_streamlm, on the exports of real
tiny training runs (tests/conftest.py): a MicroBERT, a decoder with ``model.rope_theta=500000`` and one with
linear rope scaling."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tests.conftest import REPO

LOAD_TIME_KEYS = ("is_local", "local_files_only")
LONG_TEXT = " ".join(["The function returns the list of values that the method was called with."] * 30)  # 390 words


def _texts(family: str, mask: str = "[MASK]") -> list[str]:
    # Padding (2 texts of different lengths) and truncation (the long one) in the same batch.
    short = f"Return the {mask} thread object." if family == "microbert" else "Return the current thread object."
    return [LONG_TEXT, short]


# ------------------------------------------------------------------------------------------------- files


def test_export_files_say_what_both_transformers_need(mlm_run, decoder_run, decoder_linear_rope_run):
    for run, family, names in ((mlm_run, "microbert", ["input_ids", "token_type_ids", "attention_mask"]),
                               (decoder_run, "decoder", ["input_ids", "attention_mask"]),
                               (decoder_linear_rope_run, "decoder", ["input_ids", "attention_mask"])):
        tokenizer_config = json.loads((run / "export" / "tokenizer_config.json").read_text())
        assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast", run
        assert tokenizer_config["model_input_names"] == names, run
        assert tokenizer_config["model_max_length"] == 64, run  # model.max_position_embeddings
        assert not set(LOAD_TIME_KEYS) & set(tokenizer_config), run

    theta = json.loads((decoder_run / "export" / "config.json").read_text())
    assert theta["rope_theta"] == 500000 and theta["rope_scaling"] is None
    assert theta["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    linear = json.loads((decoder_linear_rope_run / "export" / "config.json").read_text())
    assert linear["rope_theta"] == 10000 and linear["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert linear["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}


def test_decoder_export_generates_from_what_its_tokenizer_returns(decoder_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = decoder_run / "export"
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export)
    inputs = tokenizer(["The function returns"], return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}  # no token_type_ids for a Llama
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert model.config.rope_parameters["rope_theta"] == 500000


def test_fill_mask_on_a_300_token_input(mlm_run, tmp_path):
    """The user's call: a pipeline on a long text, truncated to what the model takes. With the tokenizer's old
    model_max_length (1e9) the same call runs 300+ positions into 64 position embeddings and crashes."""
    from transformers import pipeline

    export = mlm_run / "export"
    text = "Return the [MASK] thread object. " + LONG_TEXT
    fill = pipeline("fill-mask", model=str(export), device="cpu")
    assert len(fill.tokenizer(text)["input_ids"]) > 300
    predictions = fill(text, top_k=3, tokenizer_kwargs={"truncation": True})
    assert len(predictions) == 3 and all(0 <= p["score"] <= 1 for p in predictions)

    unbounded = tmp_path / "unbounded"
    unbounded.mkdir()
    for f in export.iterdir():
        (unbounded / f.name).write_bytes(f.read_bytes())
    settings = json.loads((unbounded / "tokenizer_config.json").read_text())
    (unbounded / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 10**9}))
    with pytest.raises((IndexError, RuntimeError)):
        pipeline("fill-mask", model=str(unbounded), device="cpu")(text, tokenizer_kwargs={"truncation": True})


def test_bpe_microbert_export_serves_fill_mask_on_short_and_long_inputs(mlm_bpe_run):
    """MicroBERT with byte-level BPE, exported as a stock BertForMaskedLM with RoBERTa's specials: the stock
    pipeline fills ``<mask>`` with whole-word tokens (``Ġword``: the mask took the space before it), on a short
    input and on one of 300+ tokens cut at the model's 64 positions."""
    from transformers import BertForMaskedLM, pipeline

    fill = pipeline("fill-mask", model=str(mlm_bpe_run / "export"), device="cpu")
    assert isinstance(fill.model, BertForMaskedLM)
    tokenizer = fill.tokenizer
    assert (tokenizer.bos_token, tokenizer.pad_token, tokenizer.eos_token, tokenizer.mask_token) == (
        "<s>", "<pad>", "</s>", "<mask>")
    assert [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id] == [0, 1, 2, 3]
    assert fill.model.config.pad_token_id == 1

    short = "Return the <mask> thread object."
    ids = tokenizer(short)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and ids.count(3) == 1  # <s> ... <mask> ... </s>
    long = short + " " + LONG_TEXT
    assert len(tokenizer(long)["input_ids"]) > 300
    for text in (short, long):
        predictions = fill(text, top_k=5, tokenizer_kwargs={"truncation": True})
        assert len(predictions) == 5, text[:40]
        assert sum(p["score"] for p in predictions) <= 1 + 1e-6
        for p in predictions:
            # the filled-in input: the predicted token in place of <mask>; the long one cut at the model's 64 positions
            assert p["sequence"].startswith("Return the") and "thread object." in p["sequence"]
            assert p["sequence"].endswith("thread object.") if text == short else len(p["sequence"]) < len(long) / 2
            assert p["token"] not in (0, 1, 2, 3)  # a special token is never a fill
    assert fill.tokenizer.model_max_length == fill.model.config.max_position_embeddings == 64


# ---------------------------------------------------------------------------- transformers 4.57, ONNX


@pytest.mark.timeout(1800)  # the first use builds the compat environment (180-370 s), then ~20 s
def test_exports_load_in_transformers_4_57_and_onnxruntime_with_the_same_logits(
    compat_python, mlm_run, mlm_bpe_run, decoder_run, decoder_linear_rope_run, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    exports = {  # name: (export, family, also through ONNX, mask token)
        "microbert": (mlm_run / "export", "microbert", True, "[MASK]"),
        "microbert-bpe": (mlm_bpe_run / "export", "microbert", False, "<mask>"),
        "decoder-rope-theta": (decoder_run / "export", "decoder", True, None),
        "decoder-linear-rope": (decoder_linear_rope_run / "export", "decoder", False, None),
    }
    spec = [{"name": name, "path": str(path), "family": family, "texts": _texts(family, mask), "onnx": onnx}
            for name, (path, family, onnx, mask) in exports.items()]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    command = [str(compat_python), "-I", str(REPO / "tests" / "compat_check.py"), str(tmp_path / "spec.json"),
               str(tmp_path / "out.pt")]
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = torch.load(tmp_path / "out.pt")
    assert seen["_versions"]["transformers"].startswith("4.57.") and seen["_hf_streamlm_imported"] is False

    for name, (path, family, onnx, mask) in exports.items():
        old = seen[name]
        assert old["tokenizer_class"] == "PreTrainedTokenizerFast", name
        assert old["model_class"] == ("BertForMaskedLM" if family == "microbert" else "LlamaForCausalLM"), name
        assert old["model_max_length"] == 64, name
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = (AutoModelForMaskedLM if family == "microbert" else AutoModelForCausalLM).from_pretrained(path).eval()
        batch = tokenizer(_texts(family, mask), padding=True, truncation=True, return_tensors="pt")
        assert set(batch) == set(old["batch"]), name  # model_input_names: no token_type_ids for the decoder
        for key in batch:
            assert torch.equal(batch[key], old["batch"][key]), (name, key)
        assert batch["input_ids"].shape[1] == 64, name  # the long text cut at the model's positions
        if mask:  # fill-mask in 4.x finds the mask where 5.x does
            assert old["mask_token"] == (mask, tokenizer.mask_token_id), name
        with torch.no_grad():
            logits = model(**batch).logits
        real = batch["attention_mask"].bool()  # padded positions are nobody's prediction
        diff = (logits - old["logits"])[real].abs().max().item()
        print(f"{name}: transformers 4.57 vs 5.x max |logit diff| {diff:.2e}")
        assert diff <= 1e-5, name
        if onnx:
            onnx_diff = (logits - old["onnx_logits"])[real].abs().max().item()
            print(f"{name}: onnxruntime vs transformers 5.x max |logit diff| {onnx_diff:.2e}")
            assert onnx_diff <= 1e-4, name
        if family == "decoder":
            # The rotary frequencies 4.x computed are the ones the model was trained with.
            assert torch.allclose(old["inv_freq"], model.model.rotary_emb.inv_freq, rtol=1e-6), name

    assert seen["decoder-rope-theta"]["rope_theta"] == 500000 and seen["decoder-rope-theta"]["rope_scaling"] is None
    assert seen["decoder-linear-rope"]["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert "token_type_ids" not in seen["decoder-rope-theta"]["onnx_session_inputs"]
