"""`hf-streamlm plan`: the traced step on fake tensors against the same step run for real on the CPU (both families,
one process, FSDP2 and ZeRO layouts), every shipped recipe planned, the engines' partitioning, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import hf_streamlm.models  # noqa: F401  (the families registered with the Auto classes)
from hf_streamlm import cli
from hf_streamlm.config import ConfigError, available_recipes, load_config
from hf_streamlm.plan import Layout, make_plan, rank_memory, read_layout
from hf_streamlm.plan.engines import parameter_bytes, zero_states
from hf_streamlm.plan.gpus import MFU_ANCHORS
from hf_streamlm.plan.planner import what_to_change
from hf_streamlm.plan.trace import StepSpec, trace_step

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.01
"""Fake against real storage peak: the same operators allocate the same storages, so they agree to within the
few scalars a fake tensor does not hold; 1% leaves room for nothing else."""

TINY = {
    "decoder": ["recipe=quickstart_decoder", "model.hidden_size=64", "model.num_layers=2", "tokenizer.vocab_size=600",
                "data.batch_size=4", "data.sequence_length=64", "data.gradient_accumulation_steps=2",
                "runtime.precision=bf16"],
    "microbert": ["recipe=quickstart", "model.hidden_size=64", "model.num_layers=2", "tokenizer.vocab_size=600",
                  "data.batch_size=4", "data.sequence_length=64", "data.gradient_accumulation_steps=2",
                  "runtime.precision=bf16"],
}
LAYOUTS = {"one process": StepSpec("single", "bf16"), "FSDP2 over 2": StepSpec("fsdp2", "bf16", world_size=2),
           "ZeRO 16-bit module": StepSpec("zero", "bf16")}


def traced(overrides: list[str], spec: StepSpec, fake: bool):
    config = load_config(overrides)
    return trace_step(config, config.tokenizer.vocab_size, spec, fake=fake)


@pytest.mark.parametrize("family, layout", [("decoder", "one process"), ("decoder", "FSDP2 over 2"),
                                            ("decoder", "ZeRO 16-bit module"), ("microbert", "one process"),
                                            ("microbert", "ZeRO 16-bit module")])
def test_fake_trace_matches_the_real_step_on_the_cpu(family, layout):
    """The step traced on fake tensors holds the storage the same step holds when it runs for real (MemTracker in
    real mode; FSDP2's collectives in a fake process group, the shards real), peak and breakdown, within TOLERANCE;
    a real step at twice the micro-batch is well outside it, so the comparison can fail."""
    spec = LAYOUTS[layout]
    fake, real = traced(TINY[family], spec, True), traced(TINY[family], spec, False)
    assert fake.fake and not real.fake
    assert fake.peak == pytest.approx(real.peak, rel=TOLERANCE), (fake.parts, real.parts)
    for part, size in real.parts.items():
        assert fake.parts[part] == pytest.approx(size, rel=TOLERANCE, abs=4096), (part, fake.parts, real.parts)
    assert fake.activation_peak == pytest.approx(real.activation_peak, rel=TOLERANCE)
    assert fake.attention_kernels == real.attention_kernels
    assert any("flash_attention" in k for k in real.attention_kernels)  # the fused kernel: no T x T scores
    bigger = traced([*TINY[family], "data.batch_size=8"], spec, False)
    assert bigger.peak > real.peak * (1 + 5 * TOLERANCE)


def test_fsdp2_refuses_microbert_as_accelerate_would():
    """MicroBERT's embeddings are a unit of their own (_no_split_modules) and tied to the MLM head, which accelerate's
    FSDP2 preparation shards in another unit: the plan says so instead of a figure."""
    with pytest.raises(ConfigError, match="FSDP2 as accelerate applies it"):
        traced(TINY["microbert"], LAYOUTS["FSDP2 over 2"], True)


def test_every_shipped_recipe_is_planned():
    """`plan` of each recipe in recipes/ on one H100 traces its step (the 1B ones included) and gives a peak made
    of its parts, its headroom, speed and time (about 20 s: four of them are the 1B decoder)."""
    for name in available_recipes():
        plan = make_plan([f"recipe={name}"], suggest=False)
        assert plan["fake"] and plan["peak"] == sum(plan["parts"].values()) > 0, name
        assert plan["headroom"] == plan["gpu_memory"] - plan["reserved"] - plan["peak"], name
        assert not plan["scores_materialized"] and plan["fits"] == (plan["headroom"] >= 0), name
        if plan["precision"] != "fp32":
            assert plan["speed"]["tokens_per_s"] > 0 and "anchor" in plan["speed"]["mfu_source"], name


def test_runpod_1b_on_8_h100_under_each_shipped_sharded_config():
    """runpod_1b per GPU under the shipped ZeRO-2 and FSDP2 configs: the model states are divided by 8 (ZeRO-2 keeps
    the 16-bit weights whole; FSDP2 shards them), the activations are the micro-batch's, the same either way."""
    zero2 = make_plan(["recipe=runpod_1b"], config_file=str(ROOT / "accelerate_configs/deepspeed_zero2.yaml"),
                      suggest=False)
    fsdp2 = make_plan(["recipe=runpod_1b"], config_file=str(ROOT / "accelerate_configs/fsdp2_8gpu.yaml"),
                      suggest=False)
    n = 1_114_359_808
    assert zero2["gpus"] == fsdp2["gpus"] == 8 and zero2["fits"] and fsdp2["fits"]
    assert zero2["parts"]["optimizer"] == 8 * n // 8
    assert zero2["parts"]["communication"] == 2 * 500_000_000  # DeepSpeed's default reduce bucket, 16-bit
    assert fsdp2["parts"]["optimizer"] == pytest.approx(8 * n / 8, rel=0.01)  # fp32 moments of 1/8 of each tensor
    assert zero2["speed"]["steps"] == 300_000 and zero2["speed"]["tokens_per_step"] == 2 * 2048 * 32 * 8


def test_zero_states_follow_deepspeeds_own_estimators():
    """Per-rank ZeRO-2/3 model states sum to what DeepSpeed's estimate_zero{2,3}_model_states_mem_needs give for the
    same parameter counts, with and without offload."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from hf_streamlm.train.builders import meta_model

    config = load_config(["recipe=runpod_1b"])
    n, largest = parameter_bytes(meta_model(config.model, 50_000))
    assert n == 1_114_359_808 and largest == 50_000 * 2048  # the tied embedding is the largest layer
    for offload in (False, True):
        _, gpu2 = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=8, cpu_offload=offload)
        layout = Layout("zero", 8, "bf16", 2, offload_optimizer=offload)
        assert sum(zero_states(n, largest, layout).values()) == pytest.approx(gpu2, abs=8)
        _, gpu3, _ = estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=8, cpu_offload=offload,
                                                           cpu_offload_params=offload)
        layout = Layout("zero", 8, "bf16", 3, offload_optimizer=offload, offload_params=offload)
        assert sum(zero_states(n, largest, layout).values()) == pytest.approx(gpu3, abs=8)


def test_shipped_accelerate_configs_read_as_their_engines():
    expected = {"single_gpu.yaml": ("single", 1), "ddp_8gpu.yaml": ("ddp", 8), "deepspeed_zero2.yaml": ("zero", 8),
                "deepspeed_zero3.yaml": ("zero", 8), "deepspeed_zero3_offload.yaml": ("zero", 8),
                "fsdp2_8gpu.yaml": ("fsdp2", 8), "multinode_deepspeed.yaml": ("zero", 16)}
    for name, (engine, n) in expected.items():
        layout = read_layout(ROOT / "accelerate_configs" / name)
        assert (layout.engine, layout.processes) == (engine, n), name
    assert read_layout(ROOT / "accelerate_configs/deepspeed_zero3_offload.yaml").offload_params
    assert read_layout(ROOT / "accelerate_configs/ddp_8gpu.yaml", gpus=4).processes == 4


def test_what_to_change_traces_each_change():
    """Under a budget the recipe misses, every suggestion is traced again: checkpointing and a smaller micro-batch
    (accumulation raised to keep the tokens per step) lower the peak, and the first micro-batch that fits is given."""
    overrides = TINY["decoder"]
    layout = Layout("ddp", 2, "bf16")
    peak = rank_memory(load_config(overrides), layout).peak
    changes = what_to_change(overrides, layout, int(peak * 0.9), 1.0)
    by_name = {c.what.split(" (")[0]: c for c in changes}
    assert by_name["model.gradient_checkpointing=true"].peak < peak
    smaller = next(c for c in changes if c.what.startswith("data.batch_size="))
    assert smaller.fits and smaller.peak < peak * 0.9 and "data.gradient_accumulation_steps=" in smaller.what
    assert any(c.what.startswith("--config accelerate_configs/fsdp2_8gpu.yaml") for c in changes)
    assert all(c.peak > 0 for c in changes)


def test_calibration_file_sets_the_mfu_and_the_memory_ratio(tmp_path):
    file = tmp_path / "cal.json"
    file.write_text(json.dumps({"gpus": {"h100-80gb": {"mfu": 0.5, "memory_ratio": 1.1, "source": "test"}}}))
    plan = make_plan(TINY["decoder"], calibration=str(file), price=2.0, suggest=False)
    assert plan["speed"]["mfu"] == 0.5 and plan["speed"]["mfu_source"] == "measured: test"
    assert plan["peak"] == int(plan["traced_peak"] * 1.1)
    assert plan["speed"]["cost"] == pytest.approx(plan["speed"]["gpu_hours"] * 2.0)


def test_mfu_anchors_are_the_ones_docs_list():
    """docs/performance.md#mfu-anchors shows the anchors the code uses, GPU by GPU."""
    text = (ROOT / "docs/performance.md").read_text()
    section = text.split("## MFU anchors", 1)[1].split("\n## ", 1)[0]
    for name, (mfu, _) in MFU_ANCHORS.items():
        assert re.search(rf"\| `{re.escape(name)}` \| {mfu:.2%}".replace("%", r"\%"), section), name


def test_plan_command_prints_the_plan_and_refuses_bad_input(capsys):
    assert cli.main(["plan", *TINY["decoder"], "--config", str(ROOT / "accelerate_configs/fsdp2_8gpu.yaml"),
                     "--price-per-gpu-hour", "2.5", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"] == "FSDP2" and plan["gpus"] == 8 and plan["speed"]["cost"] > 0
    assert cli.main(["plan", *TINY["decoder"], "--gpu", "a100-40gb"]) == 0
    text = capsys.readouterr().out
    assert "per GPU" in text and "headroom" in text and "fits" in text and "anchor, not measured here" in text
    for args, message in [(["plan", "recipe=quickstart", "--config", "nowhere.yaml"], "--config nowhere.yaml: no such"),
                          (["plan", "recipe=quickstart", "--gpu", "v100"], "--gpu: invalid choice: 'v100'"),
                          (["plan", "recipe=quickstart", "--gpus", "0"], "--gpus takes a positive number"),
                          (["plan"], "plan needs a recipe"),
                          (["plan", "recipe=quickstart", "--price-per-gpu-hour", "free"], "takes a price"),
                          (["plan", "recipe=quickstart_decoder", "optimizer.algorithm=muon", "--config",
                            str(ROOT / "accelerate_configs/deepspeed_zero2.yaml")], "muon needs whole weight matrices")]:
        with pytest.raises(SystemExit) as exited:
            cli.main(args)
        err = capsys.readouterr().err
        assert exited.value.code == 2 and message in err and "Traceback" not in err, (args, err)


def test_gpu_check_results_become_the_calibration_plan_reads(tmp_path, monkeypatch):
    """bench_gpu.py's gpu.json -> python -m hf_streamlm.plan.calibrate -> plan_calibration.json -> plan: the measured
    MFU, and the measured peak over the traced peak of the same step as the memory ratio."""
    from hf_streamlm.plan import calibrate

    row = {"variant": calibrate.RECIPE_ROW, "batch_size": 4, "mfu": 0.4611, "peak_memory_gib": 0.01}
    entry = calibrate.calibration_entry({"device": "NVIDIA H100 80GB HBM3", "rows": [row]},
                                        recipe=str(ROOT / "recipes/quickstart_decoder.yaml"))
    traced = rank_memory(load_config(["recipe=quickstart_decoder", "data.batch_size=4",
                                      "data.gradient_accumulation_steps=1"]), read_layout(None, 1)).peak
    assert entry["mfu"] == 0.4611 and entry["memory_ratio"] == pytest.approx(0.01 * 2**30 / traced, rel=1e-3)
    results = tmp_path / "gpu.json"
    results.write_text(json.dumps({"device": "NVIDIA H200", "rows": [{**row, "peak_memory_gib": None}]}))
    monkeypatch.chdir(tmp_path)
    assert calibrate.main([str(results)]) == 0  # no peak measured: the MFU alone
    plan = make_plan(TINY["decoder"], gpu_name="h200-141gb", suggest=False)  # reads ./plan_calibration.json
    assert plan["speed"]["mfu"] == 0.4611 and plan["speed"]["mfu_source"].startswith("measured: bench_gpu.py on")
    assert plan["memory_ratio"] == 1.0
    assert calibrate.gpu_of("NVIDIA A100-SXM4-80GB") == "a100-80gb"
    assert calibrate.gpu_of("NVIDIA A100-SXM4-40GB") == "a100-40gb"
