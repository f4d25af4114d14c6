"""The modern MicroBERT tier (model.architecture=modern, issue 28 part 3): ModernBERT's design as a project model.

Numerics against the stock `ModernBertForMaskedLM` after the native export, in the installed transformers 5.x and
in transformers 4.57 (tests/compat_env.py); the sparse training head against the dense loss; packed documents
against each document alone; the local layers' window; the custom export through `trust_remote_code`; and a
tiny training run through the entry point, its export scored and filled in.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import torch
from transformers import AutoModelForMaskedLM, ModernBertForMaskedLM

from hf_streamlm.models import ModernMicroBertConfig, ModernMicroBertForMaskedLM
from hf_streamlm.models.export_formats import from_native, save_model
from tests.conftest import MLM, trained
from tests.models.isolated import run_isolated
from tests.models.test_flash_varlen import StandInKernels, packed_blocks

ATOL = 1e-5
VOCAB = 64


def tiny_model(**overrides) -> ModernMicroBertForMaskedLM:
    """4 layers (global, local, global, local), a window of 3 tokens each side, non-default rotary bases."""
    settings = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
                "local_attention": 6, "global_attn_every_n_layers": 2, "global_rope_theta": 900.0,
                "local_rope_theta": 40.0, "pad_token_id": 0, **overrides}
    torch.manual_seed(0)
    return ModernMicroBertForMaskedLM(ModernMicroBertConfig(**settings)).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (2, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 13:] = 0
    input_ids[1, 13:] = 0
    return input_ids, attention_mask


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()  # padded positions are nobody's prediction


@torch.no_grad()
def test_native_export_is_a_stock_modernbert_with_the_same_logits(tmp_path):
    model = tiny_model()
    path = save_model(model, tmp_path / "native")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "modernbert" and "auto_map" not in config and not list(path.glob("*.py"))
    # The 4.x spelling of the layer pattern and the rotary bases, beside the 5.x one.
    assert (config["global_attn_every_n_layers"], config["global_rope_theta"], config["local_rope_theta"]) == (
        2, 900.0, 40.0)
    assert config["layer_types"] == ["full_attention", "sliding_attention"] * 2

    input_ids, attention_mask = padded_batch()
    for implementation in ("sdpa", "eager"):
        stock = AutoModelForMaskedLM.from_pretrained(path, attn_implementation=implementation).eval()
        assert type(stock) is ModernBertForMaskedLM
        model.set_attn_implementation(implementation)
        ours = model(input_ids, attention_mask=attention_mask).logits
        theirs = stock(input_ids, attention_mask=attention_mask).logits
        diff = max_diff(ours, theirs, attention_mask)
        print(f"{implementation}: modern MicroBERT vs stock ModernBertForMaskedLM (transformers 5.x) {diff:.2e}")
        assert diff <= ATOL, implementation
    # And back: the same weights under the project's class, the same config.
    back = from_native(stock)
    for name in ("hidden_size", "intermediate_size", "local_attention", "global_attn_every_n_layers",
                 "global_rope_theta", "local_rope_theta", "pad_token_id", "tie_word_embeddings"):
        assert getattr(back.config, name) == getattr(model.config, name), name
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


_COMPAT_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, transformers
    from transformers import AutoModelForMaskedLM

    path, inputs_file, outputs_file = sys.argv[1:4]
    inputs = torch.load(inputs_file)
    out = {"version": transformers.__version__}
    for implementation in ("sdpa", "eager"):
        model = AutoModelForMaskedLM.from_pretrained(path, attn_implementation=implementation).eval()
        out["class"] = type(model).__name__
        out["windows"] = [list(layer.attn.local_attention) for layer in model.model.layers]
        with torch.no_grad():
            out[implementation] = model(**inputs).logits
    torch.save(out, outputs_file)
""")


