"""Rollback after repeated loss spikes (runtime.spikes.rollback_after, issue 30 point 2; hf_streamlm.train.rollback,
hf_streamlm.data.skips, docs/stability.md).

tests/test_spikes.py's tiny decoder and injected poison, with two poisoned documents a few steps apart (two
variants of the rare-byte string, distinct keys): both steps are skipped, which is ``rollback_after=2`` skipped
steps within ``rollback_within=16``. The run goes back to the checkpoint before the first of them, skips the
documents those steps trained on (read from the trace: the two poisons and the document between them, all three
already tokenized in the checkpoint's packing buffer, so the purge of a loaded state is what takes them out), and
ends with no later step training any of them. With the bound at 0 the run
stops in one line with status 5; without the trace, the same micro-batches are dropped instead, and the log says
so. Then the same with 2 processes, a DataLoader worker, a mixture of sources, no checkpoint before the spikes, and
the purge of a loaded data state with the block shuffle on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hf_streamlm.data.skips import read_skipped_documents
from hf_streamlm.train.rollback import SPIKE_STOP_STATUS, read_rollbacks
from hf_streamlm.train.spikes import read_spikes
from tests.conftest import main_refuses, run_in_process
from tests.test_spikes import WINDOW, corpus, losses, tiny

POISONS = ["\u00a4" * 64, "\u00a4" * 63 + "\u00a5"]  # two documents of rare bytes, distinct keys
KEYS = [hashlib.blake2b(p.encode("utf-8"), digest_size=8).hexdigest() for p in POISONS]
ROLLBACK = ["runtime.spikes.enabled=true", "runtime.spikes.rollback_after=2", "runtime.spikes.rollback_within=16",
            "runtime.checkpoint.every_n_steps=10", "runtime.checkpoint.max_keep=10"]


def test_defaults_and_bad_settings_are_refused_in_one_line():
    from hf_streamlm.config import ConfigError, load_config
    from hf_streamlm.config.sections import SpikesConfig

    s = SpikesConfig()
    assert (s.rollback_after, s.rollback_within, s.max_rollbacks) == (3, 128, 3)
    load_config(["recipe=quickstart_decoder", "runtime.spikes.rollback_after=0", "runtime.spikes.max_rollbacks=0"])
    for key, value in (("rollback_after", -1), ("rollback_within", 0), ("max_rollbacks", -1)):
        with pytest.raises(ConfigError, match=f"runtime.spikes.{key}"):
            load_config(["recipe=quickstart_decoder", f"runtime.spikes.{key}={value}"])


def poisoned(root: Path) -> Path:
    """tests/test_spikes.py's corpus with the two poisons around its fifth document (the first lands in step 25)."""
    corpus(root, poisoned=False)
    lines = (root / "part-0.jsonl").read_text().splitlines()
    lines = lines[:4] + [json.dumps({"text": POISONS[0]}), lines[4], json.dumps({"text": POISONS[1]})] + lines[5:]
    (root / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    return root


def key_of(root: Path, line: int) -> str:
    text = json.loads((root / "part-0.jsonl").read_text().splitlines()[line])["text"]
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def trained_keys(run: Path, rank: int = 0) -> dict[int, list[str]]:
    """The keys of the documents each step trained on (ended in it), from the trace of ``rank``."""
    rows = [json.loads(line) for line in (run / "trace" / f"rank-{rank}.jsonl").read_text().splitlines()]
    return {row["step"]: [key for _, key, _ in row["docs"]] for row in rows}


@pytest.fixture(scope="module")
def rolled(tmp_path_factory, bpe_500) -> Path:
    root = tmp_path_factory.mktemp("rollback")
    run = root / "run"
    run_in_process(*tiny(poisoned(root / "poisoned"), bpe_500), *WINDOW, *ROLLBACK, "data.trace_documents=true",
                   f"runtime.output_dir={run}")
    return run


def test_repeated_poison_rolls_back_skips_its_documents_and_the_run_ends(rolled):
    (rollback,) = read_rollbacks(rolled)
    first, second = rollback["steps"]
    assert (first, second) == (25, 33) and rollback["mode"] == "documents"
    assert rollback["to_step"] == 20 and rollback["checkpoint"].endswith("step-20")
    # The documents the two skipped steps trained on: the poisons, and the one between them, which ends in step 33
    # before the second poison begins (that one ends in step 34: named as a document cut by the skipped step's end).
    between = key_of(rolled.parent / "poisoned", 5)
    skipped = read_skipped_documents(rolled)
    assert [(row["key"], row["step"], row["rollback"]) for row in skipped] == [
        (KEYS[0], 25, 1), (between, 33, 1), (KEYS[1], 33, 1)]
    assert rollback["documents"] == 3
    # The timeline after the rollback: no poison trained, no spike, every step logged once, the run ended.
    trace = trained_keys(rolled)
    assert sorted(trace) == list(range(1, 41))
    assert not [step for step, keys in trace.items() if set(keys) & {*KEYS, between}]
    assert read_spikes(rolled) == []
    assert sorted(losses(rolled)) == list(range(1, 41))
    assert [p.name for p in (rolled / "checkpoints" / "rolled-back-1").iterdir()] == ["step-30"]
    rows = [json.loads(line) for line in (rolled / "history.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped"] == {"spike": 6}, rows[-1]  # the 3 documents, tokenized in 2 passes already
    saved = json.loads((rolled / "checkpoints" / "step-40" / "trainer_state.json").read_text())
    assert saved["rollbacks"] == 1 and saved["spike_skips"] == 0
    card = (rolled / "export" / "README.md").read_text()
    assert "1 rollback(s) after repeated spikes" in card and "3 document(s) skipped since" in card


def test_the_bound_stops_in_one_line_with_its_own_status(rolled, tmp_path, bpe_500, capsys, reset_accelerate):
    run = tmp_path / "run"
    err = main_refuses([*tiny(rolled.parent / "poisoned", bpe_500), *WINDOW, *ROLLBACK,
                        "runtime.spikes.max_rollbacks=0", f"runtime.output_dir={run}"], capsys, code=SPIKE_STOP_STATUS)
    (line,) = [line for line in err.splitlines() if line.startswith("hf-streamlm: error:")]
    assert "max_rollbacks=0" in line and "2 skipped steps within 16" in line
    assert read_rollbacks(run) == [] and len(read_spikes(run)) == 2


def test_without_the_trace_the_same_micro_batches_are_dropped(rolled, tmp_path, bpe_500, caplog):
    """The token range of a step is its micro-batches: the stream replays exactly from the checkpoint, so they are
    known by their place in it (2 micro-batches a step). The second poison ends in the step after its spike (a
    document cut by the step's end), so the first rollback's ranges miss its end: a second rollback drops that range
    too (with the one of a step that spiked on the shifted stream), and the run ends."""
    run = tmp_path / "run"
    run_in_process(*tiny(rolled.parent / "poisoned", bpe_500), *WINDOW, *ROLLBACK, f"runtime.output_dir={run}")
    first, second = read_rollbacks(run)
    assert first["mode"] == second["mode"] == "tokens" and first["steps"] == [25, 33] and first["to_step"] == 20
    assert first["micro_batches"] == [48, 64] and second["micro_batches"] == [58, 66] and second["to_step"] == 20
    said = [m for m in caplog.messages if "dropped, the token range of a rolled-back spike" in m]
    assert len(said) == 2 + 4 and "data.trace_documents=false" in said[0]
    assert read_skipped_documents(run) == [] and read_spikes(run) == []
    assert sorted(losses(run)) == list(range(1, 41))
    saved = json.loads((run / "checkpoints" / "step-40" / "trainer_state.json").read_text())
    assert saved["dropped_micro_batches"] == 8 and saved["rollbacks"] == 2
    assert "8 micro-batches dropped (no document trace)" in (run / "export" / "README.md").read_text()


def test_a_loaded_state_is_purged_of_skipped_documents_and_later_passes_drop_them():
    """tests/test_shuffle_stage.py's documents of 3 to 9 one-token blocks (document d's tokens are all d), block
    shuffle on: a state taken mid-pass holds documents in the block-shuffle buffer and in the packing remainder.
    Loaded with three documents to skip (one in each place, one not read yet), none of their tokens comes out again,
    in this pass or the next, and every other document of the next pass comes out whole."""
    from collections import Counter

    from hf_streamlm.data.documents import document_key
    from hf_streamlm.data.skips import DocumentSkips
    from tests.test_shuffle_stage import block_pipeline

    lengths = [3 + (d * 5) % 7 for d in range(60)]
    doc_of = {document_key(str(d)): d for d in range(60)}
    p = block_pipeline(blocks=16)
    for _ in range(5):
        p.next_batch()
    state = p.state_dict()
    in_blocks = sorted({doc_of[int(key)] for key in state["blocks"][:, 3]})
    in_remainder = sorted({doc_of[int(key)] for key in state["doc_ends"][:, 2]} - set(in_blocks))
    skip = {in_blocks[0], in_remainder[-1], 59}
    resumed = block_pipeline(blocks=16)
    resumed.skip = DocumentSkips({(0, document_key(str(d))) for d in skip})
    resumed.load_state_dict(state)
    out = Counter(t for _ in range(100) for t in resumed.next_batch()["input_ids"].flatten().tolist())
    assert not set(out) & skip
    assert all(out[d] >= lengths[d] for d in range(60) if d not in skip)  # the next pass, whole
    assert resumed.skipped()["spike"] >= 3


def test_two_processes_roll_back_together_when_one_rank_read_the_poison(rolled, tmp_path, bpe_500):
    """Rank 1 alone reads the poisons (one file per rank, as tests/test_spikes.py's launch), in a DataLoader worker
    per rank, with gradient accumulation 2 and micro-batch 2. Both ranks log the same
    rollback; the record names the documents of both ranks' skipped steps (rank 1's cut documents gathered to the
    main process); after it, neither rank's trace holds a poison, and the launch ends with status 0."""
    import re
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.test_accelerate_configs import free_port

    source = tmp_path / "source"
    corpus(source, poisoned=False)
    lines = (source / "part-0.jsonl").read_text().splitlines()
    (source / "part-0.jsonl").write_text("\n".join(lines[100:]) + "\n")  # rank 0: other documents, no poison
    shutil.copy(rolled.parent / "poisoned" / "part-0.jsonl", source / "part-1.jsonl")  # rank 1: the two poisons
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "hf_streamlm.run", *tiny(source, bpe_500), *WINDOW, *ROLLBACK,
           "data.trace_documents=true", "runtime.log_every_n_steps=10", "data.num_workers=1",  # the recipe's shape:
           f"runtime.output_dir={run}"]  # a DataLoader worker per rank, accumulation 2, micro-batch 2
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rollback,) = read_rollbacks(run)
    said = re.findall(r"(loss spikes: \d+ skipped steps within 16 \(steps [\d, ]+\); rollback 1 of at most 3)",
                      proc.stderr)
    assert len(said) == 2 and said[0] == said[1], proc.stderr[-3000:]
    assert rollback["steps"] == [25, 33] and rollback["to_step"] == 20
    skipped = read_skipped_documents(run)
    # The 3 documents of rank 1's single-process run above, and the 2 of rank 0 in the same steps.
    assert set(KEYS) <= {row["key"] for row in skipped} and len(skipped) == rollback["documents"] == 5
    for rank in (0, 1):
        trace = trained_keys(run, rank)
        assert sorted(trace) == list(range(1, 41))
        assert not [step for step, found in trace.items() if set(found) & set(KEYS)]



