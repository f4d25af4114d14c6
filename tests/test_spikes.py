"""Loss spikes skipped on the step (runtime.spikes, issue 30; hf_streamlm.train.spikes, docs/stability.md).

The rule first, on numbers (OLMo-core's own test feeds a loss of 1e9 after a normal history). Then real runs with a
spike injected the way it happens: a poisoned document in a local jsonl source, 64 copies of a character the
corpus never holds (128 tokens of the same two rare bytes: a loss far above the history, and a gradient that all
points one way, ~30 sigma above the window's norms). The skipped run's later losses equal those of a run where
that step was skipped by hand (the weights and optimizer state of the step before, the data state past it); a
resume from a checkpoint before the spike skips it too (the window travels in the checkpoint); and in a real
2-process launch where only rank 1 reads the poison, both ranks skip the same step, with no read-back added to
a micro-step (tests/host_syncs.py)."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_streamlm.config import ConfigError, load_config
from hf_streamlm.config.sections import SpikesConfig
from hf_streamlm.train.spikes import SpikeWindow, check_spikes_engine, read_spikes, spike_documents
from tests.conftest import REPO, run_in_process

POISON = "\u00a4" * 64  # "¤": two bytes the corpus never holds, 128 byte-level tokens
POISON_KEY = hashlib.blake2b(POISON.encode("utf-8"), digest_size=8).hexdigest()  # its key in the trace
WINDOW = ["runtime.spikes.window=32", "runtime.spikes.min_steps=16"]  # a short run: judged from step 17


# ------------------------------------------------------------------------------------------------ the rule

def window(values: list[float], **config) -> SpikeWindow:
    w = SpikeWindow(SpikesConfig(enabled=True, **config))
    for v in values:
        assert w.judge(v, v) is None
    return w


def noisy(n: int, level: float = 3.0) -> list[float]:
    return [level + 0.01 * math.sin(i) for i in range(n)]  # a steady history, std ~0.007


def test_defaults_are_olmo_cores_and_a_spike_of_1e9_skips_only_its_step():
    assert SpikesConfig() == SpikesConfig(enabled=False, sigma=6.0, window=128, min_steps=64)
    w = window(noisy(63))
    assert w.judge(1e9, 1.0) is None  # 63 steps in the window: not judged yet (it records the value)
    w = window(noisy(64))
    spike = w.judge(1e9, 3.0)
    assert spike["over"] == ["loss"] and spike["window"] == 64
    assert w.judge(3.0, 3.0) is None  # the next normal step is applied
    assert window(noisy(64)).judge(3.0, 1e3)["over"] == ["grad_norm"]  # the gradient norm alone suffices


def test_a_huge_spike_does_not_blind_the_window_and_a_lasting_shift_is_adopted():
    """A skipped step enters the window at the threshold it crossed. With OLMo-core's raw entry, the 1e9 would make
    the standard deviation ~1e8 for the next 128 steps, and the second spike would pass."""
    w = window(noisy(128))
    assert w.judge(1e9, 3.0) is not None
    assert w.judge(4.0, 3.0) is not None  # +140 sigma of the history: still caught
    assert w.judge(3.0, 3.0) is None
    shifted = [i for i in range(200) if w.judge(3.5, 3.0) is not None]  # the level moves up for good
    assert shifted and max(shifted) < 40, shifted  # skipped at first, then adopted


def test_the_window_resumes_as_it_was_and_non_finite_values_stay_out():
    history = noisy(100)
    w = window(history)
    assert w.judge(math.nan, 3.0) is None and w.judge(3.0, math.inf) is None  # the non-finite guard's
    assert len(w.losses) == 100
    resumed = SpikeWindow(SpikesConfig(enabled=True), json.loads(json.dumps(w.state_dict())))
    for value in [3.0, 3.001, 9.0, 3.0, 2.99]:
        assert resumed.judge(value, 3.0) == w.judge(value, 3.0)
    assert resumed.state_dict() == w.state_dict()


def test_deepspeed_and_bad_settings_are_refused_in_one_line():
    config = load_config(["recipe=quickstart_decoder", "runtime.spikes.enabled=true"])
    with pytest.raises(ConfigError, match="cannot veto a DeepSpeed step"):
        check_spikes_engine(config, "DEEPSPEED")
    check_spikes_engine(config, "MULTI_GPU")
    with pytest.raises(ConfigError, match="runtime.spikes.min_steps"):
        load_config(["recipe=quickstart_decoder", "runtime.spikes.min_steps=200"])


# ------------------------------------------------------------------------------------------------ injected runs

def corpus(root: Path, poisoned: bool = True, at: int = 4) -> Path:
    """The shipped corpus's first 200 documents in order, the poison after the first ``at`` (~3,070 tokens: step 25
    at 128 tokens a step)."""
    from hf_streamlm.data.corpus import BUILTIN_CORPORA

    with gzip.open(BUILTIN_CORPORA["pydocs"], "rt") as f:
        lines = f.read().splitlines()[:200]
    if poisoned:
        lines = lines[:at] + [json.dumps({"text": POISON})] + lines[at:]
    root.mkdir(parents=True, exist_ok=True)
    (root / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    return root


def tiny(source: Path, tokenizer: Path) -> list[str]:
    """A 1-layer decoder, in order (no shuffle), 2 micro-batches of 2 x 32 tokens a step, constant learning rate."""
    return ["recipe=quickstart_decoder", f"data.sources=[{{path: json, data_files: '{source}/part-*.jsonl'}}]",
            f"tokenizer.path={tokenizer}", "model.num_layers=1", "model.hidden_size=64", "model.intermediate_size=128",
            "data.batch_size=2", "data.gradient_accumulation_steps=2", "data.sequence_length=32",
            "data.shuffle_buffer_size=0", "data.block_shuffle_size=0", "data.eval_holdout=0",
            "scheduler.strategy=constant", "scheduler.warmup_steps=0", "scheduler.total_steps=40",
            "runtime.log_every_n_steps=1", "runtime.evaluation.every_n_steps=null", "runtime.logging.progress_bar=false",
            "runtime.logging.tensorboard=false", "runtime.logging.enable_stdout=false", "runtime.demo_sentences=[]"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "history.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def skipped(tmp_path_factory, bpe_500) -> Path:
    """The poisoned stream with runtime.spikes on (and the document trace): checkpoints every 10 steps."""
    root = tmp_path_factory.mktemp("spikes")
    run = root / "skipped"
    run_in_process(*tiny(corpus(root / "poisoned"), bpe_500), *WINDOW, "runtime.spikes.enabled=true",
                   "data.trace_documents=true", "runtime.checkpoint.every_n_steps=10", "runtime.checkpoint.max_keep=10",
                   f"runtime.output_dir={run}")
    return run


def test_the_poisoned_step_is_skipped_and_named(skipped):
    (spike,) = read_spikes(skipped)
    step = spike["step"]
    assert 17 <= step <= 30 and "grad_norm" in spike["over"]
    assert spike["grad_norm"] > spike["grad_norm_mean"] + 20 * spike["grad_norm_std"]
    # The trace names the poison at the skipped step (the step holding its last token), and nowhere else.
    assert [POISON_KEY] == [key for _, key, _ in spike_documents(skipped)[step]]
    trace = [json.loads(line) for line in (skipped / "trace" / "rank-0.jsonl").read_text().splitlines()]
    assert [row["step"] for row in trace if any(key == POISON_KEY for _, key, _ in row["docs"])] == [step]
    rows = [json.loads(line) for line in (skipped / "history.jsonl").read_text().splitlines()]
    assert [r["spike_skips"] for r in rows] == [0] * (step - 1) + [1] * (40 - step + 1)
    saved = json.loads((skipped / "checkpoints" / "step-40" / "trainer_state.json").read_text())
    assert saved["spike_skips"] == 1 and len(saved["spike_window"]["losses"]) == 32
    assert "1 step(s) skipped, listed in the run's `spikes.jsonl`" in (skipped / "export" / "README.md").read_text()


def test_muon_skips_the_poisoned_step_too(skipped, tmp_path, bpe_500):
    """Muon (with AdamW for the rest) is simply not stepped either: the same step is skipped, the run ends."""
    run = tmp_path / "muon"
    run_in_process(*tiny(skipped.parent / "poisoned", bpe_500), *WINDOW, "runtime.spikes.enabled=true",
                   "optimizer.algorithm=muon", "scheduler.total_steps=30", "runtime.checkpoint.every_n_steps=1000",
                   f"runtime.output_dir={run}")
    assert [s["step"] for s in read_spikes(run)] == [s["step"] for s in read_spikes(skipped)]
    assert losses(run)[30] < losses(run)[1]


def test_later_losses_equal_a_run_where_the_step_was_skipped_by_hand(skipped, tmp_path, bpe_500):
    """The reference applies every step (runtime.spikes off) and saves each; the step skipped by hand is its
    checkpoint of the spike's step with the weights and optimizer state of the step before put back. Resumed, it
    trains the same losses as the skipped run; the reference, which applied the poison, does not."""
    from hf_streamlm.train.checkpoint import MANIFEST, manifest

    step = read_spikes(skipped)[0]["step"]
    applied = tmp_path / "applied"
    args = tiny(corpus(tmp_path / "poisoned"), bpe_500)
    run_in_process(*args, "runtime.checkpoint.every_n_steps=1", "runtime.checkpoint.max_keep=20",
                   f"runtime.output_dir={applied}")
    by_hand = tmp_path / "by_hand" / f"step-{step}"
    shutil.copytree(applied / "checkpoints" / f"step-{step}", by_hand)
    for name in ("model.safetensors", "optimizer.bin"):
        shutil.copy(applied / "checkpoints" / f"step-{step - 1}" / name, by_hand / name)
    (by_hand / MANIFEST).write_text(json.dumps(manifest(by_hand)))
    resumed = tmp_path / "resumed"
    run_in_process(*args, f"runtime.resume={by_hand}", "runtime.checkpoint.every_n_steps=1000",
                   f"runtime.output_dir={resumed}")
    after = range(step + 1, 41)
    assert [losses(resumed)[s] for s in after] == [losses(skipped)[s] for s in after]
    assert [losses(applied)[s] for s in range(1, step + 1)] == [losses(skipped)[s] for s in range(1, step + 1)]
    assert losses(applied)[step + 1] != losses(skipped)[step + 1]  # the poison, applied, changed what followed


def test_a_resume_before_the_spike_skips_it_too(skipped, tmp_path, bpe_500):
    """From the checkpoint of step 20 (20 steps in the window, more than min_steps): without the window in the
    checkpoint, the resumed run would start an empty one, judge nothing before step 37, and apply the poison."""
    run = tmp_path / "run"
    shutil.copytree(skipped, run)
    run_in_process(*tiny(skipped.parent / "poisoned", bpe_500), *WINDOW, "runtime.spikes.enabled=true", "data.trace_documents=true",
                   f"runtime.resume={run / 'checkpoints' / 'step-20'}", "runtime.checkpoint.every_n_steps=10",
                   f"runtime.output_dir={run}")
    assert read_spikes(run) == read_spikes(skipped)
    assert losses(run) == losses(skipped)


def test_the_spike_check_adds_no_read_back(tmp_path, bpe_800, reset_accelerate):
    """tests/test_host_sync.py's count with runtime.spikes on (judged from step 3): 0 per micro-step, 1 per step
    that does not log, as without it."""
    from tests.host_syncs import syncs_per_micro_step
    from tests.test_host_sync import GAS, check, family_args

    per_interval, _ = syncs_per_micro_step([*family_args("decoder", bpe_800), "runtime.spikes.enabled=true",
                                            "runtime.spikes.window=4", "runtime.spikes.min_steps=2",
                                            f"runtime.output_dir={tmp_path / 'run'}"], 3 * GAS)
    check(per_interval)


def test_two_processes_skip_the_same_step_when_one_rank_saw_the_poison(tmp_path, bpe_500):
    """Rank 1 alone reads the poison (one file per rank). Both ranks log the skip of the same step, the trace puts the
    poison on rank 1 only, and each rank counts no read-back in a micro-step and one at the end of a step that does
    not log (tests/host_syncs.py, under accelerate launch)."""
    from tests.test_accelerate_configs import free_port

    source = tmp_path / "source"
    corpus(source, poisoned=False)
    corpus(tmp_path / "one", poisoned=True)
    lines = (source / "part-0.jsonl").read_text().splitlines()
    (source / "part-0.jsonl").write_text("\n".join(lines[100:]) + "\n")  # rank 0: other documents, no poison
    shutil.copy(tmp_path / "one" / "part-0.jsonl", source / "part-1.jsonl")  # rank 1: the poison after 4 documents
    run = tmp_path / "run"
    args = [*tiny(source, bpe_500), *WINDOW, "runtime.spikes.enabled=true", "data.trace_documents=true",
            "scheduler.total_steps=30", "runtime.log_every_n_steps=10", "runtime.checkpoint.every_n_steps=1000",
            f"runtime.output_dir={run}"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "tests.host_syncs", str(tmp_path), str(30 * 2), "decoder", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (spike,) = read_spikes(run)
    step = spike["step"]
    said = sorted(re.findall(r"rank (\d): (step (\d+): loss .* update skipped.*)", proc.stderr))
    assert [(rank, at) for rank, _, at in said] == [("0", str(step)), ("1", str(step))], proc.stderr[-3000:]
    assert said[0][1] == said[1][1]  # the same numbers: the ranks' mean loss, judged against the same window
    for rank, expected in ((0, []), (1, [POISON_KEY])):
        trace = [json.loads(line) for line in (run / "trace" / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert [key for _, key, _ in trace[step - 1]["docs"] if key == POISON_KEY] == expected
    for rank in (0, 1):
        intervals = json.loads((tmp_path / f"syncs-decoder-rank{rank}.json").read_text())["intervals"]
        within = [n for i, n in enumerate(intervals) if (i + 1) % 2]
        quiet_ends = [n for i, n in enumerate(intervals) if (i + 1) % 2 == 0 and ((i + 1) // 2) % 10]
        assert within == [0] * len(within) and quiet_ends == [1] * len(quiet_ends), intervals
