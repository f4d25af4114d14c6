"""Real entry points besides the quickstart run of tests/test_run.py (split from it so the two test
processes get even shares): the console script, bad input without tracebacks, ``accelerate launch`` with
two processes, and the launcher's precision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, main_refuses, run_in_process, run_in_process_stdout
from tests.test_run import SHORT


def test_console_script_is_the_same_entry_point(tmp_path, capsys):
    script = Path(sys.executable).parent / "hf-streamlm"
    assert script.exists(), "install the package (pip install -e .) to get the hf-streamlm script"
    proc = subprocess.run([str(script), "train", "recipe=quickstart", "optimizer.learnin_rate=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "learnin_rate" in proc.stderr

    # The other subcommands through the script's own main, in this process (an interpreter start each is ~5 s).
    from hf_streamlm.cli import main

    assert main(["recipes"]) == 0 and "quickstart" in capsys.readouterr().out.split()
    assert main(["config", "recipe=quickstart", "data.batch_size=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["batch_size"] == 3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["recipe=quickstart", "optimizer.learnin_rate=1"], "learnin_rate"),
        (["recipe=does_not_exist"], "quickstart"),
        (["recipe=quickstart", "data.batch_size=lots"], "data.batch_size"),
        (["recipe=quickstart", "model.hidden_size=100", "model.num_attention_heads=3"], "num_attention_heads"),
    ],
)
def test_bad_input_exits_with_one_line_and_no_traceback(args, needle, capsys):
    """``hf_streamlm.run``'s main in this process (a fresh interpreter per case cost ~10 s each; the console
    script's own process is checked above): exit 2 with one line, and no exception but SystemExit."""
    from hf_streamlm.run import main

    with pytest.raises(SystemExit) as exited:
        main(list(args))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err


def test_bad_data_found_while_building_is_one_line(tmp_path, capfd, reset_accelerate):
    """``hf_streamlm.run``'s main in this process (conftest ``main_refuses``: exit 2, no traceback)."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"body": "some words here"}) + "\n")
    err = main_refuses(["recipe=quickstart", f"runtime.output_dir={tmp_path / 'out'}",
                        f"data.sources=[{{path: json, data_files: '{corpus}'}}]"], capfd)
    assert "no column 'text'" in err and "body" in err


# A model of width 32: what these runs check is the launch, the ranks' token counts and the resume, not the
# model; the recipe's width made the two-process run and its resume several times longer.
SMALL_MODEL = ["model.hidden_size=32", "model.intermediate_size=64"]


def test_accelerate_launch_two_processes(tmp_path, wordpiece_800, capsys, caplog):
    """The two-process launch, then its resume by one process as ``main`` in this process (conftest
    ``run_in_process``)."""
    from tests.test_resume_run import free_port

    out = tmp_path / "ddp"
    # --multi_gpu selects accelerate's torchrun launcher; on a machine without GPUs the processes
    # meet over gloo on the CPU (--cpu would start one process).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "hf_streamlm.run",
           *[a for a in SHORT if not a.startswith("scheduler.total_steps")], "scheduler.total_steps=10",
           "runtime.checkpoint.every_n_steps=10", "runtime.evaluation.every_n_steps=10", f"tokenizer.path={wordpiece_800}",
           *SMALL_MODEL, f"runtime.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [5, 10]
    assert train[0]["tokens"] == 2 * 5 * 16 * 128  # both ranks' tokens are counted
    ckpt = out / "checkpoints" / "step-10"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert (out / "export" / "model.safetensors").is_file()
    # Resumed by one process (elastic resume, issue #17): both ranks' stream positions are taken over and the
    # global batch is kept by doubling gradient accumulation.
    out_text = run_in_process_stdout(capsys, *SHORT, "scheduler.total_steps=12", f"tokenizer.path={wordpiece_800}",
                                     *SMALL_MODEL, f"runtime.output_dir={out}")
    assert "resumed 2x0 -> 1x0" in out_text
    assert "data.gradient_accumulation_steps 1 -> 2" in caplog.text


def test_precision_auto_takes_the_launchers_choice(tmp_path, wordpiece_800):
    """runtime.precision=auto: `accelerate launch --mixed_precision bf16` decides, and the run's
    config.yaml records the resolved value; without a launcher it is fp32."""
    out = tmp_path / "auto"
    args = [*[a for a in SHORT if not a.startswith("scheduler.total_steps")], "scheduler.total_steps=4",
            "runtime.checkpoint.every_n_steps=4", "runtime.evaluation.every_n_steps=4", "runtime.precision=auto",
            "model.num_layers=1", "data.batch_size=4", "runtime.demo_sentences=[]", f"tokenizer.path={wordpiece_800}"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "hf_streamlm.run", *args,
           f"runtime.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["runtime"]["precision"] == "bf16"
    run_in_process(*args, f"runtime.output_dir={tmp_path / 'plain'}")  # main in this process: no launcher
    assert yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())["runtime"]["precision"] == "fp32"
