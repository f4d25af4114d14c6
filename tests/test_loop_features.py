"""The loop's smaller duties, each shown by a real run: a token budget sets the length, best/ keeps
the best checkpoints by eval loss (hard links when the step was saved anyway), MFU is logged when the
peak is known, the model card carries the final figures and the command, and NaN/inf losses are
skipped or stop the run with the last good state saved (runtime.on_nonfinite). The runs are ``main`` in the
test process (conftest ``run_in_process``, ``main_refuses``): the entry point's own process is tests/test_run.py's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import main_refuses, run_in_process, checkpoints_of

TINY = ["recipe=quickstart_decoder", "scheduler.warmup_steps=1", "runtime.logging.progress_bar=false",
        "runtime.demo_sentences=[]", "data.batch_size=4", "data.sequence_length=32", "data.shuffle_buffer_size=100",
        "model.hidden_size=64", "model.num_layers=1", "model.intermediate_size=128", "tokenizer.vocab_size=500"]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, bpe_500) -> Path:
    run = tmp_path_factory.mktemp("loop") / "budget"
    run_in_process(*TINY, f"tokenizer.path={bpe_500}", "scheduler.total_tokens=5000", "runtime.log_every_n_steps=4",
                   "runtime.evaluation.every_n_steps=4", "runtime.evaluation.max_batches=2",
                   "runtime.checkpoint.every_n_steps=8", "runtime.checkpoint.max_keep=2",
                   "runtime.evaluation.best.max_keep=2", "runtime.logging.peak_tflops=0.5", f"runtime.output_dir={run}")
    return run


def test_token_budget_sets_the_number_of_steps(budget_run):
    train = [r for r in rows(budget_run) if "loss" in r]
    steps = math.ceil(5000 / (4 * 32))  # batch x sequence x accumulation 1 x 1 process = 128 tokens/step
    assert train[-1]["step"] == steps == 40
    assert train[-1]["tokens"] == steps * 128
    assert state(budget_run / "checkpoints" / f"step-{steps}")["step"] == steps


def test_best_keeps_the_lowest_eval_losses(budget_run):
    evals = {r["step"]: r["eval_loss"] for r in rows(budget_run) if "eval_loss" in r}
    assert len(evals) == 10
    best_two = sorted(evals, key=evals.get)[:2]
    kept = sorted(int(p.name.split("-")[1]) for p in (budget_run / "best").iterdir())
    assert kept == sorted(best_two)
    for step in kept:
        saved = state(budget_run / "best" / f"step-{step}")
        assert saved["eval"]["eval_loss"] == pytest.approx(evals[step], rel=1e-12)
        assert (budget_run / "best" / f"step-{step}" / "model.safetensors").is_file()
    # A best step that was also a regular checkpoint step shares its files (hard links, no second write).
    for step in set(kept) & {int(p.name.split("-")[1]) for p in checkpoints_of(budget_run)}:
        a = (budget_run / "best" / f"step-{step}" / "model.safetensors").stat()
        b = (budget_run / "checkpoints" / f"step-{step}" / "model.safetensors").stat()
        assert a.st_ino == b.st_ino


def test_mfu_is_logged_against_the_given_peak(budget_run):
    from hf_streamlm.config import load_config
    from hf_streamlm.train.builders import estimate

    config = load_config(["recipe=" + str(budget_run / "config.yaml")])
    vocab = json.loads((budget_run / "export" / "config.json").read_text())["vocab_size"]
    flops = estimate(config.model, vocab, 32, 4)["flops_per_token"]
    for row in (r for r in rows(budget_run) if "loss" in r):
        assert row["mfu"] == pytest.approx(flops * row["tokens_per_s"] / 0.5e12, rel=1e-9)
        assert row["nonfinite_skips"] == 0 and 0 <= row["data_wait_pct"] < 100


def test_model_card_has_final_figures_and_command(budget_run):
    card = (budget_run / "export" / "README.md").read_text()
    last_eval = [r for r in rows(budget_run) if "eval_loss" in r][-1]
    assert f"| loss | {last_eval['eval_loss']:.4f} |" in card
    assert f"| perplexity | {last_eval['eval_perplexity']:.4f} |" in card
    assert "40 optimizer steps, 5,120 tokens seen" in card
    assert "python -m hf_streamlm.run recipe=quickstart_decoder" in card and "scheduler.total_tokens=5000" in card
    assert "  - pydocs" in card


def test_export_command_writes_the_same_card_from_a_checkpoint(budget_run, tmp_path):
    from hf_streamlm.cli import main

    assert main(["export", str(budget_run / "checkpoints" / "step-40"), "--output", str(tmp_path / "exp")]) == 0
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "scheduler.total_tokens=5000" in card and "5,120 tokens seen" in card


# ---------------------------------------------------------------------------------------------- NaN/inf

# A learning rate of 1e30 makes the first update put weights near 1e30; the next forward overflows to
# inf and the loss is NaN on every later step: a real divergence, not an injected one.
DIVERGE = [*TINY, "optimizer.learning_rate=1e30", "optimizer.max_grad_norm=null", "scheduler.strategy=constant",
           "scheduler.warmup_steps=0", "scheduler.total_steps=30", "runtime.log_every_n_steps=1",
           "runtime.checkpoint.every_n_steps=1", "runtime.checkpoint.max_keep=10", "runtime.evaluation.every_n_steps=null"]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def test_nonfinite_stop_saves_the_last_good_state_and_exits_3(tmp_path, bpe_500, capfd, reset_accelerate):
    run = tmp_path / "run"
    err = main_refuses([*DIVERGE, f"tokenizer.path={bpe_500}", "runtime.on_nonfinite=stop",
                        f"runtime.output_dir={run}"], capfd, code=3)  # no traceback either
    message = [line for line in err.splitlines() if line.startswith("hf-streamlm: error:")]
    assert len(message) == 1 and "non-finite loss or gradient norm at step 2" in message[0]
    assert sorted(p.name for p in checkpoints_of(run)) == ["step-1"]
    good = weights(run / "checkpoints" / "step-1")
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not (run / "export").exists()


def test_nonfinite_skip_counts_steps_without_updating_then_stops_after_the_limit(tmp_path, bpe_500, capfd, caplog,
                                                                                 reset_accelerate):
    run = tmp_path / "run"
    err = main_refuses([*DIVERGE, f"tokenizer.path={bpe_500}", "runtime.on_nonfinite=skip",
                        "runtime.max_nonfinite_skips=4", f"runtime.output_dir={run}"], capfd, code=3)
    assert "after 4 skipped steps in a row" in err
    assert caplog.text.count("update skipped") == 3  # steps 2-4 logged as skipped; the 4th in a row stops
    train = [r for r in rows(run) if "loss" in r]
    assert [r["nonfinite_skips"] for r in train] == [0, 1, 2, 3]
    assert math.isfinite(train[0]["loss"]) and math.isfinite(train[0]["grad_norm"])
    assert not any(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train[1:])
    # Skipped steps leave the weights exactly as the last good step left them.
    after_1 = weights(run / "checkpoints" / "step-1")
    for step in (2, 3, 4):
        later = weights(run / "checkpoints" / f"step-{step}")
        assert all(torch.equal(after_1[k], later[k]) for k in after_1), step


def test_z_loss_is_logged_apart_and_the_logged_loss_stays_the_cross_entropy(tmp_path, bpe_500):
    """model.z_loss: the rows carry its term as ``z_loss``; their ``loss`` is the cross entropy, which at step 1 (the
    same weights and batch) equals the one a run without z-loss logs."""
    common = [*TINY, f"tokenizer.path={bpe_500}", "scheduler.total_steps=2", "runtime.log_every_n_steps=1",
              "runtime.evaluation.every_n_steps=null", "runtime.logging.tensorboard=false"]
    run_in_process(*common, "model.z_loss=1e-3", f"runtime.output_dir={tmp_path / 'z'}")
    run_in_process(*common, f"runtime.output_dir={tmp_path / 'plain'}")
    with_z, plain = ([r for r in rows(tmp_path / name) if "loss" in r] for name in ("z", "plain"))
    assert [r["step"] for r in with_z] == [1, 2]
    assert all(0 < r["z_loss"] < 1e-3 * 100 for r in with_z)  # log(Z) of a 500-token vocabulary is ~6: ~0.04
    assert with_z[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)
    assert "z_loss" not in plain[0]


@pytest.mark.parametrize(("args", "message"), [
    (["recipe=quickstart_decoder", "model.z_loss=-1"], "'model.z_loss' must be >= 0"),
    (["recipe=quickstart", "model.z_loss=1e-4"], "'model.z_loss' is for model.type=decoder"),
])
def test_z_loss_bad_input_is_one_line(args, message):
    from hf_streamlm.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(args)
    assert message in str(err.value) and "\n" not in str(err.value)

