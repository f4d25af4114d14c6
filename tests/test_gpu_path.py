"""The GPU-grade decoder path, checked without a GPU: the fused optimizer choice, and the GPU check's dry run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
        [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--dry-run", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| variant | micro-batch | tokens/s | MFU |" in result.stdout
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    # Documents on and off, compiled and not, every implementation of the GPU table has a row.
    assert {"sdpa docs=off compile=off", "sdpa docs=on compile=off", "sdpa docs=off compile=on"} <= rows.keys()
    assert any(name.startswith("flex_attention docs=on") for name in rows)
    for name, row in rows.items():
        if name.startswith("sdpa"):
            assert row["tokens_per_s"] > 0 and 0 <= row["data_wait_pct"] < 100, row
            assert "scaled_dot_product" in row["kernel"], row  # the profiler saw the SDPA kernel
        else:
            assert row["note"].startswith("needs a GPU"), row
