"""lm-evaluation-harness on the decoder: in the training loop (``runtime.evaluation.tasks``, in the shared
``decoder_run``), through ``hf-streamlm eval PATH --tasks`` on the export and on a checkpoint, offline, on a
local task (a YAML over a JSONL, tests/conftest.py ``cloze_task``). The harness's log-likelihoods are checked
against the export's own, computed here with plain transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import CLOZE_TASK, REPO, copy_run
from tests.test_eval import GUARDED_EVAL

ACC = f"lm_eval/{CLOZE_TASK}/acc"

# The eval command in a process whose sockets refuse to connect (tests/test_eval.py): offline means no attempt.
GUARDED = GUARDED_EVAL


def by_hand(export, items: list[dict]) -> list[list[float]]:
    """Sum of log-probabilities of each choice (" " + choice) after its context, as lm_eval defines them
    (context and context+continuation encoded whole, the continuation's tokens the difference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    scores = []
    for item in items:
        row = []
        context = tokenizer(item["context"], add_special_tokens=False)["input_ids"]
        for choice in item["choices"]:
            whole = tokenizer(item["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            row.append(sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        scores.append(row)
    return scores


def eval_cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", GUARDED, "eval", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def test_harness_scores_the_export_with_its_own_loglikelihoods(decoder_run, cloze_task):
    from hf_streamlm.evaluation import run_harness

    export = decoder_run / "export"
    out = run_harness(export, None, [CLOZE_TASK], cloze_task, "cpu", log_samples=True)
    items = [json.loads(line) for line in (cloze_task / "cloze.jsonl").read_text().splitlines()]
    expected = by_hand(export, items)
    samples = sorted(out["raw"]["samples"][CLOZE_TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(items) == out["samples"][CLOZE_TASK] == 40
    for sample, row in zip(samples, expected):
        harness = [resp[0][0] for resp in sample["resps"]]
        assert harness == pytest.approx(row, abs=1e-4), sample["doc_id"]
    accuracy = sum(max(range(4), key=row.__getitem__) == item["label"] for row, item in zip(expected, items)) / 40
    print(f"lm-evaluation-harness acc on the 4-step decoder export: {out['results'][ACC]:.3f} (chance 0.25)")
    assert out["results"][ACC] == pytest.approx(accuracy)


def test_tasks_in_the_loop_and_from_the_command_line(decoder_run, cloze_task, tmp_path, capsys):
    # In the loop: every runtime.evaluation.every_n_steps (2) and at the end (4), in history and checkpoint state.
    rows = [json.loads(line) for line in (decoder_run / "history.jsonl").read_text().splitlines()]
    in_loop = {row["step"]: row[ACC] for row in rows if ACC in row}
    assert sorted(in_loop) == [2, 4] and all(0 <= v <= 1 for v in in_loop.values())
    state = json.loads((decoder_run / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["lm_eval"]["results"][ACC] == in_loop[4] and state["lm_eval"]["samples"] == {CLOZE_TASK: 40}
    card = (decoder_run / "export" / "README.md").read_text()
    assert "## Downstream evaluation (lm-evaluation-harness at step 4)" in card

    # The command on a copy of the run: the run directory means its export, loaded by lm_eval from disk as
    # a stock Llama; the loop scored the project's model object at step 4: the same function.
    run = copy_run(decoder_run, tmp_path)
    proc = eval_cli(str(run), "--tasks", CLOZE_TASK, "--include-path", str(cloze_task),
                    "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NETWORK_ATTEMPTS []" in proc.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["kind"] == "export" and result["step"] == 4 and result["samples"] == {CLOZE_TASK: 40}
    assert result[ACC] == pytest.approx(in_loop[4])
    assert [ACC, f"{result[ACC]:.4f}", "(40", "samples)"] in [line.split() for line in proc.stdout.splitlines()]
    last = json.loads((run / "history.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last[ACC] == result[ACC] and last["lm_eval_model"] == str(run / "export")
    card = (run / "export" / "README.md").read_text()
    assert card.count("## Downstream evaluation") == 1 and f"| {CLOZE_TASK} | acc | {result[ACC]:.4f} ±" in card

    # A checkpoint (in this process: lm_eval is imported already): its own step in the run's history; the
    # export's card is not about it.
    from hf_streamlm.cli import main

    capsys.readouterr()
    assert main(["eval", str(run / "checkpoints" / "step-2"), "--tasks", CLOZE_TASK, "--include-path",
                 str(cloze_task), "--limit", "8"]) == 0
    last = json.loads((run / "history.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and last["lm_eval_model"] == str(run / "checkpoints" / "step-2")
    assert (run / "export" / "README.md").read_text() == card
    assert "(8 samples)" in capsys.readouterr().out


def test_tasks_bad_input_is_one_line(mlm_run, decoder_run, cloze_task, tmp_path, capsys, monkeypatch):
    from hf_streamlm.cli import main

    def run(*args: str) -> tuple[int, str]:
        try:
            rc = main(["eval", *args])
        except SystemExit as exit:
            rc = exit.code
        return rc, capsys.readouterr().err

    export = str(decoder_run / "export")
    cases = [
        ([str(mlm_run / "export"), "--tasks", CLOZE_TASK], "lm-evaluation-harness scores causal LMs"),
        ([export, "--tasks", "no_such_task", "--include-path", str(cloze_task)], "unknown lm-evaluation-harness task"),
        ([export, "--tasks", CLOZE_TASK, "--include-path", str(tmp_path / "nope")], "is not a folder"),
        ([export, "--tasks"], "--tasks needs task names"),
        ([export, "--include-path", str(cloze_task)], "go with --tasks"),
        ([export, "--tasks", CLOZE_TASK, "--limit", "0"], "--limit takes a positive number"),
        ([export, "--tasks", CLOZE_TASK, "data.batch_size=2"], "drop them or drop --tasks"),
    ]
    for args, message in cases:
        rc, err = run(*args)
        assert rc == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    rc, err = run(export, "--tasks", CLOZE_TASK)
    assert rc == 2 and "pip install 'hf_streamlm[eval]'" in err and len(err.strip().splitlines()) == 1


def test_loop_tasks_are_refused_for_microbert_and_checked_before_training(tmp_path, cloze_task):
    from types import SimpleNamespace

    from hf_streamlm.config import ConfigError, load_config
    from hf_streamlm.evaluation import check_loop_tasks

    with pytest.raises(ConfigError, match="applies to model.type=decoder"):
        load_config(["recipe=quickstart", "runtime.evaluation.tasks=[hellaswag]"])
    # What the loop checks before the tokenizer is trained (train/loop.py), on a stand-in for the accelerator.
    main = SimpleNamespace(is_main_process=True, state=SimpleNamespace(deepspeed_plugin=None))
    config = load_config(["recipe=quickstart_decoder", f"runtime.evaluation.tasks=[{CLOZE_TASK}]",
                          f"runtime.evaluation.tasks_include_path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="'runtime.evaluation.tasks_include_path' '.*nope' is not a folder"):
        check_loop_tasks(config, main)
    config.runtime.evaluation.tasks_include_path = str(cloze_task)
    check_loop_tasks(config, main)
    zero3 = SimpleNamespace(is_main_process=True, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    with pytest.raises(ConfigError, match="ZeRO-3"):
        check_loop_tasks(config, zero3)
