"""No host-device synchronisation in a micro-step that does not log (issues 15 and 26), counted in the real
training loop, for both families, in one process and in a real 2-process ``accelerate launch``: every operator
that makes the host wait for a CUDA GPU (tests/host_syncs.py lists them: ``.item()`` and friends, ``nonzero``,
boolean-mask indexing, ``masked_select``, ``repeat_interleave`` without ``output_size``, ``unique``, ...). On the
CPU the same calls are made, so they can be counted here, without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import DECODER, MLM, REPO
from tests.host_syncs import Syncs, syncs, syncs_per_micro_step

GAS = 4  # micro-batches per optimizer step
SYNC_RUN = [
    f"data.gradient_accumulation_steps={GAS}",
    "data.batch_size=2",
    "scheduler.total_steps=3",
    "runtime.log_every_n_steps=3",  # steps 1 and 2 do not log; 3 does
    "runtime.checkpoint.every_n_steps=3",
    "runtime.evaluation.every_n_steps=null",
]


def check(per_interval: list[int]) -> None:
    """Interval i runs micro-step i (forward, backward) and the host work up to micro-step i + 1's forward."""
    within_steps = [n for i, n in enumerate(per_interval) if (i + 1) % GAS]
    step_ends = [n for i, n in enumerate(per_interval) if (i + 1) % GAS == 0]  # steps 1 and 2: no log, no save
    assert within_steps == [0] * len(within_steps), per_interval
    # Once per optimizer step: the guard's verdict and the stop flag, read back together (the data-failure
    # flag of several processes is reduced on the host: tests/test_host_sync.py's launch).
    assert step_ends == [1, 1], per_interval


# The modern MicroBERT with packed documents and a window shorter than the blocks: the document and sliding-window
# masks, the rotary tables of both layer kinds, and the sparse head on the collator's masked_positions.
MODERN = [*MLM, "model.architecture=modern", "data.document_masking=true", "model.local_attention=16"]


def family_args(family: str, tokenizer) -> list[str]:
    # The decoder recipe packs documents (position_ids, document_ids, the flash kernels' segments): the
    # document-causal mask path. MicroBERT's training head takes its labelled rows from the collator.
    recipe = {"decoder": DECODER, "microbert": MLM, "modern": MODERN}[family]
    return [*recipe, f"tokenizer.path={tokenizer}", *SYNC_RUN]


@pytest.mark.parametrize("family", ["decoder", "microbert", "modern"])
def test_micro_steps_that_do_not_log_sync_nothing(family, tmp_path, request, reset_accelerate):
    tokenizer = request.getfixturevalue("bpe_800" if family == "decoder" else "wordpiece_800")
    per_interval, by_op = syncs_per_micro_step(
        [*family_args(family, tokenizer), f"runtime.output_dir={tmp_path / 'run'}"], 3 * GAS)
    check(per_interval)


@pytest.mark.parametrize("family", ["decoder", "microbert"])
def test_two_processes_sync_nothing_in_a_micro_step(family, tmp_path, request):
    """The same count on each rank of a real 2-process launch (gloo): DDP adds no read-back (the data-failure
    flag of the ranks is reduced on the host), and both ranks count the same."""
    from tests.test_accelerate_configs import free_port

    tokenizer = request.getfixturevalue("bpe_800" if family == "decoder" else "wordpiece_800")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "tests.host_syncs", str(tmp_path), str(3 * GAS), family,
           *family_args(family, tokenizer), f"runtime.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = [json.loads((tmp_path / f"syncs-{family}-rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in counts:
        check(rank["intervals"])
    assert counts[0]["intervals"] == counts[1]["intervals"], counts


def test_the_counter_sees_what_syncs_on_cuda():
    """Each listed operator is counted, and the sync-free spellings of the same work are not."""
    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    with Syncs() as counter:
        x.sum().item()
        x[mask]
        x.masked_select(mask)
        torch.nonzero(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.unique(x)
        y = x.clone()
        y[mask] = 0.0
        x.tolist()
    assert counter.count == 8, dict(counter.by_op)
    with Syncs() as counter:
        x.index_select(0, torch.tensor([0, 2, 4]))  # the positions computed on the host: no read-back
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        torch.where(mask, x, 0.0)
        x.masked_fill(mask, 0.0)
    assert counter.count == 0, dict(counter.by_op)
    assert not syncs(torch.ops.aten._to_copy.default, (x,), {"device": torch.device("cpu")})  # host to host
