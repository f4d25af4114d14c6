"""Learning-rate schedules (``scheduler.strategy``), above all ``wsd``: warm-up, the peak rate held, then a decay to
``min_lr`` over the last ``decay_steps``. Its point in a streamed run is that the stable phase does not depend on the
run's length: a run resumed there with a larger ``total_steps`` trains exactly as a run planned that long, which a
real run shows here (``main`` in the test process, conftest ``run_in_process``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hf_streamlm.config import ConfigError, load_config
from hf_streamlm.train.builders import build_scheduler
from tests.conftest import main_refuses, run_in_process

PEAK, FLOOR = 1e-3, 1e-4


def lrs(strategy: str, total: int, *overrides: str) -> list[float]:
    """The learning rate of each optimizer step 1..total (the one the scheduler set before that step)."""
    config = load_config(["recipe=quickstart_decoder", f"scheduler.strategy={strategy}", f"scheduler.total_steps={total}",
                          f"optimizer.learning_rate={PEAK}", *overrides])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    scheduler = build_scheduler(optimizer, config, total)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def wsd(step: int, warmup: int, stable: int, decay: int, shape: str) -> float:
    """Warm-up from the floor (transformers' ``get_wsd_schedule``), the peak, then the decay; ``step`` counts
    from 0 (the first optimizer step's rate)."""
    if step < warmup:
        factor = step / warmup
    elif step < warmup + stable:
        factor = 1.0
    else:
        progress = (step - warmup - stable) / decay
        factor = {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                  "1-sqrt": 1 - math.sqrt(progress)}[shape]
    return FLOOR + (PEAK - FLOOR) * factor


@pytest.mark.parametrize("shape", ["1-sqrt", "linear", "cosine"])
def test_wsd_warms_up_holds_the_peak_then_decays_in_its_shape(shape):
    got = lrs("wsd", 40, "scheduler.warmup_steps=5", "scheduler.decay_steps=12", f"scheduler.decay_shape={shape}",
              f"scheduler.min_lr={FLOOR}")
    want = [wsd(i, 5, 23, 12, shape) for i in range(40)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got[5:28] == [PEAK] * 23 and got[28] == PEAK and got[-1] < got[29] < PEAK


def test_wsd_without_decay_steps_decays_over_the_last_fifth():
    got = lrs("wsd", 100, "scheduler.warmup_steps=10", "scheduler.min_lr=0")
    assert got[10:80] == [PEAK] * 70  # stable through step 80, then 20 steps of decay towards min_lr (0)
    assert got[80] == PEAK and got[81] < PEAK and got[-1] == pytest.approx(PEAK * (1 - math.sqrt(19 / 20)))


@pytest.mark.parametrize(("overrides", "message"), [
    (["scheduler.decay_steps=10"], "'scheduler.decay_steps' is for strategy wsd, not cosine_with_warmup"),
    (["scheduler.strategy=wsd", "scheduler.warmup_steps=50", "scheduler.decay_steps=60"],
     "'scheduler.warmup_steps' (50) + 'scheduler.decay_steps' (60) exceed the run's 100 steps"),
    (["scheduler.strategy=wsd", "scheduler.decay_steps=0"], "'scheduler.decay_steps'"),
    (["scheduler.strategy=wsd", "scheduler.decay_shape=exp"], "scheduler.decay_shape"),
])
def test_wsd_bad_input_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(["recipe=quickstart_decoder", "scheduler.total_steps=100", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_wsd_that_does_not_fit_a_token_budget_is_refused_by_the_run(tmp_path, bpe_500, capsys, reset_accelerate):
    """The run's length comes from scheduler.total_tokens here, known only once the batch shape is: the refusal
    comes from the run, as one line, before a step is trained."""
    err = main_refuses([*TINY, f"tokenizer.path={bpe_500}", "scheduler.total_tokens=1280", "scheduler.decay_steps=20",
                        f"runtime.output_dir={tmp_path / 'run'}"], capsys, 2)
    assert "'scheduler.decay_steps' (20) exceed the run's 10 steps" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


TINY = ["recipe=quickstart_decoder", "scheduler.strategy=wsd", "scheduler.warmup_steps=1", "scheduler.decay_steps=4",
        f"scheduler.min_lr={FLOOR}", f"optimizer.learning_rate={PEAK}", "runtime.log_every_n_steps=1",
        "runtime.checkpoint.every_n_steps=2", "runtime.checkpoint.max_keep=10", "runtime.evaluation.every_n_steps=null",
        "runtime.logging.progress_bar=false", "runtime.logging.tensorboard=false", "runtime.demo_sentences=[]",
        "data.batch_size=4", "data.sequence_length=32", "data.shuffle_buffer_size=100", "model.hidden_size=64",
        "model.num_layers=1", "model.intermediate_size=128", "tokenizer.vocab_size=500"]


def train_rows(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows if "loss" in r]


def test_a_wsd_run_extended_in_its_stable_phase_equals_one_planned_that_long(tmp_path, bpe_500):
    """A run planned for 8 steps (the peak through step 5, then 4 steps of decay) is taken back to its step-4
    checkpoint and resumed with total_steps=12: every loss and learning rate equals those of a run planned for 12
    steps from the start, bit for bit. Without the resume, its steps 5-8 decayed."""
    args = [*TINY, f"tokenizer.path={bpe_500}"]
    planned, short = tmp_path / "planned", tmp_path / "short"
    run_in_process(*args, "scheduler.total_steps=12", f"runtime.output_dir={planned}")
    run_in_process(*args, "scheduler.total_steps=8", f"runtime.output_dir={short}")
    reference = train_rows(planned)
    assert [step for step, _, _ in reference] == list(range(1, 13))
    # A row's lr is the one set for the next step. Steps 1-5 trained at the same rates (the warm-up, then the peak):
    # the losses of steps 1-6 are equal. The short run's decay began at step 6: its step 7 differs.
    decayed = train_rows(short)
    assert [loss for _, loss, _ in decayed[:6]] == [loss for _, loss, _ in reference[:6]]
    assert decayed[:4] == reference[:4] and decayed[3][2] == PEAK
    assert decayed[7][2] < decayed[6][2] < decayed[5][2] < decayed[4][2] < PEAK == reference[4][2] == reference[7][2]
    assert decayed[6][1] != reference[6][1]

    run_in_process(*args, "scheduler.total_steps=12", f"runtime.resume={short / 'checkpoints' / 'step-4'}",
                   f"runtime.output_dir={short}")
    assert train_rows(short) == reference
