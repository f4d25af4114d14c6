"""FSDP2, the second sharded engine: what runs without a GPU. torch's ``fully_shard`` trains over gloo with
2 CPU processes here, but Accelerate 1.15 enables FSDP only for GPU launches (a CPU launch is MULTI_CPU, its
FSDP plugin ignored: benchmarks/gpu_fsdp.py cites the lines), so the loop's checkpoint, resume and export under
FSDP are left to the GPU check (``bench_gpu.py``'s FSDP2 section, docs/distributed.md). Checked here: the
export's reader of an FSDP checkpoint, on shards that 2 real processes wrote in the layout Accelerate's
``save_state`` gives them; and that GPU check's FSDP2 section itself, run as its dry run (the same launch with
``--cpu``), so the first GPU session runs code that has run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from hf_streamlm.train.fsdp import SHARDED_DIR, fsdp_checkpoint_weights, is_fsdp_checkpoint
from tests.conftest import REPO

WRITER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from tests.models.test_decoder import random_ids, tiny_model

    out = sys.argv[1]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = tiny_model().train()
    for layer in model.model.layers:  # one unit per _no_split_modules block, as TRANSFORMER_BASED_WRAP does
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1 + dist.get_rank())
    ids = random_ids((2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    # accelerate.utils.fsdp_utils.save_fsdp_model, SHARDED_STATE_DICT: {"model": sharded state dict} in DCP.
    dcp.save({"model": get_model_state_dict(model)}, storage_writer=dcp.FileSystemWriter(f"{out}/{SHARDED_DIR}"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save(full, f"{out}/reference.pt")
    dist.destroy_process_group()
""").replace("{SHARDED_DIR}", SHARDED_DIR)


def test_export_reads_the_whole_model_from_fsdp2_shards_of_two_processes(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / SHARDED_DIR).glob("*.distcp"))) == 2  # one file per rank: really sharded
    assert is_fsdp_checkpoint(tmp_path)

    weights = fsdp_checkpoint_weights(tmp_path)
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    assert weights.keys() == reference.keys()
    for name in reference:
        assert torch.equal(weights[name], reference[name]), name
    # The trained weights (not the initial ones) load into the unsharded model as they are.
    from tests.models.test_decoder import tiny_model

    model = tiny_model()
    assert not torch.equal(model.state_dict()["model.norm.weight"], weights["model.norm.weight"])
    model.load_state_dict(weights, strict=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_gpu_check_fsdp2_section_trains_resumes_exactly_and_exports_in_its_dry_run(tmp_path):
    """``bench_gpu.py --dry-run --fsdp only``: the real loop under ``accelerate launch --config_file
    accelerate_configs/fsdp2_8gpu.yaml --cpu``, stopped at its step-3 checkpoint and resumed in a new run directory,
    logs the uninterrupted run's losses for steps 4-6 exactly, and both exports load in stock LlamaForCausalLM."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--dry-run", "--fsdp", "only",
                           "--fsdp-dir", str(tmp_path / "runs"), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| FSDP2 check |" in proc.stdout and "| pass |" in proc.stdout
    result = json.loads(out.read_text())["fsdp"]
    assert result["ok"] and result["resumed_steps"] == [4, 5, 6], result
    assert result["max_loss_delta"] == 0.0 and result["max_export_delta"] == 0.0, result
    assert result["stock_load"].startswith("LlamaForCausalLM, all keys, logits finite"), result
    # If Accelerate ever shards a CPU launch, this fails: then test FSDP2 here for real and drop the GPU-only note.
    assert result["engine"].startswith("no FSDP"), result
    resumed = [json.loads(line) for line in (tmp_path / "runs" / "resumed" / "history.jsonl").read_text().splitlines()]
    assert min(row["step"] for row in resumed) == 4  # it did resume: steps 1-3 were not trained again
