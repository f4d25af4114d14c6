"""``runtime.resume=auto`` follows the timeline the run actually trained (issue #25): each completed save
writes ``checkpoints/latest.json``; a resume from a checkpoint older than the newest moves the newer ones
aside (``abandoned-<time>/``, one log line), so neither ``auto`` nor rotation ever goes back to them; a record
that is missing or names a damaged checkpoint falls back to the newest intact one, with a warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from hf_streamlm.config import load_config
from hf_streamlm.train.checkpoint import (LATEST, MANIFEST, STATE_FILE, abandon_newer,
                                          list_checkpoints, resolve_resume, write_latest)
from tests.conftest import DECODER, run_in_process_stdout


def fake_checkpoint(directory: Path, step: int) -> Path:
    path = directory / f"step-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * 10)
    (path / MANIFEST).write_text(json.dumps({"model.safetensors": 10}))
    (path / STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def auto(directory: Path) -> Path | None:
    return resolve_resume(load_config(["runtime.resume=auto"]), directory)


def test_auto_follows_the_record_and_falls_back_when_it_is_missing_or_damaged(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        fake_checkpoint(ckpts, step)
    write_latest(ckpts, ckpts / "step-4", 4)
    assert json.loads((ckpts / LATEST).read_text()) == {"checkpoint": "step-4", "step": 4}
    caplog.set_level(logging.WARNING)
    assert auto(ckpts) == ckpts / "step-4" and not caplog.text  # not the highest step

    (ckpts / "step-4" / "model.safetensors").write_bytes(b"x")  # damaged after it was written
    assert auto(ckpts) == ckpts / "step-6"
    assert "latest.json: model.safetensors has 1 bytes, 10 were written" in caplog.text
    assert "resuming from the newest intact checkpoint instead" in caplog.text

    caplog.clear()
    (ckpts / LATEST).unlink()
    assert auto(ckpts) == ckpts / "step-6"
    assert "latest.json is missing" in caplog.text

    caplog.clear()
    write_latest(ckpts, ckpts / "step-8", 8)  # a record of a checkpoint that is gone
    assert auto(ckpts) == ckpts / "step-6" and "which is not a complete checkpoint" in caplog.text


def test_a_resume_from_an_older_checkpoint_moves_the_newer_ones_aside(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        fake_checkpoint(ckpts, step)
    best = fake_checkpoint(tmp_path / "best", 2)
    main = SimpleNamespace(is_main_process=True)
    caplog.set_level(logging.WARNING)
    assert abandon_newer(main, ckpts, ckpts / "step-6", 6) == [] and not caplog.text  # the newest: nothing to move
    assert abandon_newer(SimpleNamespace(is_main_process=False), ckpts, ckpts / "step-2", 2) == []  # main only

    moved = abandon_newer(main, ckpts, best, 2)  # from best/ (outside the folder): the record names its path
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-2"]
    assert [p.name for p in moved] == ["step-4", "step-6"] and all(p.is_dir() for p in moved)
    aside = moved[0].parent
    assert aside.parent == ckpts and aside.name.startswith("abandoned-")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "step-4, step-6 moved aside to" in lines[0] and str(aside) in lines[0]
    assert auto(ckpts) == best.resolve()
    fake_checkpoint(ckpts, 4)
    fake_checkpoint(ckpts, 6)
    assert abandon_newer(main, ckpts, ckpts / "step-2", 2)[0].parent != aside  # a second folder, same second


def test_auto_resumes_the_timeline_trained_not_the_abandoned_newer_step(tmp_path, bpe_800, capsys, caplog):
    """A run to step 6 (checkpoints 2, 4, 6; best/ by eval loss), resumed from step-2 and run to step 4 (a new
    step-4), then ``auto`` on to 6: it resumes the new step-4, not the abandoned step-6; step-4 and step-6 of
    the first timeline sit in ``abandoned-*/``, named by one log line; best/ is untouched by the record."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    args = [*DECODER, f"tokenizer.path={bpe_800}", "runtime.checkpoint.max_keep=10", f"runtime.output_dir={out}"]
    run_in_process_stdout(capsys, *args, "scheduler.total_steps=6")
    assert json.loads((ckpts / LATEST).read_text()) == {"checkpoint": "step-6", "step": 6}
    assert not (out / "best" / LATEST).exists() and list_checkpoints(out / "best")

    caplog.clear()
    printed = run_in_process_stdout(capsys, *args, "scheduler.total_steps=4", f"runtime.resume={ckpts / 'step-2'}")
    assert f"Resuming from {ckpts / 'step-2'} (step 2)" in printed
    moved = [r.getMessage() for r in caplog.records if "moved aside" in r.getMessage()]
    assert len(moved) == 1 and "step-4, step-6 moved aside to" in moved[0], caplog.text
    (aside,) = ckpts.glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-4", "step-6"]
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-2", "step-4"]
    assert json.loads((ckpts / LATEST).read_text()) == {"checkpoint": "step-4", "step": 4}

    printed = run_in_process_stdout(capsys, *args, "scheduler.total_steps=6")
    assert f"Resuming from {ckpts / 'step-4'} (step 4)" in printed, printed[-2000:]
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-2", "step-4", "step-6"]
    assert sorted(p.name for p in aside.iterdir()) == ["step-4", "step-6"]  # left where they were put