def test_native_export_matches_in_transformers_4_57(compat_python, tmp_path):
    model = tiny_model()
    path = save_model(model, tmp_path / "native")
    input_ids, attention_mask = padded_batch()
    # token_type_ids as the project's BERT-style tokenizers return them: a stock ModernBERT takes and ignores them.
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "check.py").write_text(_COMPAT_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(compat_python), "-I", str(tmp_path / "check.py"), str(path), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = torch.load(tmp_path / "out.pt")
    assert seen["version"].startswith("4.57.") and seen["class"] == "ModernBertForMaskedLM"
    assert seen["windows"] == [[-1, -1], [3, 3], [-1, -1], [3, 3]]  # global, local (+-3), ... as the config says
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    for implementation in ("sdpa", "eager"):
        diff = max_diff(seen[implementation], expected, attention_mask)
        print(f"{implementation}: modern MicroBERT vs stock ModernBertForMaskedLM (transformers 4.57) {diff:.2e}")
        assert diff <= ATOL, implementation


def test_custom_export_loads_with_trust_remote_code(tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    path = save_model(model, tmp_path / "custom", format="custom")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "modern_microbert"
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_modern_microbert.ModernMicroBertForMaskedLM"
    input_ids, attention_mask = padded_batch()
    body = """
        import torch
        from transformers import AutoModelForMaskedLM

        model = AutoModelForMaskedLM.from_pretrained(model_dir, trust_remote_code=trust).eval()
        with torch.no_grad():
            torch.save({"logits": model(**torch.load(inputs_file)).logits}, outputs_file)
    """
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    report, outputs = run_isolated(body, path, tmp_path, inputs, trust_remote_code=True)
    assert report["class"].startswith("transformers_modules.")
    assert report["class"].endswith("modeling_modern_microbert.ModernMicroBertForMaskedLM")
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    assert max_diff(outputs["logits"], expected, attention_mask) == 0.0


def test_sparse_training_head_gives_the_dense_loss_and_gradients():
    """In training the head runs only at the labelled rows (from the collator's masked_positions, or found from
    the labels); the loss and every gradient are those of the dense head over all positions."""
    model = tiny_model()
    input_ids, attention_mask = padded_batch()
    labels = torch.full_like(input_ids, -100)
    chosen = torch.zeros_like(input_ids, dtype=torch.bool)
    chosen[0, [1, 5, 17]] = chosen[1, [0, 9]] = True
    labels[chosen] = input_ids[chosen]
    masked_positions = torch.from_numpy(chosen.reshape(-1).numpy().nonzero()[0])

    def loss_and_grads(train: bool, **extra):
        model.zero_grad()
        model.train(train)  # every dropout is 0: train and eval compute the same function
        out = model(input_ids, attention_mask=attention_mask, labels=labels, **extra)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters()}

    dense, dense_grads = loss_and_grads(False)
    assert dense.logits.shape == (2, 20, VOCAB)  # eval mode: full logits
    for extra in ({"masked_positions": masked_positions}, {}):
        sparse, grads = loss_and_grads(True, **extra)
        assert sparse.logits.shape == (5, VOCAB)
        torch.testing.assert_close(sparse.loss, dense.loss, atol=1e-6, rtol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, dense_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    # num_items_in_batch (gradient accumulation): the sum over this micro-batch divided by the given count.
    model.train()
    summed = model(input_ids, attention_mask=attention_mask, labels=labels, masked_positions=masked_positions,
                   num_items_in_batch=torch.tensor(10)).loss
    torch.testing.assert_close(summed, dense.loss * 5 / 10, atol=1e-6, rtol=0)
    # Without labels (a plain call, pipeline("fill-mask")), training mode too: dense logits.
    assert model(input_ids).logits.shape == (2, 20, VOCAB)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_packed_documents_compute_what_each_computes_alone(implementation):
    """document_ids keep attention within each document and restarting position_ids give each the rotary
    positions it has alone; documents longer than the window (3 each side) exercise it inside a document."""
    model = tiny_model()
    model.set_attn_implementation(implementation)
    torch.manual_seed(2)
    lengths = [9, 4, 7]
    documents = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    packed = torch.cat(documents)[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    logits = model(packed, position_ids=position_ids, document_ids=document_ids).logits[0]
    start = 0
    for document in documents:
        alone = model(document[None]).logits[0]
        torch.testing.assert_close(logits[start : start + len(document)], alone, atol=ATOL, rtol=0)
        start += len(document)
    # Without the document inputs the documents do see each other.
    assert max_diff(model(packed).logits[0, :9], model(documents[0][None]).logits[0], torch.ones(9)) > ATOL


@torch.no_grad()
def test_local_layers_see_only_their_window_as_stock_modernbert_does(tmp_path):
    """A local layer's query gets no attention weight from keys more than local_attention // 2 tokens away (and
    their values cannot reach it); a global layer's does. The attention probabilities equal stock ModernBERT's."""
    model = tiny_model()
    input_ids, _ = padded_batch()
    attentions = model(input_ids, output_attentions=True).attentions
    distance = (torch.arange(20)[:, None] - torch.arange(20)[None, :]).abs()
    for layer, probs in enumerate(attentions):
        outside = probs[..., distance > 3]
        assert (outside == 0).all() if layer % 2 else (outside > 0).all(), layer
    stock = AutoModelForMaskedLM.from_pretrained(save_model(model, tmp_path / "native"), attn_implementation="eager")
    stock_attentions = stock.eval()(input_ids, output_attentions=True).attentions
    for ours, theirs in zip(attentions, stock_attentions):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)

    # A local layer alone: changing a token outside the window of query 0 leaves its output there unchanged,
    # changing one inside does not.
    layer = model.model.layers[1]
    assert layer.attn.kind == "local"
    hidden = torch.randn(1, 20, 16)
    cos_sin = model.model.rotary_emb(hidden, torch.arange(20)[None], model.config.local_rope_theta)
    masks = model.model._dense_masks(None, None, 20, hidden.device)
    base = layer(hidden, cos_sin, attention_mask=masks["local"])[0][0, 0]
    far, near = hidden.clone(), hidden.clone()
    far[0, 4], near[0, 3] = torch.randn(16), torch.randn(16)  # not a constant shift: the LayerNorm removes it
    assert torch.equal(layer(far, cos_sin, attention_mask=masks["local"])[0][0, 0], base)
    assert (layer(near, cos_sin, attention_mask=masks["local"])[0][0, 0] - base).abs().max() > ATOL


class WindowedStandIns(StandInKernels):
    """tests/models/test_flash_varlen.py's exact stand-in kernels, honouring `window_size` (flash-attn's
    (left, right): a query at i sees keys i - left .. i + right) and recording the windows they were given."""

    def __init__(self):
        super().__init__()
        self.windows: list[tuple[int, int]] = []
        self.window = (-1, -1)

    def attend(self, q, k, v, allowed, softmax_scale):
        left, right = self.window
        if left >= 0:  # in a flattened batch the index distance within a segment is the position distance
            index = torch.arange(allowed.shape[-1])
            offset = index[None, :] - index[:, None]
            allowed = allowed & (offset >= -left) & (offset <= right)
        return super().attend(q, k, v, allowed, softmax_scale)

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, deterministic=False):
        self.window = tuple(window_size)
        self.windows.append(self.window)
        return super().flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                                       deterministic)

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               deterministic=False):
        self.window = tuple(window_size)
        self.windows.append(self.window)
        return super().flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              dropout_p, softmax_scale, causal, window_size, softcap, deterministic)


