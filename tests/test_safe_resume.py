"""Issue 27: nothing a resume, an export or an eval reads executes code (hf_streamlm.train.safe_load).

Each kind of pickle a resume or an export reads is replaced by a crafted one whose unpickling would create a marker
file (``os.system``, as in the issue), the checkpoint's manifest refitted to it (as whoever edits a checkpoint can
do): the run, or ``hf-streamlm export``, refuses in one line naming the file, and the marker does not exist. Real
checkpoints still resume bit-exact: tests/test_resume_run.py, test_resume_stream.py, test_elastic_resume.py
(accelerate, both families), test_deepspeed.py (ZeRO-2 and 3, and their export); here the same readers on DeepSpeed's
and DCP's real records, in-process."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from hf_streamlm.config import ConfigError
from hf_streamlm.train import safe_load
from hf_streamlm.train.checkpoint import MANIFEST, load_checkpoint_model, manifest
from tests.conftest import MLM, copy_run, main_refuses


class Payload:
    """Unpickled, it runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(file: Path, marker: Path) -> None:
    """Replace ``file`` by a torch file (zip, pickle protocol 2, as torch.save writes every real one) holding the
    payload, and refit the checkpoint's manifest."""
    torch.save({"num_workers": 0, "state": Payload(marker)}, file)
    refit_manifest(next(p for p in file.parents if (p / MANIFEST).is_file()))


def refit_manifest(ckpt: Path) -> None:
    (ckpt / MANIFEST).write_text(json.dumps(manifest(ckpt)))


def test_the_payload_runs_when_unpickled_without_restriction(tmp_path):
    """The crafted files are real: ``torch.load(weights_only=False)``, what read the data state before, runs it."""
    marker = tmp_path / "marker"
    torch.save({"state": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


# What a resume unpickles, one process, no DeepSpeed: the data state (hf_streamlm), and accelerate's scheduler
# (registered for checkpointing: custom_checkpoint_0.pkl, asked for with weights_only=False), optimizer and RNG states.
RESUME_FILES = ["data_state_0.pt", "custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"]


@pytest.mark.parametrize("name", RESUME_FILES)
def test_a_crafted_file_refuses_the_resume_in_one_line(name, mlm_run, tmp_path, capsys, reset_accelerate):
    run = copy_run(mlm_run, tmp_path)
    marker = tmp_path / "marker"
    craft(run / "checkpoints" / "step-4" / name, marker)
    err = main_refuses([*MLM, f"runtime.output_dir={run}", "scheduler.total_steps=6"], capsys)
    refused = [line for line in err.splitlines() if "refused" in line]
    assert len(refused) == 1 and f"step-4/{name} refused: it names posix.system" in refused[0], err[-1500:]
    assert not marker.exists()


def test_the_loads_themselves_refuse_a_file_the_audit_did_not_see(mlm_run, tmp_path, reset_accelerate):
    """Behind the audit (a checkpoint changed after it, or one that reached the loop another way): the data state's
    reader and accelerate's scheduler reader (weights_only=False, forced to True) refuse in one line too."""
    from accelerate.checkpointing import load_custom_state
    from accelerate.state import PartialState

    PartialState(cpu=True)  # accelerate's logger, which load_custom_state uses, needs it

    ckpt = copy_run(mlm_run, tmp_path) / "checkpoints" / "step-4"
    marker = tmp_path / "marker"
    for name in ("data_state_0.pt", "custom_checkpoint_0.pkl"):
        craft(ckpt / name, marker)
    with pytest.raises(ConfigError, match=r"data_state_0.pt refused: it names posix.system"):
        safe_load.load(ckpt / "data_state_0.pt")
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)]), lambda s: 1.0)
    with pytest.raises(ConfigError, match=r"refused: .*posix.system"), \
            safe_load.weights_only_loads(safe_load.checkpoint_globals(ckpt)):
        load_custom_state(scheduler, ckpt)  # what load_state calls: torch.load(weights_only=False)
    assert not marker.exists()
    assert os.environ.get(safe_load.FORCE) is None  # the force ends with the block


