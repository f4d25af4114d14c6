"""``optimizer.algorithm: muon``: ``torch.optim.Muon`` for the weights of the blocks' linear layers, AdamW for the
rest, held as one optimizer (``MuonWithAdamW``) by accelerate, the scheduler and the checkpoint. The split is
checked on both model families, the combined step against the two torch optimizers stepped by hand, and real runs
against their own resumes: one process (``main`` in the test process, conftest ``run_in_process``) and a two-process
``accelerate launch`` (DDP over gloo). The refusal under DeepSpeed ZeRO is in tests/test_deepspeed.py."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from hf_streamlm.config import ConfigError, load_config
from hf_streamlm.train.builders import (
    MuonWithAdamW,
    build_optimizer,
    build_scheduler,
    check_optimizer_engine,
    hf_model_config,
)
from tests.conftest import main_refuses, run_in_process


def model_of(recipe: str, *overrides: str):
    config = load_config([f"recipe={recipe}", "optimizer.algorithm=muon", "model.hidden_size=32",
                          "model.intermediate_size=64", "model.num_layers=2", *overrides])
    auto = AutoModelForMaskedLM if config.model.type == "microbert" else AutoModelForCausalLM
    torch.manual_seed(0)
    return auto.from_config(hf_model_config(config.model, 300)), config


def names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("tied", [True, False])
def test_muon_trains_the_blocks_matrices_and_adamw_the_rest_decoder(tied):
    model, config = model_of("quickstart_decoder", f"model.tie_word_embeddings={str(tied).lower()}")
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW)
    muon = names(model, optimizer.muon.param_groups[0]["params"])
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert muon == {n for n, _ in model.named_parameters() if n.endswith(tuple(f"{p}.weight" for p in projections))}
    assert len(muon) == 2 * len(projections)
    decay, no_decay = (names(model, g["params"]) for g in optimizer.adamw.param_groups)
    assert decay == {"model.embed_tokens.weight"} | (set() if tied else {"lm_head.weight"})
    assert no_decay and all("norm" in n for n in no_decay)
    assert muon | decay | no_decay == {n for n, _ in model.named_parameters()}  # every parameter, once
    assert optimizer.param_groups == [*optimizer.muon.param_groups, *optimizer.adamw.param_groups]


def test_muon_trains_the_blocks_matrices_and_adamw_the_rest_microbert():
    model, config = model_of("quickstart")
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    muon = names(model, optimizer.muon.param_groups[0]["params"])
    linears = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    head = id(model.get_output_embeddings().weight)  # the recipe's tier: modern (decoder); classic: cls.predictions
    assert muon == names(model, [p for p in model.parameters() if id(p) in linears - {head}])
    assert muon and not any("embeddings" in n for n in muon)  # the head's weight is the word embeddings
    adamw = set().union(*(names(model, g["params"]) for g in optimizer.adamw.param_groups))
    assert muon | adamw == {n for n, _ in model.named_parameters()} and not muon & adamw


def test_adam_w_stays_one_torch_adamw():
    model, config = model_of("quickstart_decoder", "optimizer.algorithm=adam_w")
    assert type(build_optimizer(model, config, torch.device("cpu"))) is torch.optim.AdamW


def test_the_combined_step_is_the_two_torch_optimizers_under_one_schedule():
    """Three steps of the combined optimizer under the recipe's schedule, its state saved after the second and
    loaded into a fresh one for the third, against torch's Muon and AdamW stepped by hand at the same rates: the
    same parameters, bit for bit."""
    model, config = model_of("quickstart_decoder", "scheduler.warmup_steps=1", "scheduler.total_steps=3",
                             "scheduler.min_lr=0", "optimizer.learning_rate=0.01")
    by_hand = copy.deepcopy(model)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, config, 3)
    o = config.optimizer
    muon_ids = {id(p) for p in optimizer.muon.param_groups[0]["params"]}
    hand = dict(by_hand.named_parameters())
    own = {id(p): n for n, p in model.named_parameters()}
    muon = torch.optim.Muon([hand[own[id(p)]] for p in model.parameters() if id(p) in muon_ids], lr=0.01,
                            weight_decay=o.weight_decay, momentum=o.muon_momentum, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [hand[own[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
                               for g in optimizer.adamw.param_groups], lr=0.01, betas=(o.beta1, o.beta2), eps=o.epsilon)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    for step in range(3):
        if step == 2:  # a resume as accelerate's load_state does it: both built afresh, then both states loaded
            saved, saved_schedule = copy.deepcopy(optimizer.state_dict()), scheduler.state_dict()
            optimizer = build_optimizer(model, config, torch.device("cpu"))
            scheduler = build_scheduler(optimizer, config, 3)
            optimizer.load_state_dict(saved)
            scheduler.load_state_dict(saved_schedule)
        rate = optimizer.param_groups[0]["lr"]
        assert {g["lr"] for g in optimizer.param_groups} == {rate} and rate == [0.0, 0.01, 0.005][step]
        for net, opt in ((model, optimizer), (by_hand, None)):
            net(input_ids=ids, labels=ids).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad()
        for opt in (muon, adamw):
            for group in opt.param_groups:
                group["lr"] = rate
            opt.step()
            opt.zero_grad()
        scheduler.step()
    for (name, a), b in zip(model.named_parameters(), by_hand.parameters()):
        assert torch.equal(a, b), name
    assert set(optimizer.state_dict()) == {"muon", "adamw"}
    assert all("momentum_buffer" in s for s in optimizer.state_dict()["muon"]["state"].values())


@pytest.mark.parametrize("engine", ["DEEPSPEED", "FSDP"])
def test_muon_is_refused_where_matrices_are_sharded(engine):
    config = load_config(["recipe=quickstart_decoder", "optimizer.algorithm=muon"])
    with pytest.raises(ConfigError, match="optimizer.algorithm=muon needs whole weight matrices") as err:
        check_optimizer_engine(config, engine)
    assert "\n" not in str(err.value)
    for fine in ("NO", "MULTI_GPU", "MULTI_CPU"):
        check_optimizer_engine(config, fine)


def test_muon_momentum_outside_0_1_is_one_line():
    with pytest.raises(ConfigError, match=r"'optimizer.muon_momentum' must be in \[0, 1\), got 1.5"):
        load_config(["recipe=quickstart_decoder", "optimizer.muon_momentum=1.5"])


TINY = ["recipe=quickstart_decoder", "optimizer.algorithm=muon", "scheduler.total_steps=8", "scheduler.warmup_steps=1",
        "runtime.log_every_n_steps=1", "runtime.checkpoint.every_n_steps=4", "runtime.checkpoint.max_keep=5",
        "runtime.evaluation.every_n_steps=null", "runtime.logging.progress_bar=false",
        "runtime.logging.tensorboard=false", "runtime.demo_sentences=[]", "data.batch_size=4", "data.sequence_length=32",
        "data.shuffle_buffer_size=100", "model.hidden_size=64", "model.num_layers=1", "model.intermediate_size=128",
        "tokenizer.vocab_size=500"]


def losses(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def test_a_muon_run_resumes_exactly_and_refuses_another_optimizer(tmp_path, bpe_500, capsys, reset_accelerate):
    """A real run with Muon, resumed from its step-4 checkpoint: the same losses and gradient norms as its
    uninterrupted steps 5-8 (the momentum buffers came back). Resuming it with AdamW is refused in one line."""
    run = tmp_path / "run"
    args = [*TINY, f"tokenizer.path={bpe_500}", f"runtime.output_dir={run}"]
    run_in_process(*args)
    full = losses(run)
    assert [s for s, _, _ in full] == list(range(1, 9)) and full[-1][1] < full[0][1]
    saved = torch.load(run / "checkpoints" / "step-4" / "optimizer.bin", weights_only=False)
    assert set(saved) == {"muon", "adamw"} and saved["muon"]["state"]

    err = main_refuses([*args, "optimizer.algorithm=adam_w", f"runtime.resume={run / 'checkpoints' / 'step-4'}"],
                       capsys, 2)
    assert "optimizer.algorithm differs from the checkpoint's ('muon' -> 'adam_w')" in err, err

    run_in_process(*args, f"runtime.resume={run / 'checkpoints' / 'step-4'}")
    assert losses(run) == full


def test_muon_under_a_two_process_launch_resumes_exactly(tmp_path, bpe_500):
    """DDP over gloo, two processes: each orthogonalises the same all-reduced gradients. A second launch resumed
    from the step-4 checkpoint logs the first launch's losses and gradient norms for steps 5-8, bit for bit."""
    import shutil

    from tests.test_resume_run import launch

    full = tmp_path / "full"
    args = [*TINY, f"tokenizer.path={bpe_500}", "data.batch_size=2"]
    proc = launch([*args, f"runtime.output_dir={full}"], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step-8", "export"))
    proc = launch([*args, f"runtime.output_dir={resumed}"], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-4" in proc.stdout
    assert losses(resumed) == losses(full) and len(losses(full)) == 8