@pytest.mark.parametrize("from_collator", [True, False])
def test_flash_kernels_attend_within_documents_and_the_window(monkeypatch, from_collator):
    """transformers' real flash path with exact stand-in kernels: packed documents (and padding) reach the varlen
    entry point as the collator's segments (or ones the model derives), the local layers with their window, and
    the logits and gradients are SDPA's with the document and window masks."""
    import sys
    import types

    import transformers.modeling_flash_attention_utils as flash_utils

    from hf_streamlm.data.collate import MLMCollator

    stand_ins = WindowedStandIns()
    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_func, module.flash_attn_varlen_func = stand_ins.flash_attn_func, stand_ins.flash_attn_varlen_func
    module.flash_attn_with_kvcache = None
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)

    reference = tiny_model(vocab_size=97)
    flash = tiny_model(vocab_size=97)
    flash.config._attn_implementation = "flash_attention_3"  # no availability check: the stand-ins are the kernels
    collator = MLMCollator(mask_token_id=1, vocab_size=97, special_ids=[0, 1], mlm_probability=0.3)
    batch = collator(packed_blocks(2))
    assert {"position_ids", "document_ids", "cu_seq_lens_q", "masked_positions"} <= set(batch)
    if not from_collator:
        batch = {k: v for k, v in batch.items() if not k.startswith(("cu_seq_lens", "max_length"))}

    def logits_and_gradients(model):
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    expected_logits, expected_grads = logits_and_gradients(reference)
    logits, grads = logits_and_gradients(flash)
    assert stand_ins.calls == ["varlen"] * 4 and stand_ins.windows == [(-1, -1), (3, 3)] * 2
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected_logits[real], atol=ATOL, rtol=ATOL)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=ATOL, rtol=ATOL, msg=name)


