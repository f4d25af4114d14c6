"""Trackers through Accelerate (``runtime.logging.report_to``): a real run reports to TensorBoard and to
W&B offline (``WANDB_MODE=offline``: the run's files are written under the run directory, nothing is
sent), and both hold the loss ``history.jsonl`` has; a tracker that is not installed, or a name
Accelerate does not know, is one line before anything starts."""

from __future__ import annotations

import json

import pytest

from hf_streamlm.config import ConfigError, load_config
from tests.conftest import TINY, main_refuses, run_cli


def history(run) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_tensorboard_and_wandb_offline_get_the_logged_loss(tmp_path):
    pytest.importorskip("wandb", reason="wandb is in the test extra: pip install -e .[test]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = run_cli("recipe=quickstart_decoder", *TINY, "runtime.logging.tensorboard=true",
                   "runtime.logging.report_to=[tensorboard, wandb]", "runtime.experiment=tracked",
                   f"runtime.output_dir={out}", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = {row["step"]: row["loss"] for row in history(out) if "loss" in row}
    assert sorted(losses) == [2, 4]

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(losses, rel=1e-6)

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    logged, config = {}, {}
    for record in wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            logged[row["_step"]] = row.get("loss")
        elif kind == "config":
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in record.config.update})
    assert logged == pytest.approx(losses, rel=1e-6)
    assert config["runtime.experiment"] == "tracked" and config["data.batch_size"] == 4  # via init_trackers


def wandb_records(path):
    """The protobuf records of an offline W&B run file (``run-<id>.wandb``). wandb 0.31 ships no Python
    reader for it (its Go core writes it); the format is LevelDB's log: a 7-byte file header (``:W&B``,
    magic, version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, little-endian
    length, type 1 full / 2 first / 3 middle / 4 last), a block's tail under 7 bytes being padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, capsys, reset_accelerate):
    """``hf_streamlm.run``'s main in this process (conftest ``main_refuses``: exit 2, no traceback)."""
    from accelerate.tracking import get_available_trackers

    missing = next(n for n in ("aim", "dvclive", "swanlab", "clearml", "comet_ml")
                   if n not in {str(t.value) for t in get_available_trackers()})
    err = main_refuses(["recipe=quickstart_decoder", *TINY, f"runtime.logging.report_to=[tensorboard, {missing}]",
                        "runtime.logging.tensorboard=true", f"runtime.output_dir={tmp_path / 'run'}"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("hf-streamlm: error:")]
    assert len(errors) == 1, err[-2000:]
    assert f"names {missing}, which is not installed: pip install" in errors[0]
    assert not (tmp_path / "run" / "tokenizer").exists()  # stopped before any work


@pytest.mark.parametrize(("value", "needle"), [
    ("tensorbord", "'tensorbord'; choose from: none, all, aim, tensorboard, wandb"),
    ("[none, wandb]", "none and all stand alone"),
])
def test_report_to_names_are_checked_with_the_config(value, needle):
    with pytest.raises(ConfigError) as err:
        load_config(["recipe=quickstart", f"runtime.logging.report_to={value}"])
    assert needle in str(err.value) and "runtime.logging.report_to" in str(err.value)


def test_none_all_and_tensorboard_false(monkeypatch):
    from accelerate.tracking import get_available_trackers

    from hf_streamlm.train.trackers import tracker_names

    def names(*overrides: str) -> list[str]:
        return tracker_names(load_config(["recipe=quickstart", *overrides]))

    assert names() == ["tensorboard"]
    assert names("runtime.logging.report_to=none") == []
    assert names("runtime.logging.report_to=all") == [str(t.value) for t in get_available_trackers()]
    assert names("runtime.logging.report_to=[tensorboard, mlflow]", "runtime.logging.tensorboard=false") == ["mlflow"]


def test_an_eval_row_reaches_history_stdout_and_tensorboard_with_the_accuracy_at_mask(tmp_path, reset_accelerate):
    """The loop's eval row (``score``'s figures) through ``log_row``: ``history.jsonl``, the console line and
    TensorBoard (the run's own tracker set-up) all carry MicroBERT's accuracy at [MASK] beside ``eval_accuracy``."""
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hf_streamlm.train.history import History
    from hf_streamlm.train.logs import log_row
    from hf_streamlm.train.trackers import log_with, start_trackers

    config = load_config(["recipe=quickstart", "runtime.logging.tensorboard=true"])
    accelerator = Accelerator(cpu=True, log_with=log_with(config, tmp_path), project_dir=str(tmp_path))
    start_trackers(accelerator, config, tmp_path)
    row = {"step": 6, "eval_loss": 5.5, "eval_perplexity": 244.7, "eval_tokens": 1200, "eval_accuracy": 0.31,
           "eval_mask_accuracy": 0.22, "eval_mask_top5": 0.41}
    lines: list[str] = []

    class Bar:  # tqdm's write, which log_row prints through
        write = staticmethod(lines.append)

    log_row(row, accelerator, History(tmp_path / "history.jsonl"), Bar(), stdout=True)
    accelerator.end_training()
    assert history(tmp_path) == [row]
    assert "eval_accuracy=0.31 eval_mask_accuracy=0.22 eval_mask_top5=0.41" in lines[0]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    for key in ("eval_accuracy", "eval_mask_accuracy", "eval_mask_top5"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(6, pytest.approx(row[key]))], key
