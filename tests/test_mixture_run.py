"""A training run with a data schedule, end to end: each logged row carries the stage trained and the tokens per
stage and source (history.jsonl), the realized shares keep the schedule within one global batch, and the export's
model card lists them against the scheduled weights. (The stream's exactness across stage boundaries, same-layout
and elastic: tests/test_mixture_schedule.py; in a 2 x 2 launch with preemption and one-rank faults: the rehearsal.)"""

from __future__ import annotations

import json

from tests.conftest import DECODER, run_in_process

STEPS = 12
PER_STEP = 4 * 64  # batch 4 x 64-token blocks, one process, no accumulation


def test_a_scheduled_run_logs_and_cards_its_realized_mixture(tmp_path, shards):
    out = tmp_path / "run"
    sources = (f"[{{path: json, data_files: ['{shards}/part-0.jsonl', '{shards}/part-1.jsonl'], label: first}}, "
               f"{{path: json, data_files: ['{shards}/part-2.jsonl', '{shards}/part-3.jsonl'], label: second}}]")
    schedule = "[{until: 0.5, weights: {first: 0.75, second: 0.25}}, {until: 1.0, weights: {second: 1}}]"
    run_in_process(*DECODER, f"data.sources={sources}", f"data.schedule={schedule}", "data.mix_by=tokens",
                   f"scheduler.total_steps={STEPS}", "runtime.log_every_n_steps=1",
                   "runtime.evaluation.every_n_steps=null",
                   "runtime.logging.tensorboard=true", f"runtime.output_dir={out}")
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "data_stage" in r]
    assert [r["data_stage"] for r in rows] == [0] * (STEPS // 2) + [1] * (STEPS // 2)
    last = rows[-1]["stage_tokens"]
    assert sum(last["0"].values()) == sum(last["1"].values()) == STEPS // 2 * PER_STEP
    assert abs(last["0"]["first"] / sum(last["0"].values()) - 0.75) * STEPS // 2 * PER_STEP <= PER_STEP
    assert last["1"]["first"] == 0  # the source left at the stage
    assert sum(rows[-1]["source_tokens"].values()) >= STEPS * PER_STEP  # (read ahead: tokenized, not all trained)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("data_stage")] == [r["data_stage"] for r in rows]
    assert events.Scalars("stage_tokens/1/second")[-1].value == last["1"]["second"]
    card = (out / "export" / "README.md").read_text()
    assert "Mixture as trained" in card
    assert "stage 1 (until 1.0, 1,536 tokens): first 0.000 (0.000), second 1.000 (1.000)" in card


def test_a_two_process_run_killed_at_the_boundary_trains_as_the_uninterrupted_one(tmp_path, shards, bpe_800):
    """The recipe's shape in miniature under ``accelerate launch``: 2 processes x 2 DataLoader workers, gradient
    accumulation 2, micro-batch 2, document masking, the block shuffle, mixed by tokens with a stage boundary at step
    4 and a linear stage after it. Killed at the boundary, then resumed: every step's loss equals the uninterrupted
    run's (bit for bit, CPU fp32), and so does each rank's document trace."""
    from hf_streamlm.data.trace import read_trace
    from tests.test_resume_run import launch

    per_step = 2 * 2 * 2 * 64  # processes x accumulation x micro-batch x block
    sources = (f"[{{path: json, data_files: ['{shards}/part-0.jsonl', '{shards}/part-1.jsonl'], label: first}}, "
               f"{{path: json, data_files: ['{shards}/part-2.jsonl', '{shards}/part-3.jsonl'], label: second}}]")
    schedule = f"[{{until: {4 * per_step}, weights: {{first: 0.8, second: 0.2}}}}, " \
               "{until: 1.0, weights: {first: 0.2, second: 0.8}, interpolate: linear}]"
    args = [*DECODER, f"tokenizer.path={bpe_800}", f"data.sources={sources}", f"data.schedule={schedule}",
            "data.mix_by=tokens", "data.num_workers=2", "data.batch_size=2", "data.gradient_accumulation_steps=2",
            "data.document_masking=true", "data.block_shuffle_size=8", "data.trace_documents=true",
            "scheduler.strategy=constant", "scheduler.warmup_steps=0", "runtime.log_every_n_steps=1",
            "runtime.evaluation.every_n_steps=null", "runtime.checkpoint.every_n_steps=2", "scheduler.total_steps=9"]

    def losses(run):
        rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    reference = tmp_path / "reference"
    assert launch([*args, f"runtime.output_dir={reference}"], 2).returncode == 0
    resumed = tmp_path / "resumed"
    # The whole process group SIGKILLed at the boundary (a preempted pod); the resume trains through it and the
    # linear stage after it. (Stops before and after a boundary: tests/test_mixture_schedule.py, the rehearsal.)
    launch([*args, f"runtime.output_dir={resumed}"], 2, kill_after=4)
    result = launch([*args, f"runtime.output_dir={resumed}"], 2)
    assert result.returncode == 0, result.stderr[-3000:]
    want, got = losses(reference), losses(resumed)
    assert len(want) == 9 and got == want
    for rank in (0, 1):
        name = f"rank-{rank}.jsonl"
        assert read_trace(resumed / "trace" / name) == read_trace(reference / "trace" / name)
    rows = [json.loads(line) for line in (resumed / "history.jsonl").read_text().splitlines()]
    assert [r["data_stage"] for r in rows if "data_stage" in r] == [0] * 4 + [1] * 5
    # The realized mixture against the schedule (stage 1 moves linearly from 80/20 to 20/80: 50/50 on average):
    # within one document per reader (4 readers), and within one global batch.
    realized = [r for r in rows if "stage_tokens" in r][-1]["stage_tokens"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bpe_800))
    texts = [json.loads(line)["text"] for i in range(4)
             for line in (shards / f"part-{i}.jsonl").read_text().splitlines()]
    longest = max(len(ids) for ids in tokenizer(texts)["input_ids"]) + 1
    print("realized tokens per stage and source:", realized)
    for stage, planned in (("0", 0.8), ("1", 0.5)):
        counts = realized[stage]
        assert sum(counts.values()) == (4 if stage == "0" else 5) * per_step
        off = abs(counts["first"] - planned * sum(counts.values()))
        assert off <= 4 * longest and off <= per_step, (stage, counts, longest)  # (here: 279 and 206 of 512)