def test_a_mixture_rolls_back_and_skips_the_poisons_of_its_source(rolled, tmp_path, bpe_500):
    """Sources mixed by tokens (hf_streamlm.data.mixture: a reader per source, whole documents mixed at packing):
    the poisoned source is source 0, a clean one source 1. Each source's reader drops its skipped documents, and the
    mixing reader's loaded state is purged of those it had taken."""
    clean = tmp_path / "clean"
    corpus(clean, poisoned=False)
    lines = (clean / "part-0.jsonl").read_text().splitlines()
    (clean / "part-0.jsonl").write_text("\n".join(lines[100:]) + "\n")
    run = tmp_path / "run"
    args = [arg for arg in tiny(rolled.parent / "poisoned", bpe_500) if not arg.startswith("data.sources=")]
    run_in_process(*args, *WINDOW, *ROLLBACK, "runtime.spikes.rollback_within=32", "scheduler.total_steps=70",
                   "data.trace_documents=true", "data.mix_by=tokens",
                   f"data.sources=[{{path: json, data_files: '{rolled.parent / 'poisoned'}/part-*.jsonl'}}, "
                   f"{{path: json, data_files: '{clean}/part-*.jsonl'}}]", f"runtime.output_dir={run}")
    rollbacks = read_rollbacks(run)
    assert rollbacks and rollbacks[0]["mode"] == "documents"
    skipped = read_skipped_documents(run)
    assert {(0, key) for key in KEYS} <= {(row["source"], row["key"]) for row in skipped}
    trace = trained_keys(run)
    assert sorted(trace) == list(range(1, 71))
    assert not [step for step, keys in trace.items() if set(keys) & {row["key"] for row in skipped}]


