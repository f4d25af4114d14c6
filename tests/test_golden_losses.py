"""Golden losses (torchtitan's ``tests/assets/losses``): the session's shared tiny runs (``conftest``'s
``mlm_run`` and ``decoder_run``: 4 steps on CPU, fp32, fixed seed) log the losses in
``tests/assets/losses/tiny_runs.json``. The resume tests compare a run with itself; this file catches a
change that moves every run alike -- an initialisation, the data order, the masking, the loss reduction.
A change meant to move them updates the file from the runs' ``history.jsonl`` and says why in its commit.
The tolerance (1e-4 relative) absorbs another CPU's kernels, not a change of numerics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GOLDEN = json.loads((Path(__file__).parent / "assets" / "losses" / "tiny_runs.json").read_text())


def logged(run: Path) -> dict[str, dict[str, float]]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return {"train": {str(r["step"]): r["loss"] for r in rows if "loss" in r},
            "eval": {str(r["step"]): r["eval_loss"] for r in rows if "eval_loss" in r}}


@pytest.mark.parametrize("name", ["mlm", "decoder"])
def test_tiny_runs_log_the_golden_losses(name, request):
    found = logged(request.getfixturevalue(f"{name}_run"))
    golden = GOLDEN[name]
    for kind in ("train", "eval"):
        assert found[kind].keys() == golden[kind].keys(), (name, kind, found[kind])
        for step, loss in golden[kind].items():
            assert found[kind][step] == pytest.approx(loss, rel=1e-4), (name, kind, step, found[kind][step])
