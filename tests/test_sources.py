"""Sources: fallback chain, column errors, filters and caps, mixture weights and per-source counts,
and the warning when there are fewer shards than DataLoader workers."""

from __future__ import annotations

import json
import logging

import pytest

from hf_streamlm.config import ConfigError, load_config
from hf_streamlm.data.pipeline import iter_rows, open_mixture, source_names, usable_workers


def write_jsonl(path, texts, column="text"):
    path.write_text("".join(json.dumps({column: t}) + "\n" for t in texts))
    return path


def config_with(sources: str, *extra: str):
    return load_config([f"data.sources={sources}", "data.eval_holdout=0", *extra])


def test_fallback_chain_uses_first_source_that_opens_and_says_why(tmp_path, caplog):
    good = write_jsonl(tmp_path / "good.jsonl", [f"doc {i} with some words" for i in range(5)])
    wrong_column = write_jsonl(tmp_path / "body.jsonl", ["x y z"], column="body")
    config = config_with(
        f"[{{path: json, data_files: '{tmp_path}/missing.jsonl', fallbacks: ["
        f"{{path: json, data_files: '{wrong_column}'}}, {{path: json, data_files: '{good}'}}]}}]"
    )
    with caplog.at_level(logging.INFO, logger="hf_streamlm.data.sources"):
        rows = list(iter_rows(config))
    assert [t for t, _ in rows] == [f"doc {i} with some words" for i in range(5)]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert f"using json:{good}" in message
    assert "missing.jsonl: FileNotFoundError" in message and "no column 'text'" in message


def test_all_fallbacks_failing_is_one_clear_error(tmp_path):
    config = config_with(f"[{{path: json, data_files: '{tmp_path}/a.jsonl', fallbacks: "
                         f"[{{path: json, data_files: '{tmp_path}/b.jsonl'}}]}}]")
    with pytest.raises(ConfigError, match="no source of data.sources\\[0\\] could be opened: .*a.jsonl.*b.jsonl"):
        open_mixture(config)


def test_missing_text_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["a b c"], column="content")
    with pytest.raises(ConfigError, match="no column 'text'; its columns are: content"):
        open_mixture(config_with(f"[{{path: json, data_files: '{path}'}}]"))
    rows = list(iter_rows(config_with(f"[{{path: json, data_files: '{path}', text_column: content}}]")))
    assert rows == [("a b c", 0)]


def test_min_words_and_max_samples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["one", "two words", "three little words", "four words right here", "x"])
    config = config_with(f"[{{path: json, data_files: '{path}', min_words: 2, max_samples: 2}}]")
    assert [t for t, _ in iter_rows(config)] == ["two words", "three little words"]
    config = config_with(f"[{{path: json, data_files: '{path}'}}]", "data.min_words=3")
    assert [t for t, _ in iter_rows(config)] == ["three little words", "four words right here"]


def test_mixture_follows_weights_and_labels_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [f"a{i}" for i in range(4000)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"b{i}" for i in range(4000)])
    config = config_with(f"[{{path: json, data_files: '{a}', weight: 3}}, {{path: json, data_files: '{b}', weight: 1}}]",
                         "data.stopping_strategy=first_exhausted")
    rows = list(iter_rows(config, limit=2000))
    share_a = sum(1 for _, s in rows if s == 0) / len(rows)
    assert 0.7 < share_a < 0.8
    assert all(t.startswith("a") == (s == 0) for t, s in rows)
    assert source_names(config) == [f"json:{a}", f"json:{b}"]
    # seeded: the same order every time
    assert rows == list(iter_rows(config, limit=2000))


def test_fewer_shards_than_workers_is_logged_and_capped(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_streamlm.data.pipeline"):
        assert usable_workers(n_shards=1, requested=4) == 0
        assert usable_workers(n_shards=3, requested=8) == 3
        assert usable_workers(n_shards=8, requested=2) == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "only 1 shard" in warnings[0]