def test_without_a_checkpoint_before_the_spikes_the_run_starts_again_from_step_0(rolled, tmp_path, bpe_500):
    run = tmp_path / "run"
    run_in_process(*tiny(rolled.parent / "poisoned", bpe_500), *WINDOW, *ROLLBACK, "data.trace_documents=true",
                   "runtime.checkpoint.every_n_steps=1000", f"runtime.output_dir={run}")
    (rollback,) = read_rollbacks(run)
    assert rollback["to_step"] == 0 and rollback["checkpoint"] is None and rollback["steps"] == [25, 33]
    assert read_skipped_documents(run) == read_skipped_documents(rolled)
    trace = trained_keys(run)
    assert sorted(trace) == list(range(1, 41))
    assert not [step for step, keys in trace.items() if set(keys) & set(KEYS)]
    assert sorted(losses(run)) == list(range(1, 41)) and read_spikes(run) == []


def test_a_dataloader_worker_drops_the_documents_too(rolled, tmp_path, bpe_500):
    """data.num_workers=1: the reader runs in a DataLoader worker process (the skips travel in the pickled factory,
    the documents cut by a step's end in the batches); the same rollback, the same documents, the same run after."""
    run = tmp_path / "run"
    run_in_process(*tiny(rolled.parent / "poisoned", bpe_500), *WINDOW, *ROLLBACK, "data.trace_documents=true",
                   "data.num_workers=1", f"runtime.output_dir={run}")
    assert [row["steps"] for row in read_rollbacks(run)] == [[25, 33]]
    assert read_skipped_documents(run) == read_skipped_documents(rolled)
    assert trained_keys(run) == trained_keys(rolled) and losses(run) == losses(rolled)
