"""Bad input: each kind is a counted, logged skip or one clear line naming the file — never a
traceback, never a silent drop."""

from __future__ import annotations

import json

import pytest

from hf_streamlm.config import ConfigError, load_config
from hf_streamlm.data.packing import pack
from hf_streamlm.data.pipeline import describe_read_failure, iter_rows
from hf_streamlm.data.quality import skip_counter
from tests.conftest import main_refuses, run_in_process


def config_for(files: str, *extra: str):
    return load_config([f"data.sources=[{{path: json, data_files: '{files}'}}]", "data.eval_holdout=0", *extra])


def test_empty_none_non_text_and_short_documents_are_counted(tmp_path):
    rows = [{"text": "a real document here"}, {"text": ""}, {"text": "   \n\t"}, {"text": None},
            {"text": "two words"}, {"text": "another real document"}, {"text": None}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = config_for(str(path), "data.min_words=3")
    kept = [t for t, _ in iter_rows(config, skips_key="t1")]
    assert kept == ["a real document here", "another real document"]
    assert dict(skip_counter("t1")) == {"empty": 2, "none": 2, "short": 1}  # every row accounted for


def test_non_text_values_in_a_text_column_are_counted(tmp_path):
    path = tmp_path / "mixed_types.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["fine text", 42, ["a", "list"], "more text"]))
    kept = [t for t, _ in iter_rows(config_for(str(path)), skips_key="t2")]
    assert kept == ["fine text", "more text"]
    assert skip_counter("t2")["not_text"] == 2


def test_a_numeric_text_column_is_one_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), path)
    with pytest.raises(ConfigError, match="column 'text' holds int64, not text"):
        list(iter_rows(load_config([f"data.sources=[{{path: parquet, data_files: '{path}'}}]", "data.eval_holdout=0"])))


def test_an_all_empty_shard_is_skipped_and_counted(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i} words"}) + "\n" for i in range(3)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": " "}) + "\n" for _ in range(4)))
    kept = list(iter_rows(config_for(f"{tmp_path}/*.jsonl"), skips_key="t3"))
    assert len(kept) == 3 and skip_counter("t3")["empty"] == 4


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b'{"text": "ok"}\n{"text": "bad \xff bytes"}\n', "line 2 is not UTF-8"),
     (b'{"text": "ok"}\n{"text": "unterminated}\n{"text": "after"}\n', "line 2 is not valid JSON")],
)
def test_unreadable_files_are_named_with_their_line(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    config = config_for(str(path))
    message = describe_read_failure(config, ValueError("parse error"))
    assert str(path) in message and needle in message


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_an_unreadable_file_stops_with_one_line(tmp_path, workers, capfd, reset_accelerate):
    """``hf_streamlm.run``'s main in this process (conftest ``main_refuses``); its stderr read at the file
    descriptor, so what a DataLoader worker writes there is read too."""
    for i in range(2):
        (tmp_path / f"part-{i}.jsonl").write_text("".join(json.dumps({"text": f"doc {j} " * 20}) + "\n" for j in range(30)))
    (tmp_path / "part-1.jsonl").write_bytes((tmp_path / "part-1.jsonl").read_bytes() + b'{"text": "\xff\xfe"}\n')
    err = main_refuses(["recipe=quickstart", f"data.sources=[{{path: json, data_files: '{tmp_path}/part-*.jsonl'}}]",
                        f"data.num_workers={workers}", "data.shuffle_buffer_size=0", "scheduler.total_steps=40",
                        "scheduler.warmup_steps=1", "tokenizer.vocab_size=500", "tokenizer.train_samples=20",
                        f"runtime.output_dir={tmp_path / 'run'}", "runtime.logging.progress_bar=false"], capfd)
    line = err.strip().splitlines()[-1]
    assert "part-1.jsonl line 31 is not UTF-8" in line


def test_a_10mb_document_is_split_across_blocks_with_bounded_memory():
    doc = list(range(2_500_000))  # ~10 MB of text is ~2.5M tokens
    blocks = pack(iter([doc, [7, 7]]), 128, drop_last=True)
    n = 0
    for i, block in enumerate(blocks):
        assert block["input_ids"][0] == (i * 128 if i * 128 < len(doc) else block["input_ids"][0])
        n += 1
    assert n == (len(doc) + 2) // 128


def test_history_reports_skipped_documents(tmp_path):
    """The run is ``main`` in this process (conftest ``run_in_process``)."""
    rows = [{"text": f"real document number {i} " * 5} for i in range(60)] + [{"text": ""}] * 5 + [{"text": None}] * 3
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run_in_process("recipe=quickstart", f"data.sources=[{{path: json, data_files: '{path}'}}]", "data.eval_holdout=0",
                   "scheduler.total_steps=4", "scheduler.warmup_steps=1", "runtime.log_every_n_steps=4",
                   "tokenizer.vocab_size=300", "data.shuffle_buffer_size=0", "data.batch_size=2",
                   f"runtime.output_dir={out}", "runtime.logging.progress_bar=false", "runtime.demo_sentences=[]")
    row = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    # counted per pass the reader made over the file (it cycles, and reads ahead of training)
    skipped = row["skipped"]
    assert set(skipped) == {"none", "empty"} and skipped["none"] >= 3 and skipped["none"] * 5 == skipped["empty"] * 3


def test_a_source_that_yields_nothing_is_one_line(tmp_path, capsys, reset_accelerate):
    """``hf_streamlm.run``'s main in this process, as tests/test_run_launch.py's bad-input cases (an
    interpreter start each was ~10 s; the console script's own process is checked there)."""
    path = tmp_path / "blank.jsonl"
    path.write_text("".join(json.dumps({"text": "  "}) + "\n" for _ in range(10)))
    err = main_refuses(["recipe=quickstart_decoder", f"data.sources=[{{path: json, data_files: '{path}'}}]",
                        "tokenizer.path=" + str(tmp_path / "none"), f"runtime.output_dir={tmp_path / 'run'}"], capsys)
    # the tokenizer folder does not exist: that is reported first, in one line
    assert len(err.strip().splitlines()) == 1, err
    err = main_refuses(["recipe=quickstart_decoder", f"data.sources=[{{path: json, data_files: '{path}'}}]",
                        f"runtime.output_dir={tmp_path / 'run'}"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("hf-streamlm: error:")]
    assert len(errors) == 1 and ("no documents" in errors[0] or "no full batch" in errors[0]), err[-1500:]


def test_stats_reports_skips_by_kind(tmp_path):
    from hf_streamlm.data.stats import pipeline_stats
    from hf_streamlm.tokenizer import train_tokenizer

    rows = [{"text": f"doc {i} has some words"} for i in range(30)] + [{"text": ""}] * 4 + [{"text": None}] * 2
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = config_for(str(path))
    tok = train_tokenizer([r["text"] for r in rows if r["text"]], "wordpiece", vocab_size=200, min_frequency=1)
    stats = pipeline_stats(config, tok, max_docs=100)
    assert stats["docs"] == 30 and stats["skipped"] == {"empty": 4, "none": 2}
