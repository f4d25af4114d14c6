"""Real entry-point runs: the quickstart recipe end to end (shortened by overrides), the console
script, ``accelerate launch`` with two processes, resume, and errors without tracebacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import main_refuses, run_cli, run_in_process, checkpoints_of

SHORT = [
    "recipe=quickstart",
    "scheduler.total_steps=30",
    "scheduler.warmup_steps=3",
    "runtime.log_every_n_steps=5",
    "runtime.evaluation.every_n_steps=15",
    "runtime.evaluation.max_batches=2",
    "runtime.checkpoint.every_n_steps=15",
    "runtime.logging.progress_bar=false",
    "data.shuffle_buffer_size=200",
]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("runs") / "quickstart"
    proc = run_cli(*SHORT, f"runtime.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_run_directory_contract(quickstart_run):
    out, _ = quickstart_run
    for name in ("config.yaml", "history.jsonl", "history.png", "export", "tensorboard", "checkpoints"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in checkpoints_of(out)) == ["step-15", "step-30"]
    export = out / "export"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "hf_streamlm_config.yaml"):
        assert (export / name).is_file(), name
    assert (out / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resolved_config_is_written(quickstart_run):
    out, _ = quickstart_run
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["scheduler"]["total_steps"] == 30  # the override, not the recipe's 400
    assert saved["model"]["hidden_size"] == 128  # from the recipe
    assert saved["optimizer"]["max_grad_norm"] == 1.0  # a default
    assert saved["runtime"]["output_dir"] == str(out)


def test_history_rows_and_loss_goes_down(quickstart_run):
    out, _ = quickstart_run
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    for row in train:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= row.keys()
        assert row["tokens_per_s"] > 0
        # per-source accounting: everything packed so far came from the one source, and covers the
        # tokens trained on (packing reads ahead by at most a tokenization batch)
        assert list(row["source_tokens"]) == ["pydocs"] and row["source_tokens"]["pydocs"] >= row["tokens"]
    tokens = [r["tokens"] for r in train]
    assert tokens == sorted(tokens) and tokens[0] == 5 * 16 * 128  # 5 steps x batch 16 x 128 tokens
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_run_prints_top5_fill_mask_predictions(quickstart_run):
    _, proc = quickstart_run
    out = proc.stdout
    assert "=== Testing MLM Model ===" in out
    # the recipe's held-out sentences, with the true word and its rank in the vocabulary
    assert "1. Original: return a copy of the string with trailing characters [MASK].   (true word: removed)" in out
    block = out.split("1. Original:")[1].split("2. Original:")[0]
    assert block.count("prob=") == 5
    assert re.search(r"true word 'removed': rank \d+ of \d+", block)


NATIVE_CHECK = """
import sys, torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline
path = sys.argv[1]
model = AutoModelForMaskedLM.from_pretrained(path)
assert type(model).__name__ == "ModernBertForMaskedLM", type(model)  # the quickstart recipe's modern encoder
tok = AutoTokenizer.from_pretrained(path)
fill = pipeline("fill-mask", model=path)
preds = fill("the function returns a new " + fill.tokenizer.mask_token + " object.", top_k=5)
assert len(preds) == 5 and all(0 <= p["score"] <= 1 for p in preds)
assert "hf_streamlm" not in sys.modules
print("OK", sum(p.numel() for p in model.parameters()))
"""


def test_export_loads_in_stock_transformers_without_hf_streamlm(quickstart_run, tmp_path):
    out, _ = quickstart_run
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", NATIVE_CHECK, str(out / "export")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")


def test_export_loads_with_auto_classes_in_process(quickstart_run):
    from transformers import AutoModelForMaskedLM, pipeline

    out, _ = quickstart_run
    model = AutoModelForMaskedLM.from_pretrained(out / "export")
    fill = pipeline("fill-mask", model=model, tokenizer=str(out / "export"))
    assert len(fill("raise a [MASK] if the file does not exist.", top_k=5)) == 5


def test_resume_auto_continues_from_newest_checkpoint(quickstart_run, tmp_path, capsys):
    """The resume is ``main`` in this process (conftest ``run_in_process``; the run's own process is
    ``quickstart_run``'s)."""
    out, _ = quickstart_run
    run = tmp_path / "resumed"
    import shutil

    shutil.copytree(out, run)
    shutil.rmtree(run / "checkpoints" / "step-30")  # as if killed between step 15 and 30
    args = [a for a in SHORT if not a.startswith("scheduler.total_steps")]
    capsys.readouterr()
    run_in_process(*args, "scheduler.total_steps=30", f"runtime.output_dir={run}")
    stdout = capsys.readouterr().out
    assert "Resuming from" in stdout and "step-15" in stdout
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [5, 10, 15, 20, 25, 30]  # no duplicated rows after the resume point


def test_resume_never_refuses_a_folder_with_checkpoints(quickstart_run, capsys, reset_accelerate):
    """``hf_streamlm.run``'s main in this process: it refuses before training (an interpreter start was ~10 s)."""

    out, _ = quickstart_run
    err = main_refuses([*SHORT, "runtime.resume=never", f"runtime.output_dir={out}"], capsys)
    assert "runtime.resume=never" in err and "step-30" in err


def test_export_command_native_and_custom_from_run_and_checkpoint(quickstart_run, tmp_path, capsys):
    import torch
    from transformers import AutoModelForMaskedLM

    from hf_streamlm.cli import main

    out, _ = quickstart_run
    # The console script's main in this process (its own process is tests/test_run_launch.py's, and
    # test_run_decoder.py exports through it): an interpreter start per export was ~5 s each.
    for source, fmt in ((out, "custom"), (out / "checkpoints" / "step-15", "native")):
        target = tmp_path / f"{fmt}"
        assert main(["export", str(source), "--format", fmt, "--output", str(target)]) == 0
        assert (target / "tokenizer.json").is_file() and (target / "model.safetensors").is_file()
    native_final = AutoModelForMaskedLM.from_pretrained(out / "export")
    custom_final = AutoModelForMaskedLM.from_pretrained(tmp_path / "custom", trust_remote_code=True)
    native_15 = AutoModelForMaskedLM.from_pretrained(tmp_path / "native")
    assert type(custom_final).__name__ == "ModernMicroBertForMaskedLM"
    assert type(native_15).__name__ == "ModernBertForMaskedLM"
    ids = torch.randint(5, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (native_final(ids).logits - custom_final(ids).logits).abs().max() <= 1e-5  # the run dir's newest = final
        assert (native_final(ids).logits - native_15(ids).logits).abs().max() > 1e-3  # step 15 is another model
    with pytest.raises(SystemExit) as bad:
        main(["export", str(tmp_path), "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "Traceback" not in err and "neither a checkpoint" in err
