"""``hf-streamlm stats`` and :func:`pipeline_stats`: exact counts on a tiny corpus whose token counts
are known without the tokenizer, and the command on every offline recipe."""

from __future__ import annotations

import json
import statistics

import pytest

from hf_streamlm import cli
from hf_streamlm.config import load_config
from hf_streamlm.data.stats import pipeline_stats
from hf_streamlm.tokenizer import train_tokenizer
from tests.conftest import run_cli

# Lowercase words and single spaces only: a word-level tokenizer gives exactly one token per word.
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
LENGTHS = [3, 5, 8, 1, 12, 4, 6]
TEXTS = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) for i, n in enumerate(LENGTHS)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer(TEXTS, kind="wordlevel", vocab_size=100, min_frequency=1)
    tok.eos_token = "[SEP]"  # lets the same tokenizer serve the decoder's "x <eos>" documents
    return tok


def tiny_config(path, *overrides):
    return load_config([
        f"data.sources=[{{path: json, data_files: '{path}'}}]",
        "data.eval_holdout=0",
        "data.sequence_length=8",
        "data.batch_size=2",
        *overrides,
    ])


@pytest.mark.parametrize(("model", "separators"), [("microbert", 2), ("decoder", 1)])
def test_counts_are_exact(tmp_path, tokenizer, model, separators):
    corpus = write_jsonl(tmp_path / "tiny.jsonl", TEXTS)
    extra = ["model.type=decoder", "tokenizer.kind=bpe"] if model == "decoder" else []
    stats = pipeline_stats(tiny_config(corpus, *extra), tokenizer, max_docs=100)
    per_doc = [n + separators for n in LENGTHS]
    assert stats["docs"] == len(TEXTS)
    assert sorted(stats["doc_tokens"]) == sorted(per_doc)  # in training (shuffled) order
    assert stats["tokens"] == sum(per_doc)
    assert stats["median_tokens"] == statistics.median(per_doc)
    assert stats["avg_tokens"] == pytest.approx(sum(per_doc) / len(TEXTS))
    assert stats["blocks"] == sum(per_doc) // 8  # drop_last: the partial tail block is dropped
    assert stats["block_tokens"] == stats["blocks"] * 8
    assert stats["batches"] == -(-stats["blocks"] // 2)
    assert stats["bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in TEXTS) / sum(per_doc))
    assert stats["sources"] == {f"json:{corpus}": len(TEXTS)}
    assert stats["docs_per_s"] > 0 and stats["tokens_per_s"] > 0


def test_max_docs_takes_the_head_and_pads_the_tail(tmp_path, tokenizer):
    corpus = write_jsonl(tmp_path / "tiny.jsonl", TEXTS)
    stats = pipeline_stats(tiny_config(corpus, "data.drop_last=false"), tokenizer, max_docs=4)
    tokens = sum(n + 2 for n in LENGTHS[:4])
    assert (stats["docs"], stats["tokens"], stats["block_tokens"]) == (4, tokens, tokens)
    assert stats["blocks"] == -(-tokens // 8)


def test_docs_per_source_in_a_mixture(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    b = write_jsonl(tmp_path / "b.jsonl", [t.upper() for t in TEXTS[:3]])
    config = tiny_config(a, f"data.sources=[{{path: json, data_files: '{a}'}}, {{path: json, data_files: '{b}'}}]")
    stats = pipeline_stats(config, tokenizer, max_docs=100)
    assert set(stats["sources"]) == {f"json:{a}", f"json:{b}"}
    assert sum(stats["sources"].values()) == stats["docs"]
    assert stats["sources"][f"json:{a}"] == len(TEXTS)  # all_exhausted: every document of the longer source


def stats_cli(tmp_path, *args):
    # Run from an empty folder so no saved runs/<experiment>/tokenizer is picked up.
    return run_cli("-m", "hf_streamlm.cli", "stats", *args, cwd=tmp_path, timeout=120)


def stats_in_process(tmp_path, monkeypatch, capsys, *args) -> str:
    """The command's main in this process (the console script's dispatch), from an empty folder; its stdout."""
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["stats", *args]) == 0
    return capsys.readouterr().out


def check_json(stats: dict) -> None:
    assert {"docs", "tokens", "tokens_per_s", "avg_tokens", "median_tokens", "blocks", "batches",
            "bytes_per_token", "docs_per_s", "sources"} <= stats.keys()
    assert stats["docs"] == 200 and stats["max_docs_default"] is False
    assert stats["tokens"] > stats["docs"] and stats["tokens_per_s"] > 0


def test_cli_json(tmp_path):
    """The console script's process: exactly one JSON object on its stdout, its logs on stderr."""
    proc = stats_cli(tmp_path, "recipe=quickstart", "data.max_samples=200", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    check_json(json.loads(proc.stdout))


def test_cli_json_decoder_in_process(tmp_path, monkeypatch, capsys):
    check_json(json.loads(stats_in_process(tmp_path, monkeypatch, capsys, "recipe=quickstart_decoder",
                                           "data.max_samples=200", "--json")))


def test_cli_table_and_plot(tmp_path, monkeypatch, capsys):
    plot = tmp_path / "out" / "tokens.png"
    out = stats_in_process(tmp_path, monkeypatch, capsys, "recipe=quickstart", "--plot", str(plot))
    assert "first 1000 documents (default" in out  # the recipe leaves data.max_samples null
    for label in ("docs", "tokens", "median tokens/doc", "bytes/token", "tokens/s"):
        assert f"  {label} " in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["--bogus"], ["--plot"], ["data.max_sample=5"]])
def test_bad_arguments_exit_2_with_one_line(args, capsys):
    # In process (the dispatch is the same as the console script's); fails before any data is read.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["stats", "recipe=quickstart", *args])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("hf-streamlm: error:")
