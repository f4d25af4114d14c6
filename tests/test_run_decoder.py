"""The decoder end to end: offline recipe (shortened), native Llama export that stock transformers
loads and generates with, continued pretraining from that export, and torch.compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli, run_in_process

SHORT = [
    "recipe=quickstart_decoder",
    "scheduler.total_steps=20",
    "scheduler.warmup_steps=2",
    "runtime.log_every_n_steps=5",
    "runtime.evaluation.every_n_steps=10",
    "runtime.evaluation.max_batches=2",
    "runtime.checkpoint.every_n_steps=10",
    "runtime.logging.progress_bar=false",
    "data.shuffle_buffer_size=200",
]


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "decoder"
    proc = run_cli(*SHORT, f"runtime.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_decoder_trains_and_prints_generations(decoder_run):
    out, proc = decoder_run
    values = losses(out)
    assert len(values) == 4 and values[-1] < values[0] - 0.5
    assert "=== Testing the decoder ===" in proc.stdout and "1. 'The function returns" in proc.stdout
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]


def test_exports_hold_no_pickle(decoder_run):
    out, _ = decoder_run
    files = [p.name for p in (out / "export").iterdir()]
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]


STOCK_GENERATE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path)
assert type(model).__name__ == "LlamaForCausalLM", type(model)
tok = AutoTokenizer.from_pretrained(path)
ids = tok("The function returns", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, do_sample=False)
assert out.shape[1] == ids.shape[1] + 8
text = pipeline("text-generation", model=path)("This method", max_new_tokens=5, do_sample=False)[0]["generated_text"]
assert text.startswith("This method")
assert "hf_streamlm" not in sys.modules
print("OK")
"""


def test_native_export_generates_in_stock_transformers(decoder_run, tmp_path):
    out, _ = decoder_run
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", STOCK_GENERATE, str(out / "export")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_continue_pretraining_from_the_native_export(decoder_run, tmp_path):
    """``main`` in this process (conftest ``run_in_process``; the entry point's own process is ``decoder_run``'s)."""
    out, _ = decoder_run
    export = out / "export"
    run_in_process(*SHORT, "scheduler.total_steps=5", f"model.pretrained={export}", f"tokenizer.path={export}",
                   f"runtime.output_dir={tmp_path / 'continued'}")
    # It starts from the trained weights: its first loss is near where the first run ended, far below
    # the first loss of a fresh model.
    assert losses(tmp_path / "continued")[0] < losses(out)[0] - 0.5


def test_compiled_model_trains_and_exports(decoder_run, tmp_path, reset_accelerate):
    run = tmp_path / "compiled"
    # The end-to-end run's tokenizer (the recipe's 4000-token BPE), loaded rather than trained a second time.
    # One layer: compiling is most of this run's time, and it grows with the graph (what is checked is that the
    # compiled module trains, checkpoints and exports, not its depth).
    proc = run_cli(*SHORT, "scheduler.total_steps=4", "runtime.compile=true", "runtime.compile_backend=aot_eager",
                   "runtime.checkpoint.every_n_steps=4", f"tokenizer.path={decoder_run[0] / 'tokenizer'}",
                   "model.num_layers=1", f"runtime.output_dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "export" / "model.safetensors").is_file()
    # ``hf-streamlm export`` of the compiled run, through the CLI's main in this process (the console script's
    # own process is tests/test_run_launch.py's).
    from hf_streamlm.cli import main

    assert main(["export", str(run), "--output", str(tmp_path / "re")]) == 0
