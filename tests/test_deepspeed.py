"""DeepSpeed ZeRO-2 and ZeRO-3 through the shipped ``accelerate_configs/deepspeed_zero*.yaml``, one CPU
process each (DeepSpeed's CPU accelerator, gloo): real ``accelerate launch`` runs that train with gradient
accumulation, checkpoint, resume exactly, and export the full trained weights (gathered from the ZeRO
shards), plus ``hf-streamlm export`` of a DeepSpeed checkpoint. ZeRO-2 trains MicroBERT, ZeRO-3 the
decoder (tied embeddings), so both families and both Auto classes are covered."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, checkpoints_of

CASES = {2: "quickstart", 3: "quickstart_decoder"}


def tiny(recipe: str, shards, tokenizer) -> list[str]:
    """8 optimizer steps of 2 micro-batches of 8 blocks of 64 tokens; checkpoints and evals at steps 4 and 8.
    A 2-layer model of width 32: the engine, its checkpoints and the gathered export do not depend on the
    size, and the recipe's model made each launch train several times longer. Stock Llama cannot keep
    attention inside documents, so the decoder trains without document masking: its native export then
    computes exactly what the trained model does. ``tokenizer``: one of the session's."""
    return [f"recipe={recipe}", f"data.sources=[{{path: json, data_files: '{shards}/part-*.jsonl'}}]",
            f"tokenizer.path={tokenizer}", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
            "model.max_position_embeddings=64", "data.sequence_length=64",
            "data.shuffle_buffer_size=300", "data.batch_size=8", "data.gradient_accumulation_steps=2",
            "data.document_masking=false", "scheduler.total_steps=8", "scheduler.warmup_steps=2",
            "runtime.log_every_n_steps=1", "runtime.checkpoint.every_n_steps=4", "runtime.checkpoint.max_keep=5",
            "runtime.evaluation.every_n_steps=4", "runtime.evaluation.max_batches=1",
            "runtime.logging.progress_bar=false", "runtime.demo_sentences=[]"]


def history(run) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("tokens")) for r in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(stage: int, args: list[str]) -> subprocess.CompletedProcess:
    """The shipped config as a user would run it, with one process instead of eight."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs" / f"deepspeed_zero{stage}.yaml"), "--num_processes", "1",
           "--main_process_port", str(free_port()), "-m", "hf_streamlm.run", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda s: f"zero{s}")
def runs(request, tmp_path_factory, shards, wordpiece_800, bpe_800):
    """An uninterrupted run, and the same run resumed from its step-4 checkpoint."""
    stage = request.param
    root = tmp_path_factory.mktemp(f"zero{stage}")
    args = tiny(CASES[stage], shards, wordpiece_800 if CASES[stage] == "quickstart" else bpe_800)
    full = root / "full"
    proc = launch(stage, args + [f"runtime.output_dir={full}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    resumed = root / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step-8", "export"))
    proc = launch(stage, args + [f"runtime.output_dir={resumed}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Resuming from" in proc.stdout and "step-4" in proc.stdout
    return stage, full, resumed


def test_deepspeed_ran_with_the_recipe_batch(runs):
    """DeepSpeed's engine state in the checkpoint: the ZeRO stage of the config, the recipe's micro batch and
    accumulation (train_batch_size = 8 x 2 x 1 process), and one engine step per loop step."""
    stage, full, _ = runs
    ckpt = full / "checkpoints" / "step-4"
    assert not (ckpt / "model.safetensors").exists()
    states = sorted((ckpt / "pytorch_model").glob("*model_states.pt"))
    assert states, sorted(p.name for p in (ckpt / "pytorch_model").iterdir())
    engine = torch.load(states[0], map_location="cpu", weights_only=False)
    ds = engine["ds_config"]
    assert ds["zero_optimization"]["stage"] == stage
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (8, 2, 16)
    assert ds["gradient_clipping"] == 1.0 and not ds["bf16"]["enabled"]  # optimizer.max_grad_norm; fp32 recipe
    assert (engine["global_steps"], engine["global_samples"]) == (4, 64)


def test_resumed_run_matches_uninterrupted_run(runs):
    _, full, resumed = runs
    assert history(resumed) == history(full)  # exact: same floats, same steps, same token counts
    losses = [r[1] for r in history(full) if r[1] is not None]
    assert len(losses) == 8 and losses[-1] < losses[0]


# A fresh process: stock transformers loads the run's export first; then ``hf-streamlm export`` (its main)
# exports the final DeepSpeed checkpoint, which loads too; the loop's own evaluation scores the run's export on
# the held-out blocks the run evaluated on, to compare with the eval loss the DeepSpeed engine logged.
CHECK_EXPORTS = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

run, cli_export, family = sys.argv[1], sys.argv[2], sys.argv[3]
auto = AutoModelForMaskedLM if family == "microbert" else AutoModelForCausalLM
exported = auto.from_pretrained(run + "/export").eval()

from types import SimpleNamespace
from transformers import AutoTokenizer
from hf_streamlm.cli import main
from hf_streamlm.config import load_config
from hf_streamlm.data import build_eval_blocks
from hf_streamlm.data.collate import make_collator
from hf_streamlm.evaluation import loop_eval

assert main(["export", run + "/checkpoints/step-8", "--output", cli_export]) == 0
from_checkpoint = auto.from_pretrained(cli_export).eval()
config = load_config([f"recipe={run}/config.yaml", "runtime.resume=never"])
tokenizer = AutoTokenizer.from_pretrained(run + "/export")
blocks = build_eval_blocks(config, tokenizer, config.runtime.evaluation.max_batches * config.data.batch_size)
collator = make_collator(config, tokenizer, seed=config.runtime.seed)
cpu = SimpleNamespace(device=torch.device("cpu"))
ids = torch.tensor([blocks[0]["input_ids"]])
with torch.no_grad():
    logits = [m(input_ids=ids).logits for m in (exported, from_checkpoint)]
result = {"eval_loss": loop_eval(exported, blocks, collator, config.data.batch_size, cpu)["eval_loss"],
          "classes": [type(m).__name__ for m in (exported, from_checkpoint)], "logits_equal": torch.equal(*logits)}
print(json.dumps(result))
"""


