"""The processed-data cache: keys, build-once/load-after, incomplete entries, shards, and ``hf-streamlm cache``."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from hf_streamlm import cli
from hf_streamlm.config import SourceConfig
from hf_streamlm.data.cache import (
    META,
    cache_entries,
    cache_key,
    cache_root,
    cache_usage,
    cached_source,
    clear_cache,
)

CONSOLE_SCRIPT = Path(sys.executable).parent / "hf-streamlm"


def write_jsonl(path: Path, n: int, prefix: str = "doc") -> Path:
    path.write_text("".join(json.dumps({"text": f"{prefix} number {i}", "id": i}) + "\n" for i in range(n)))
    return path


class CountingBuild:
    """A real build function: streams the source's file and counts how often it is asked to."""

    def __init__(self, source: SourceConfig):
        self.source, self.calls = source, 0

    def __call__(self) -> datasets.IterableDataset:
        self.calls += 1
        return datasets.load_dataset("json", data_files=self.source.data_files, split="train", streaming=True)


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", 100)


def test_key_is_stable_and_ignores_weight_and_delivery(corpus):
    source = SourceConfig(path="json", data_files=str(corpus))
    key = cache_key(source, {"min_words": 0})
    assert key == cache_key(SourceConfig(path="json", data_files=str(corpus)), {"min_words": 0})
    assert all(c in "0123456789abcdef" for c in key)
    for same in ({"weight": 3.0}, {"streaming": False}, {"cache": True}):
        assert cache_key(dataclasses.replace(source, **same), {"min_words": 0}) == key, same


@pytest.mark.parametrize("change", [
    {"path": "parquet"}, {"name": "other"}, {"split": "validation"}, {"revision": "v2"},
    {"text_column": "body"}, {"min_words": 5}, {"max_samples": 10},
])
def test_key_changes_with_every_content_field(corpus, change):
    source = SourceConfig(path="json", data_files=str(corpus))
    assert cache_key(dataclasses.replace(source, **change), {}) != cache_key(source, {})


def test_key_changes_with_extra_and_with_the_files(tmp_path, corpus):
    source = SourceConfig(path="json", data_files=str(tmp_path / "*.jsonl"))  # a glob: expanded and stat'ed
    key = cache_key(source, {"min_words": 0})
    assert cache_key(source, {"min_words": 3}) != key

    st = corpus.stat()
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touch: same bytes, newer mtime
    touched = cache_key(source, {"min_words": 0})
    assert touched != key

    corpus.write_text(corpus.read_text().replace("doc", "DOC"))  # same size, new content and mtime
    assert cache_key(source, {"min_words": 0}) not in (key, touched)

    edited = cache_key(source, {"min_words": 0})
    write_jsonl(tmp_path / "more.jsonl", 3)  # a new file matching the glob
    assert cache_key(source, {"min_words": 0}) != edited


def test_first_call_builds_second_loads_the_same_rows(tmp_path, corpus, caplog):
    source = SourceConfig(path="json", data_files=str(corpus))
    build, cache_dir = CountingBuild(source), str(tmp_path / "cache")
    expected = list(build())
    build.calls = 0

    with caplog.at_level(logging.INFO, logger="hf_streamlm.data.cache"):
        first = list(cached_source(source, build, cache_dir, {"min_words": 0}))
        second = list(cached_source(source, build, cache_dir, {"min_words": 0}))
    assert build.calls == 1
    assert first == second == expected  # same rows, same order
    assert "caching json:" in caplog.text and "cache hit" in caplog.text and "(100 docs)" in caplog.text

    key = cache_key(source, {"min_words": 0})
    meta = json.loads((cache_root(cache_dir) / key / META).read_text())
    assert (meta["key"], meta["docs"], meta["source"]["data_files"]) == (key, 100, str(corpus))
    assert meta["bytes"] > 0
    assert [p.name for p in cache_root(cache_dir).iterdir()] == [key]  # no temporary folder left behind

    # A different extra (e.g. data.min_words) is a different entry: built again.
    list(cached_source(source, build, cache_dir, {"min_words": 2}))
    assert build.calls == 2