# A tiny modern run through the entry point: packed documents with a window shorter than the blocks, the
# wordpiece tokenizer the other MicroBERT runs share.
def modern_args(tokenizer) -> list[str]:
    return [*MLM, "model.architecture=modern", "data.document_masking=true", "model.local_attention=16",
            f"tokenizer.path={tokenizer}"]


def test_training_run_exports_a_stock_modernbert_that_scores_and_fills_masks(tmp_path_factory, wordpiece_800):
    from transformers import pipeline

    from hf_streamlm.evaluation import evaluate_model, load_model

    run = trained(tmp_path_factory, "modern-mlm", modern_args(wordpiece_800))
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in history if "loss" in row]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    last_eval = [row for row in history if "eval_loss" in row][-1]
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert type(load_model(checkpoint)[0]) is ModernMicroBertForMaskedLM  # what resume and eval load

    export = run / "export"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["ModernBertForMaskedLM"]
    fill = pipeline("fill-mask", model=str(export), top_k=3)
    assert type(fill.model) is ModernBertForMaskedLM
    assert len(fill(f"return a copy of the {fill.tokenizer.mask_token}.")) == 3
    # The held-out score of the export: scored as the class that trained it (the stock model would ignore the
    # document_ids of the packed held-out blocks).
    scored = evaluate_model(checkpoint, [])
    assert scored["eval_loss"] == pytest.approx(last_eval["eval_loss"], abs=1e-6)
    scored_export = evaluate_model(export, [])
    assert scored_export["eval_loss"] == pytest.approx(last_eval["eval_loss"], abs=1e-6)  # scored as the project class


def test_config_section_presets_and_refusals():
    """model.architecture=modern: the presets' sizes, ModernBERT's defaults for null keys, and what is refused."""
    from hf_streamlm.config import ConfigError, ModelConfig, build, load_config
    from hf_streamlm.models.presets import MODEL_PRESETS
    from hf_streamlm.train.builders import count_parameters, hf_model_config

    large = build(ModelConfig, MODEL_PRESETS["modern-microbert-hf-large"])
    config = hf_model_config(large, 10_000)
    assert isinstance(config, ModernMicroBertConfig) and config.intermediate_size == 24  # 1.5 x 16
    assert (config.local_attention, config.global_attn_every_n_layers) == (128, 3)
    assert (config.global_rope_theta, config.local_rope_theta) == (160_000.0, 10_000.0)
    assert count_parameters(large, 10_000) == 183_536  # docs/models.md's presets table
    modern = load_config(["recipe=quickstart", "model.architecture=modern", "data.document_masking=true",
                          "model.attn_implementation=flex_attention", "model.rope_theta=1000",
                          "model.local_attention=64"])
    assert hf_model_config(modern.model, 100).global_rope_theta == 1000.0
    for args, message in (
        (["model.type=decoder", "model.architecture=modern"], "MicroBERT tier"),
        (["model.architecture=classic", "model.local_attention=64"], "model.architecture=modern"),
        (["model.architecture=classic", "data.document_masking=true"], "classic MicroBERT"),
        (["model.architecture=classic", "model.attn_implementation=flex_attention"], "classic microbert must be sdpa or eager"),
        (["model.architecture=modern", "model.rope_mode=linear", "model.rope_factor=2"], "no scaling"),
        (["model.architecture=modern", "model.hidden_size=6", "model.num_attention_heads=2"], "even"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(["recipe=quickstart", *args])