def zero_checkpoint(ckpt: Path) -> Path:
    """A checkpoint laid out as DeepSpeed's (pytorch_model/ with the engine's model and optimizer records, their
    DeepSpeed objects included), without the slow DeepSpeed launch: the readers are what is tested here."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    shards = ckpt / "pytorch_model"
    shards.mkdir()
    torch.save({"module": None, "param_shapes": [{"w": torch.Size([2])}], "ds_version": "0.19"},
               shards / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum(2), "loss_scaler": LossScaler(1.0),
                                         "param_slice_mappings": [{"w": fragment_address(numel=2, start=0)}],
                                         "single_partition_of_fp32_groups": [torch.zeros(2)]}},
               shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    refit_manifest(ckpt)
    return ckpt


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_deepspeed_shards_load_with_their_allow_list_and_a_crafted_one_is_refused(name, mlm_run, tmp_path, capsys):
    """DeepSpeed's records (ZeroStageEnum, LossScaler, fragment_address) pass the restricted reader; a crafted shard
    stops ``hf-streamlm export`` (DeepSpeed's zero_to_fp32, and engine.load_checkpoint on a resume) in one line."""
    from hf_streamlm.cli import main

    ckpt = zero_checkpoint(copy_run(mlm_run, tmp_path) / "checkpoints" / "step-4")
    safe_load.audit(ckpt)  # the real records pass
    marker = tmp_path / "marker"
    craft(ckpt / "pytorch_model" / name, marker)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["export", str(ckpt), "--output", str(tmp_path / "export")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err, err[-1500:]
    assert f"pytorch_model/{name} refused: it names posix.system" in err
    assert not marker.exists()


def fsdp_checkpoint(ckpt: Path, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's model as FSDP's SHARDED_STATE_DICT writes it (DCP: .metadata, a plain pickle, and .distcp
    files), in place of model.safetensors; returns the weights."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from hf_streamlm.train.fsdp import SHARDED_DIR

    weights = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    dcp.save({"model": dict(weights), **(extra or {})}, storage_writer=dcp.FileSystemWriter(ckpt / SHARDED_DIR),
             no_dist=True)
    refit_manifest(ckpt)
    return weights


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fsdp_export_path_reads_dcp_restricted(mlm_run, tmp_path):
    """The export's reader of an FSDP checkpoint (torch's dcp_to_torch_save, which unpickles .metadata with pickle and
    non-tensor items with torch.load(weights_only=False)) gives the same weights behind the audit; a crafted
    .metadata, or a crafted non-tensor item in a .distcp file, is refused naming the file."""
    from hf_streamlm.train.fsdp import SHARDED_DIR

    ckpt = copy_run(mlm_run, tmp_path) / "checkpoints" / "step-4"
    weights = fsdp_checkpoint(ckpt, extra={"hyper": {"lr": 0.1, "betas": (0.9, 0.95)}})
    model = load_checkpoint_model(ckpt)[0]
    state = model.state_dict()
    assert all(torch.equal(state[k.removeprefix("_orig_mod.")], v) for k, v in weights.items())

    marker = tmp_path / "marker"
    broken = tmp_path / "distcp"
    shutil.copytree(ckpt, broken)
    shutil.rmtree(broken / SHARDED_DIR)
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": dict(weights), "hyper": {"lr": Payload(marker)}},
             storage_writer=dcp.FileSystemWriter(broken / SHARDED_DIR), no_dist=True)
    refit_manifest(broken)
    with pytest.raises(ConfigError, match=r"\.distcp refused: it names posix.system"):
        load_checkpoint_model(broken)

    import pickle

    with open(ckpt / SHARDED_DIR / ".metadata", "wb") as f:
        pickle.dump({"state": Payload(marker)}, f)
    refit_manifest(ckpt)
    with pytest.raises(ConfigError, match=rf"{SHARDED_DIR}/.metadata refused: it names posix.system"):
        load_checkpoint_model(ckpt)
    assert not marker.exists()