def test_incomplete_entry_is_rebuilt(tmp_path, corpus):
    source = SourceConfig(path="json", data_files=str(corpus))
    build, cache_dir = CountingBuild(source), str(tmp_path / "cache")
    rows = list(cached_source(source, build, cache_dir, {}))
    entry = cache_root(cache_dir) / cache_key(source, {})
    (entry / META).unlink()  # as if a build died before finishing
    assert cache_entries(cache_dir) == []

    assert list(cached_source(source, build, cache_dir, {})) == rows
    assert build.calls == 2
    assert (entry / META).is_file()
    list(cached_source(source, build, cache_dir, {}))
    assert build.calls == 2


def test_entry_is_sharded_for_workers_and_ranks(tmp_path, corpus):
    source = SourceConfig(path="json", data_files=str(corpus))
    ds = cached_source(source, CountingBuild(source), str(tmp_path / "cache"), {})
    assert ds.n_shards == 8
    assert cached_source(source, CountingBuild(source), str(tmp_path / "cache"), {}, num_shards=4).n_shards == 4
    # Two ranks split the shards between them and together see every document once.
    halves = [list(datasets.distributed.split_dataset_by_node(ds, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(row["id"] for half in halves for row in half) == list(range(100))
    assert halves[0] and halves[1]

    small = SourceConfig(path="json", data_files=str(write_jsonl(tmp_path / "small.jsonl", 3)))
    assert cached_source(small, CountingBuild(small), str(tmp_path / "cache"), {}).n_shards == 3


def test_empty_stream_is_cached_as_zero_docs(tmp_path):
    source = SourceConfig(path="json", data_files=str(tmp_path / "none.jsonl"), min_words=1000)
    calls = []

    def build() -> datasets.IterableDataset:
        calls.append(1)
        features = datasets.Features({"text": datasets.Value("string")})
        return datasets.IterableDataset.from_generator(lambda: iter(()), features=features)

    assert list(cached_source(source, build, str(tmp_path / "cache"), {})) == []
    assert list(cached_source(source, build, str(tmp_path / "cache"), {})) == []
    assert len(calls) == 1
    assert cache_entries(str(tmp_path / "cache"))[0]["docs"] == 0


def test_a_concurrent_writer_wins_and_ours_is_discarded(tmp_path, corpus):
    """The final folder appears while we build (another process finished first): keep theirs, drop ours."""
    source = SourceConfig(path="json", data_files=str(corpus))
    cache_dir = str(tmp_path / "cache")
    other = CountingBuild(source)

    def build() -> datasets.IterableDataset:
        list(cached_source(source, other, cache_dir, {}))  # the "other process" completes the entry now
        return CountingBuild(source)()

    rows = list(cached_source(source, build, cache_dir, {}))
    assert other.calls == 1 and len(rows) == 100
    assert [p.name for p in cache_root(cache_dir).iterdir()] == [cache_key(source, {})]


def _two_entries(tmp_path) -> tuple[str, list[str]]:
    cache_dir = str(tmp_path / "cache")
    keys = []
    for name, n in (("a.jsonl", 20), ("b.jsonl", 30)):
        source = SourceConfig(path="json", data_files=str(write_jsonl(tmp_path / name, n, prefix=name)))
        list(cached_source(source, CountingBuild(source), cache_dir, {}))
        keys.append(cache_key(source, {}))
    return cache_dir, keys


def test_entries_usage_and_clear(tmp_path):
    cache_dir, keys = _two_entries(tmp_path)
    entries = cache_entries(cache_dir)
    assert sorted(e["key"] for e in entries) == sorted(keys)
    assert {e["docs"] for e in entries} == {20, 30}
    assert cache_usage(cache_dir) >= sum(e["size"] for e in entries) > 0

    # A temporary folder of a build whose process is gone is stale; clear removes it with the entries.
    # A running build's (this process) is kept.
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    stale = cache_root(cache_dir) / f".tmp-{keys[0]}-{socket.gethostname()}-{done.pid}-0000"
    live = cache_root(cache_dir) / f".tmp-{keys[1]}-{socket.gethostname()}-{os.getpid()}-0000"
    stale.mkdir()
    live.mkdir()
    assert clear_cache(cache_dir, keys[0][:10]) == 1
    assert not stale.exists() and live.exists()
    assert [e["key"] for e in cache_entries(cache_dir)] == [keys[1]]
    assert clear_cache(cache_dir) == 1
    assert cache_entries(cache_dir) == [] and cache_usage(cache_dir) == 0


def test_cli_info_usage_clear(tmp_path, capsys):
    cache_dir, keys = _two_entries(tmp_path)

    # The installed console script, for real.
    out = subprocess.run([str(CONSOLE_SCRIPT), "cache", "info", "--cache-dir", cache_dir],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2
    assert {line.split()[0] for line in lines} == {k[:12] for k in keys}
    assert any("a.jsonl" in line and "20 docs" in line for line in lines)

    assert cli.main(["cache", "usage", "--cache-dir", cache_dir, "--json"]) == 0
    usage = json.loads(capsys.readouterr().out)
    assert usage["bytes"] == cache_usage(cache_dir) > 0
    assert cli.main(["cache", "usage", "--cache-dir", cache_dir]) == 0
    assert "KiB" in capsys.readouterr().out

    assert cli.main(["cache", "clear", "--cache-dir", cache_dir, "--key", keys[0]]) == 0
    assert "removed 1 cache entry" in capsys.readouterr().out
    assert [e["key"] for e in cache_entries(cache_dir)] == [keys[1]]  # only that entry went

    with pytest.raises(SystemExit):
        cli.main(["cache", "clear", "--cache-dir", cache_dir, "--key", keys[0]])  # already gone
    assert "no cache entry with key" in capsys.readouterr().err

    assert cli.main(["cache", "clear", "--cache-dir", cache_dir]) == 0
    assert "removed 1 cache entry" in capsys.readouterr().out
    assert cli.main(["cache", "info", "--cache-dir", cache_dir]) == 0
    assert "cache is empty" in capsys.readouterr().out


def test_cli_defaults_to_dataset_cache_here(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = SourceConfig(path="json", data_files=str(write_jsonl(tmp_path / "c.jsonl", 5)))
    list(cached_source(source, CountingBuild(source), None, {}))
    assert (tmp_path / ".dataset_cache" / "processed" / cache_key(source, {}) / META).is_file()
    assert cli.main(["cache", "info", "--json"]) == 0
    assert [e["docs"] for e in json.loads(capsys.readouterr().out)] == [5]
    with pytest.raises(SystemExit):
        cli.main(["cache", "info", "recipe=quickstart", "--cache-dir", "x"])


def test_training_stream_reads_a_cached_source_the_second_time(tmp_path):
    """``cache: true`` wired into the sources: the first open writes the entry, the second reads it,
    and both give the same documents."""
    from hf_streamlm.config import load_config
    from hf_streamlm.data.cache import cache_entries
    from hf_streamlm.data.pipeline import iter_rows

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document number {i} here"}) + "\n" for i in range(50)))
    config = load_config([f"data.sources=[{{path: json, data_files: '{data}', cache: true, min_words: 4}}]",
                          f"data.cache_dir={tmp_path / 'cache'}", "data.eval_holdout=0"])
    first = list(iter_rows(config))
    (entry,) = cache_entries(str(tmp_path / "cache"))
    assert entry["docs"] == 50
    second = list(iter_rows(config))
    (again,) = cache_entries(str(tmp_path / "cache"))
    assert again["created"] == entry["created"]  # reused, not rebuilt
    assert first == second == [(f"document number {i} here", 0) for i in range(50)]