def test_export_holds_the_trained_weights(runs, tmp_path):
    """The run's export and ``hf-streamlm export`` of the final DeepSpeed checkpoint load in stock transformers
    and score the held-out blocks as the DeepSpeed engine did at the last step."""
    stage, full, _ = runs
    family = "microbert" if CASES[stage] == "quickstart" else "decoder"
    out = tmp_path / "cli_export"
    proc = subprocess.run([sys.executable, "-c", CHECK_EXPORTS, str(full), str(out), family], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The quickstart recipe's MicroBERT is the modern tier: its native export is a stock ModernBERT.
    assert result["classes"] == 2 * (["ModernBertForMaskedLM"] if family == "microbert" else ["LlamaForCausalLM"])
    assert result["logits_equal"]
    logged = [r[2] for r in history(full) if r[0] == 8 and r[2] is not None]
    assert result["eval_loss"] == pytest.approx(logged[0], rel=1e-6)
    a, b = load_file(full / "export" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.numel() > 0 for t in a.values())  # whole tensors, not ZeRO-3 partitions


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_step_under_deepspeed_never_becomes_the_last_good_state(tmp_path, shards, bpe_500, precision):
    """DeepSpeed steps inside ``backward()``: by the time the loop sees a NaN loss, the engine has applied
    it (DeepSpeed 0.19's ZeRO-2 skips a non-finite gradient norm itself in fp32, not in bf16). The checkpoint named
    as the last good state must hold the weights from before the bad step (a learning rate of 1e30 makes
    step 1's update huge but finite, and step 2's gradient norm inf). Today's main overwrote step-1 with
    the weights after the bad step."""
    from hf_streamlm.train.zero import zero_checkpoint_weights

    run = tmp_path / "run"
    args = [*tiny("quickstart_decoder", shards, bpe_500), "data.gradient_accumulation_steps=1", "optimizer.learning_rate=1e30",
            "optimizer.max_grad_norm=null", "scheduler.strategy=constant", "scheduler.warmup_steps=0",
            "scheduler.total_steps=6", "runtime.checkpoint.every_n_steps=1", "runtime.evaluation.every_n_steps=null",
            "model.num_layers=1", "model.hidden_size=64", "model.intermediate_size=128",
            f"runtime.precision={precision}", f"runtime.output_dir={run}"]
    proc = launch(2, args)
    assert "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]  # the rank's status; torchrun itself exits 1
    (message,) = [line for line in proc.stderr.splitlines() if line.startswith("hf-streamlm: error:")]
    assert "non-finite loss or gradient norm at step 2" in message and "step-1 (DeepSpeed may have" in message
    assert sorted(p.name for p in checkpoints_of(run)) == ["step-1"]
    weights = zero_checkpoint_weights(run / "checkpoints" / "step-1")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_muon_under_zero_is_refused_in_one_line(tmp_path, shards, bpe_800):
    """Muon orthogonalises whole matrices and ZeRO hands each rank a flat shard: the shipped ZeRO-2 config with
    optimizer.algorithm=muon stops before a tokenizer or model is built, with one line."""
    out = tmp_path / "run"
    proc = launch(2, [*tiny("quickstart_decoder", shards, bpe_800), "optimizer.algorithm=muon",
                      f"runtime.output_dir={out}"])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hf-streamlm: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "optimizer.algorithm=muon needs whole weight matrices on each process, and DeepSpeed ZeRO shards them" \
        in errors[0]
    # The run exits 2 without a traceback; the one printed is the launcher's own report of a failed rank.
    assert "exitcode: 2" in proc.stderr and "hf_streamlm/" not in proc.stderr.split("Traceback")[-1]
    assert not (out / "checkpoints").exists()
