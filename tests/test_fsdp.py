"""FSDP2, the second sharded engine: what runs without a GPU. torch's ``fully_shard`` trains over gloo with
2 CPU processes here, but Accelerate enables FSDP only for GPU launches (a CPU launch is MULTI_CPU, its FSDP
plugin ignored), so the loop's checkpoint, resume and export under FSDP are left to the GPU check
(docs/distributed.md). Checked here: the export's reader of an FSDP checkpoint, on shards that 2 real
processes wrote in the layout Accelerate's ``save_state`` gives them."""

from __future__ import annotations

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
