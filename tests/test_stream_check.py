"""The stream check of a resume (issue #25, ``hf_streamlm.train.elastic``): every key of ``data``, of a source and
of ``tokenizer`` is classified (a new field left out fails here); a change of a key that changes the stream is
one line naming it (exit 2), document masking and the shuffle buffer included; a source's pin left unset is the
checkpoint's (filled first, no special case); a changed batch size on the same layout keeps every document of a
pass once."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest

from hf_streamlm.config import ConfigError, DataConfig, SourceConfig, TokenizerConfig, load_config
from hf_streamlm.data.stream import document_key
from hf_streamlm.data.trace import read_trace
from hf_streamlm.train.elastic import DATA_KEYS, SOURCE_KEYS, STREAM, STREAM_KEYS, TOKENIZER_KEYS, check_same_stream
from tests.conftest import DECODER, main_refuses, run_in_process, two_source_corpus


@pytest.mark.parametrize("section, table", [(DataConfig, DATA_KEYS), (SourceConfig, SOURCE_KEYS),
                                            (TokenizerConfig, TOKENIZER_KEYS)])
def test_every_field_is_classified(section, table):
    """A field added to DataConfig (or a source, or the tokenizer) must say what a resume does with it: refused
    as a change of the stream, handled (and how), or not the stream (and why)."""
    fields = {f.name for f in dataclasses.fields(section)}
    assert fields - set(table) == set(), f"classify {sorted(fields - set(table))} in hf_streamlm.train.elastic"
    assert set(table) - fields == set(), f"{sorted(set(table) - fields)} are not fields of {section.__name__}"
    for name, what in table.items():
        assert what == STREAM or what.startswith(("handled: ", "not the stream", "not the training stream")), name
    assert {"document_masking", "shuffle_buffer_size", "sources", "sequence_length"} <= set(STREAM_KEYS["data"])


BASE = ["model.type=decoder", "tokenizer.kind=bpe", "data.sources=[{path: a.jsonl, fallbacks: [{path: b.jsonl}]}]", "data.sequence_length=32"]


@pytest.mark.parametrize("override, key", [
    ("data.document_masking=true", "data.document_masking"),
    ("data.shuffle_buffer_size=7", "data.shuffle_buffer_size"),
    ("data.sources=[{path: a.jsonl, pinned_revision: " + "b" * 40 + ", fallbacks: [{path: b.jsonl}]}]",
     "data.sources[0].pinned_revision"),
    ("data.sources=[{path: a.jsonl, fallbacks: [{path: b.jsonl, pinned_revision: " + "d" * 40 + "}]}]",
     "data.sources[0].fallbacks[0].pinned_revision"),
])
def test_a_changed_stream_key_is_one_line(override, key):
    old = load_config(BASE).to_dict()
    old["data"]["sources"][0]["pinned_revision"] = "a" * 40
    old["data"]["sources"][0]["fallbacks"][0]["pinned_revision"] = "c" * 40
    with pytest.raises(ConfigError) as err:
        check_same_stream(old, load_config(BASE + [override]))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{key} differs from the checkpoint's"), message


def test_pins_left_unset_are_the_checkpoints_and_other_keys_pass():
    """The same command again (no pin on it) reads the checkpoint's pins, of the source and of its fallback:
    not a change, and the config itself is left as it was (pin_hub_sources fills it next). Keys that are
    handled or not the stream pass; a checkpoint written before a key existed had its default."""
    old = load_config(BASE).to_dict()
    old["data"]["sources"][0]["pinned_revision"] = "a" * 40
    old["data"]["sources"][0]["fallbacks"][0]["pinned_revision"] = "c" * 40
    new = load_config(BASE + ["data.num_workers=2", "data.batch_size=3", "data.mlm_probability=0.2",
                              "data.trace_documents=true", "data.retries=3", "tokenizer.train_samples=7"])
    check_same_stream(old, new)
    assert new.data.sources[0].pinned_revision is None
    del old["data"]["document_masking"]  # an older checkpoint: the default (false)
    del old["data"]["sources"][0]["cache"]
    check_same_stream(old, new)
    with pytest.raises(ConfigError, match="^data.document_masking differs"):
        check_same_stream(old, load_config(BASE + ["data.document_masking=true"]))


def test_document_masking_or_the_shuffle_buffer_changed_at_a_resume_is_exit_2(tmp_path, bpe_500, capsys,
                                                                            reset_accelerate):
    """A real run's checkpoint resumed with document masking turned on (it used to be accepted, then crash at
    the first step with a shape error) or another shuffle buffer: exit 2, one line naming the key."""
    out = tmp_path / "run"
    args = [*DECODER, f"tokenizer.path={bpe_500}", "data.document_masking=false", "scheduler.total_steps=2",
            "runtime.evaluation.every_n_steps=null", f"runtime.output_dir={out}"]
    run_in_process(*args)
    for override, key in (("data.document_masking=true", "data.document_masking"),
                          ("data.shuffle_buffer_size=20", "data.shuffle_buffer_size")):
        err = main_refuses([*args, "scheduler.total_steps=4", override], capsys)
        errors = [line for line in err.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith(f"hf-streamlm: error: {key} differs from the checkpoint's"), err


def traced(run) -> Counter:
    """``(key, pass)`` of every document in the trace, with its count."""
    return Counter((k, e) for row in read_trace(run / "trace" / "rank-0.jsonl") for _, k, e in row["docs"])


def test_a_smaller_batch_size_on_the_same_layout_trains_each_document_once(tmp_path, bpe_800, capsys):
    """Two DataLoader workers, batch 8, stopped after step 3 (the workers' snapshots are older than the batches
    consumed: the data state replays them); resumed on the same layout with batch 4 (accumulation 1 -> 2, the
    same sequences per step) on to step 11 (past the first pass): no document trained twice in a pass, every document of the first
    pass trained, the tokens per step kept. Replayed at the new batch size, the workers' batches landed short
    of where they stood: documents of the first steps came again."""
    docs = [f"{document_key(t):016x}" for t in two_source_corpus(tmp_path, (60, 6))[0]]
    out = tmp_path / "run"
    args = ["recipe=quickstart_decoder", f"data.sources=[{{path: json, data_files: '{tmp_path}/a-*.jsonl'}}]",
            f"tokenizer.path={bpe_800}", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
            "model.max_position_embeddings=64", "data.sequence_length=64", "data.num_workers=2",
            "data.shuffle_buffer_size=50", "data.eval_holdout=0", "data.trace_documents=true",
            "scheduler.warmup_steps=1", "runtime.log_every_n_steps=1", "runtime.checkpoint.every_n_steps=3",
            "runtime.evaluation.every_n_steps=null", "runtime.logging.progress_bar=false",
            "runtime.logging.tensorboard=false", "runtime.demo_sentences=[]", f"runtime.output_dir={out}"]
    run_in_process(*args, "data.batch_size=8", "scheduler.total_steps=3")
    capsys.readouterr()
    run_in_process(*args, "data.batch_size=4", "scheduler.total_steps=11")
    printed = capsys.readouterr().out
    got = traced(out)
    assert not {k: n for k, n in got.items() if n > 1}, "documents trained twice in a pass"
    assert {k for k, e in got if e == 0} == set(docs)
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in rows if "loss" in r]
    assert [b - a for a, b in zip(tokens, tokens[1:])] == [8 * 64] * 10
    assert "data.batch_size 8 -> 4: the data state was handed over" in printed, printed[-2000:]
