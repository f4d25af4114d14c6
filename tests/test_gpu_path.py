"""The GPU-grade decoder path, checked without a GPU: the fused optimizer choice, and the GPU check's dry run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models.test_decoder import tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_fused_adamw_is_chosen_by_the_training_device():
    from hf_streamlm.config import load_config
    from hf_streamlm.train.builders import build_optimizer

    config = load_config(["recipe=quickstart_decoder"])
    model = tiny_model()  # parameters still on the CPU, as before `accelerator.prepare` moves them
    # torch's fused AdamW also has a CPU kernel, so the CUDA choice can be checked on a CPU-only machine.
    assert build_optimizer(model, config, torch.device("cuda")).defaults["fused"] is True
    assert not build_optimizer(model, config, torch.device("cpu")).defaults["fused"]


def test_gpu_check_dry_run_prints_the_table(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--dry-run", "--fsdp", "off", "--json",
         str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| variant | micro-batch | tokens/s | MFU |" in result.stdout
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    # Documents on and off, compiled and not, every implementation of the GPU table has a row.
    assert {"sdpa docs=off compile=off", "sdpa docs=on compile=off", "sdpa docs=off compile=on",
            "sdpa docs=on compile=off logits=full",  # and the fused loss against full logits
            "sdpa docs=on compile=off optimizer=muon"} <= rows.keys()  # and Muon against fused AdamW
    assert any(name.startswith("flex_attention docs=on") for name in rows)
    for name, row in rows.items():
        if name.startswith("sdpa"):
            assert row["tokens_per_s"] > 0 and 0 <= row["data_wait_pct"] < 100, row
            assert "scaled_dot_product" in row["kernel"], row  # the profiler saw the SDPA kernel
        else:
            assert row["note"].startswith("needs a GPU"), row


def word_tokenizer():
    """A tiny tokenizer with the special tokens both families read (pad, mask, bos/eos)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[MASK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": 4 + i for i in range(60)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "[PAD]")), pad_token="[PAD]",
                                   mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]")


@pytest.mark.parametrize("recipe", ["quickstart", "quickstart_decoder"])
def test_activation_checkpointing_is_configuration_and_keeps_the_gradients(recipe):
    """``model.gradient_checkpointing: true`` turns on transformers' checkpointing (every layer recomputed in
    backward); the gradients are those of the plain model within 1e-5 (fp32), dropout included (the replay
    restores the RNG state)."""
    from hf_streamlm.config import load_config
    from hf_streamlm.train.builders import build_model

    tokenizer = word_tokenizer()
    args = [f"recipe={recipe}", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
            "model.max_position_embeddings=32", "data.sequence_length=32", "model.residual_dropout=0.1"]
    ids = torch.randint(4, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))

    def gradients(checkpointing: bool) -> tuple[dict[str, torch.Tensor], list[bool]]:
        torch.manual_seed(0)
        model = build_model(load_config([*args, f"model.gradient_checkpointing={checkpointing}"]), tokenizer).train()
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        layers = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        return {name: p.grad.clone() for name, p in model.named_parameters()}, layers

    plain, plain_layers = gradients(False)
    checkpointed, checkpointed_layers = gradients(True)
    assert checkpointed_layers == [True, True] and plain_layers == [False, False]
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=0, msg=name)


def test_compiled_training_with_document_masking_matches_uncompiled(tmp_path):
    """``runtime.compile`` with packed documents (``data.document_masking``: position and document ids, the
    document-causal mask) in the real loop: the same losses as without compilation. aot_eager traces what
    Inductor would get (Dynamo + AOTAutograd, forward and backward graphs); Inductor's own code generation
    takes minutes on a 2-core CPU and is left to the GPU check (``bench_gpu.py``, compile=on rows)."""
    from torch._dynamo.utils import counters

    from hf_streamlm.config import load_config
    from hf_streamlm.train.loop import train
    from tests.conftest import DECODER

    args = [*DECODER, "scheduler.total_steps=3", "runtime.log_every_n_steps=1", "runtime.checkpoint.every_n_steps=3",
            "runtime.evaluation.every_n_steps=null", "runtime.compile_backend=aot_eager"]
    assert load_config(args).data.document_masking  # the decoder recipe packs documents
    torch._dynamo.reset()
    counters.clear()
    compiled = train(load_config([*args, "runtime.compile=true", f"runtime.output_dir={tmp_path / 'compiled'}"]))
    assert counters["stats"]["unique_graphs"] > 0  # really compiled
    plain = train(load_config([*args, f"runtime.output_dir={tmp_path / 'plain'}"]))

    def losses(run: Path) -> list[float]:
        return [row["loss"] for row in map(json.loads, (run / "history.jsonl").read_text().splitlines()) if "loss" in row]

    assert len(losses(compiled)) == 3 and all(math.isfinite(x) for x in losses(compiled))
    assert losses(compiled) == pytest.approx(losses(plain), abs=1e-5)


def test_memory_estimate_counts_the_logits_the_loss_holds():
    """`hf-streamlm models`' training memory holds the LM head's logits and loss (~12 bytes per logit): every
    position of the micro-batch with full logits, one `model.loss_chunk_size` chunk with the fused loss."""
    from hf_streamlm.config import load_config
    from hf_streamlm.train.builders import estimate

    config = load_config(["recipe=runpod_1b"])
    fused = estimate(config.model, 50_000, 2048, 8)["train_memory_gib"]
    config.model.loss_chunk_size = 0
    full = estimate(config.model, 50_000, 2048, 8)["train_memory_gib"]
    assert (full - fused) * 2**30 == pytest.approx(12 * (8 * 2048 - 512) * 50_000)


def test_memory_estimate_counts_one_moment_for_the_matrices_muon_trains():
    """With optimizer.algorithm=muon the matrices Muon trains hold one moment instead of AdamW's two: 4 bytes less
    each, for every Linear weight of the blocks (7 per layer at runpod_1b's shape), the embeddings excepted."""
    from hf_streamlm.config import load_config
    from hf_streamlm.train.builders import estimate, meta_model, muon_parameters

    m = load_config(["recipe=runpod_1b"]).model
    adamw = estimate(m, 50_000, 2048, 2)["train_memory_gib"]
    muon = estimate(m, 50_000, 2048, 2, "muon")["train_memory_gib"]
    matrices = sum(p.numel() for p in muon_parameters(meta_model(m, 50_000)))
    d, inter = m.hidden_size, 5504
    assert matrices == m.num_layers * (4 * d * d + 3 * d * inter)  # q k v o (32 KV heads) and gate up down
    assert (adamw - muon) * 2**30 == pytest.approx(4 * matrices)

