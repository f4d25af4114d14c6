"""Tokenizers: the three kinds (special tokens, ids, AutoTokenizer, fill-mask), training from the
recipe's stream (document caps, the ``hf-streamlm tokenizer`` folder), byte-identical files across
processes, loading (folder, name, seed-004 files), the model's vocab_size, and the byte-level BPE
round trip (hypothesis)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
from functools import cache

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from hf_streamlm import cli
from hf_streamlm.config import ConfigError, TokenizerConfig, load_config
from hf_streamlm.data import iter_texts
from hf_streamlm.data.corpus import BUILTIN_CORPORA
from hf_streamlm.tokenizer import build_tokenizer, load_tokenizer, train_tokenizer
from hf_streamlm.tokenizer import train as train_module
from hf_streamlm.tokenizer.train import tokenizer_doc_limit
from hf_streamlm.train.builders import resolve_vocab_size
from tests.conftest import REPO, run_cli, run_in_process

BERT_IDS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
SAMPLE = "The function returns a new object; raise ValueError if x < 0. 日本語 😀 café\n\tend"


@cache
def pydocs() -> tuple[str, ...]:
    with gzip.open(BUILTIN_CORPORA["pydocs"], "rt", encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f)


@cache
def trained(kind: str):
    return train_tokenizer(pydocs()[:400], kind, vocab_size=1500, min_frequency=2)


def recipe(kind: str, *overrides: str):
    name = "quickstart_decoder" if kind == "bpe" else "quickstart"
    return load_config([f"recipe={name}", f"tokenizer.kind={kind}", *overrides])


# --- kinds -----------------------------------------------------------------------------------------


def test_bpe_special_tokens_ids_and_autotokenizer_folder(tmp_path):
    tok = trained("bpe")
    assert (tok.eos_token, tok.bos_token, tok.unk_token, tok.pad_token) == (
        "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    assert tok.mask_token is None and tok.cls_token is None
    assert tok("a b")["input_ids"] == tok.encode("a b", add_special_tokens=False)  # no template for BPE
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["clean_up_tokenization_spaces"] is False  # decode must not "clean up" spaces
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (0, 1, len(tok))
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    assert loaded.decode(loaded.encode(SAMPLE)) == SAMPLE
    assert loaded.convert_ids_to_tokens(loaded.encode("<|endoftext|>x<|pad|>")) == ["<|endoftext|>", "x", "<|pad|>"]


def test_bpe_for_a_masked_lm_is_roberta_style(tmp_path):
    """model.type=microbert with tokenizer.kind=bpe: RoBERTa's specials and template, in the stream's build too."""
    tok = train_tokenizer(pydocs()[:400], "bpe", vocab_size=1500, min_frequency=2, mlm=True)
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<mask>")] == [0, 1, 2, 3]
    assert (tok.cls_token, tok.bos_token, tok.sep_token, tok.eos_token, tok.pad_token, tok.mask_token) == (
        "<s>", "<s>", "</s>", "</s>", "<pad>", "<mask>")
    body = tok.encode("the function returns", add_special_tokens=False)
    assert tok("the function returns")["input_ids"] == [0, *body, 2]  # <s> X </s>
    # <mask> takes the space before it, so the model is asked for " new" (the token it was trained to predict there),
    # not for a word after a stray "Ġ".
    pieces = lambda text: tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))  # noqa: E731
    assert pieces("a new object") == ["a", "Ġnew", "Ġobject"]
    assert pieces("a <mask> object") == ["a", "<mask>", "Ġobject"]
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode("a <mask> object. " + SAMPLE) == tok.encode("a <mask> object. " + SAMPLE)
    assert loaded.decode(loaded.encode(SAMPLE), skip_special_tokens=True) == SAMPLE  # byte-level: any text round-trips
    assert loaded.mask_token_id == 3 and "token_type_ids" in loaded("x")  # what BertForMaskedLM takes

    built = build_tokenizer(load_config(["recipe=quickstart", "tokenizer.kind=bpe", "tokenizer.vocab_size=600",
                                         "data.max_samples=150"]))
    assert (built.cls_token_id, built.pad_token_id, built.sep_token_id, built.mask_token_id) == (0, 1, 2, 3)
    assert built.encode("x")[0] == 0 and built.encode("x")[-1] == 2


@pytest.mark.parametrize("kind", ["wordpiece", "wordlevel"])
def test_bert_kinds_special_tokens_ids_and_autotokenizer_folder(tmp_path, kind):
    tok = trained(kind)
    for name, token in BERT_IDS.items():
        assert tok.convert_tokens_to_ids(name) == token
    assert (tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token) == tuple(BERT_IDS)
    assert tok.mask_token_id == 4 and sorted(tok.all_special_ids) == [0, 1, 2, 3, 4]
    ids = tok.encode("the function [MASK] a value")
    assert ids[0] == 2 and ids[-1] == 3 and 4 in ids  # [CLS] ... [MASK] ... [SEP]; [MASK] is kept whole
    pair = tok("first text", "second text")
    assert pair["input_ids"].count(3) == 2 and set(pair["token_type_ids"]) == {0, 1}
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.mask_token == "[MASK]" and loaded.mask_token_id == 4 and len(loaded) == len(tok)
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    assert loaded.decode(loaded.encode("The Function returns"), skip_special_tokens=True) == "the function returns"
    if kind == "wordpiece":
        vocab = loaded.get_vocab()
        assert "##s" in vocab and not any(t.startswith("##") for t in loaded.all_special_tokens)
        assert loaded.tokenize("functions") in (["functions"], ["function", "##s"])


@pytest.mark.parametrize("kind", ["wordpiece", "wordlevel"])
def test_fill_mask_pipeline_runs_on_the_saved_folder(tmp_path, kind):
    import torch
    from transformers import BertConfig, BertForMaskedLM, pipeline

    trained(kind).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, pad_token_id=tok.pad_token_id))
    fill = pipeline("fill-mask", model=model, tokenizer=tok)
    preds = fill(f"the function returns a new {tok.mask_token} object.", top_k=5)
    assert len(preds) == 5 and all(0 <= p["score"] <= 1 for p in preds)


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        train_tokenizer(["a b"], "sentencepiece")


# --- training from the stream: caps, the CLI folder ----------------------------------------------


@pytest.mark.parametrize(("train_samples", "max_samples", "expected"), [
    (None, None, None), (20000, None, 20000), (None, 300, 300), (200, 300, 200), (500, 300, 300),
])
def test_doc_limit_is_the_smaller_cap(train_samples, max_samples, expected):
    config = load_config([f"tokenizer.train_samples={'null' if train_samples is None else train_samples}",
                          f"data.max_samples={'null' if max_samples is None else max_samples}"])
    assert tokenizer_doc_limit(config) == expected


def test_max_samples_caps_the_stream_and_given_texts():
    config = recipe("bpe", "tokenizer.vocab_size=600", "data.max_samples=150")
    assert config.tokenizer.train_samples is None
    first = list(iter_texts(config, limit=150))
    assert len(first) == 150 and list(iter_texts(config, limit=151))[:150] == first  # stream order
    expected = train_tokenizer(first, "bpe", 600, 2).backend_tokenizer.to_str()
    assert build_tokenizer(config).backend_tokenizer.to_str() == expected  # from the stream
    assert build_tokenizer(config, iter(pydocs())).backend_tokenizer.to_str() != expected
    capped = build_tokenizer(config, iter(first + ["zzqx zzqx zzqx"] * 50))  # the extra documents are not read
    assert capped.backend_tokenizer.to_str() == expected


def test_cli_writes_a_loadable_folder_from_the_capped_stream(tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO, logger="hf_streamlm.tokenizer.train")
    out = tmp_path / "tok"
    code = cli.main(["tokenizer", "recipe=quickstart_decoder", "tokenizer.vocab_size=700", "data.max_samples=120",
                     "--output", str(out)])
    assert code == 0
    captured = capfd.readouterr()
    assert f"Saved a 700-token tokenizer to {out}" in captured.out
    assert "\rtokenizer: " in captured.err and " docs/s]" in captured.err  # the progress bar
    assert "trained a bpe tokenizer of 700 tokens on 120 documents (cap: 120)" in caplog.text
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (out / name).is_file(), name
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["pad_token"]) == ("<|endoftext|>", "<|pad|>")
    tok = AutoTokenizer.from_pretrained(out)
    stream = list(iter_texts(load_config(["recipe=quickstart_decoder"]), limit=120))
    assert tok.backend_tokenizer.to_str() == train_tokenizer(stream, "bpe", 700, 2).backend_tokenizer.to_str()
    assert json.loads((out / "vocab.json").read_text()) == tok.get_vocab()
    merges = (out / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) - 1 == len(tok) - 258  # 256 bytes + 2 specials


def test_unreadable_stream_is_a_one_line_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in pydocs()[:1500]) + "{not json\n")
    config = recipe("bpe", f"data.sources=[{{path: json, data_files: '{bad}'}}]", "tokenizer.vocab_size=400")
    with pytest.raises(ConfigError, match=r"bad\.jsonl") as err:  # read in the reader thread, raised here
        build_tokenizer(config)
    assert "\n" not in str(err.value)


def test_cli_default_output_is_the_run_folder(tmp_path):
    code = cli.main(["tokenizer", "recipe=quickstart", "tokenizer.vocab_size=500", "data.max_samples=80",
                     f"runtime.output_dir={tmp_path}"])
    assert code == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert tok.mask_token == "[MASK]" and not (tmp_path / "tokenizer" / "merges.txt").exists()


# --- determinism ---------------------------------------------------------------------------------

DETERMINISM = """
import sys
from hf_streamlm import cli
from hf_streamlm.tokenizer import train
train.LOOKAHEAD_DOCS = 25  # characters first seen later take the late path too
for kind, name in (("bpe", "quickstart_decoder"), ("wordpiece", "quickstart"), ("wordlevel", "quickstart")):
    assert cli.main(["tokenizer", f"recipe={name}", f"tokenizer.kind={kind}", "tokenizer.vocab_size=1500",
                     "data.max_samples=500", "--output", f"{sys.argv[1]}/{kind}"]) == 0
"""


def test_same_stream_gives_byte_identical_files_in_separate_processes(tmp_path):
    for run, seed in (("a", "1"), ("b", "2")):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", DETERMINISM, str(tmp_path / run)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 8  # 3 x (tokenizer.json, tokenizer_config.json) + vocab.json, merges.txt
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_wordpiece_is_deterministic_in_process_with_late_characters(monkeypatch):
    # Every WordPiece training builds fresh hash maps: without the fix, repeats differ in one process.
    monkeypatch.setattr(train_module, "LOOKAHEAD_DOCS", 1)
    texts = ["plain words only"] + list(pydocs()[:300]) + ["naïve façade ½ 19 16 01 64 żółw"] * 3
    runs = {train_tokenizer(texts, "wordpiece", 900, 1).backend_tokenizer.to_str() for _ in range(4)}
    assert len(runs) == 1
    vocab = json.loads(runs.pop())["model"]["vocab"]
    assert "##ł" in vocab and "##ï" not in vocab and "##i" in vocab  # lowercased, accents stripped


def test_wordpiece_keeps_no_continuation_tokens_of_unseen_characters():
    vocab = train_tokenizer(["abc abd bcd"] * 4, "wordpiece", 100, 1).get_vocab()
    # ##a is registered (a is in the alphabet) though no word continues with it: "a" inside a new word works
    assert sorted(t for t in vocab if t.startswith("##") and len(t) == 3) == ["##a", "##b", "##c", "##d"]
    assert sorted(vocab.values()) == list(range(len(vocab)))  # ids without gaps


# --- loading: folder, name, seed-004 files -------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    trained("bpe").save_pretrained(folder)
    cli._write_vocab_and_merges(folder)
    (folder / "special_tokens.json").write_text(json.dumps(["<|endoftext|>", "<|pad|>"]))
    return folder


TEXTS = [SAMPLE, "", "  two  spaces", "<|endoftext|>next document<|pad|>", "x" * 300, "Ünïcödé ✓ \u0301"]


def test_seed004_file_styles_give_the_same_ids(bpe_files):
    reference = AutoTokenizer.from_pretrained(bpe_files)
    styles = {
        "path": TokenizerConfig(path=str(bpe_files)),
        "tokenizer_json": TokenizerConfig(tokenizer_json=str(bpe_files / "tokenizer.json")),
        "vocab_merges": TokenizerConfig(vocab=str(bpe_files / "vocab.json"), merges=str(bpe_files / "merges.txt"),
                                        special_tokens=str(bpe_files / "special_tokens.json")),
        "vocab_merges_list": TokenizerConfig(vocab=str(bpe_files / "vocab.json"), merges=str(bpe_files / "merges.txt"),
                                             special_tokens=["<|endoftext|>", "<|pad|>"]),
    }
    for style, cfg in styles.items():
        tok = load_tokenizer(cfg)
        assert len(tok) == len(reference), style
        assert (tok.eos_token_id, tok.pad_token_id) == (0, 1), style  # roles of the well-known specials
        for text in TEXTS:
            assert tok.encode(text) == reference.encode(text), (style, text)
            assert tok.decode(tok.encode(text)) == text, (style, text)
        config = load_config(["recipe=quickstart_decoder"])
        config.tokenizer = cfg
        assert len(build_tokenizer(config)) == len(reference), style  # usable for training: eos is known


def test_missing_files_are_one_line_config_errors(tmp_path, bpe_files):
    cases = [
        (TokenizerConfig(path=str(tmp_path / "nope")), "tokenizer.path"),
        (TokenizerConfig(tokenizer_json=str(tmp_path / "nope.json")), "tokenizer.tokenizer_json"),
        (TokenizerConfig(vocab=str(tmp_path / "v.json"), merges=str(bpe_files / "merges.txt")), "tokenizer.vocab"),
        (TokenizerConfig(path=str(bpe_files), special_tokens=str(tmp_path / "none.json")), "tokenizer.special_tokens"),
        (TokenizerConfig(name=str(tmp_path / "no-such-model")), "tokenizer.name"),
    ]
    for cfg, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
            load_tokenizer(cfg)
        assert "\n" not in str(err.value)


def test_name_loads_through_autotokenizer(bpe_files):
    tok = load_tokenizer(TokenizerConfig(name=str(bpe_files)))  # a local folder stands in for "gpt2"
    assert type(tok).__name__ == type(AutoTokenizer.from_pretrained(bpe_files)).__name__
    assert tok.get_vocab() == trained("bpe").get_vocab() and tok.eos_token == "<|endoftext|>"


# --- the model's vocab_size follows the tokenizer ------------------------------------------------


def test_model_vocab_size_follows_the_tokenizer():
    tok = trained("wordpiece")
    assert resolve_vocab_size(load_config(["recipe=quickstart"]), tok) == len(tok)
    assert resolve_vocab_size(load_config(["recipe=quickstart", f"model.vocab_size={len(tok)}"]), tok) == len(tok)
    with pytest.raises(ConfigError, match=rf"'model.vocab_size' is 123 but the tokenizer has {len(tok)} tokens"):
        resolve_vocab_size(load_config(["recipe=quickstart", "model.vocab_size=123"]), tok)


SHORT_RUN = ["scheduler.total_steps=2", "scheduler.warmup_steps=0", "runtime.logging.progress_bar=false",
             "runtime.evaluation.every_n_steps=null", "runtime.demo_sentences=[]", "data.batch_size=2",
             "data.sequence_length=32", "data.shuffle_buffer_size=0", "model.num_layers=1"]


def test_real_runs_with_tokenizer_path(tmp_path, bpe_files):
    """The run that trains is ``main`` in this process (conftest ``run_in_process``); the refused one a process
    of its own, whose whole stderr is the one line."""
    run_in_process("recipe=quickstart_decoder", f"tokenizer.path={bpe_files}", *SHORT_RUN,
                   f"runtime.output_dir={tmp_path / 'ok'}")
    export = json.loads((tmp_path / "ok" / "export" / "config.json").read_text())
    assert export["vocab_size"] == len(trained("bpe")) == 1500
    saved = AutoTokenizer.from_pretrained(tmp_path / "ok" / "export")
    assert saved.get_vocab() == trained("bpe").get_vocab()

    proc = run_cli("recipe=quickstart_decoder", f"tokenizer.path={bpe_files}", "model.vocab_size=1234", *SHORT_RUN,
                   f"runtime.output_dir={tmp_path / 'bad'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hf-streamlm: error: 'model.vocab_size' is 1234 but the tokenizer has 1500 tokens "
        "(leave model.vocab_size null to follow the tokenizer)"]


# --- byte-level BPE round trip -------------------------------------------------------------------

ROUND_TRIP = [
    "", " ", "  leading and trailing  ", "hello , world . ( x ) ; don't", "a\tb\nc\r\nd\x00e\x07\x1b[0m",
    "日本語のテキスト 中文 한국어", "😀👍🏽 👩‍👩‍👧‍👦 🇫🇷", "e\u0301 n\u0303 a\u0308\u0304 \u0300start", "\u200b\u200d\ufeff",
    "<|endoftext|>", "a<|pad|>b <|endoftext|> c", "\U0010ffff\U000e0001", "ﬁ ǅ İ ß ẞ", "     ", "\n\n\n",
]


@pytest.fixture(scope="module")
def bpe_folder_tokenizer(bpe_files):
    return AutoTokenizer.from_pretrained(bpe_files)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_bpe_round_trip_examples(bpe_folder_tokenizer, text):
    tok = bpe_folder_tokenizer
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok(text)["input_ids"]) == text
    assert trained("bpe").decode(trained("bpe").encode(text)) == text


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
@example(text="x .y ,z 'll 're n't ?!")
def test_bpe_round_trip_any_unicode(bpe_folder_tokenizer, text):
    tok = bpe_folder_tokenizer
    assert tok.decode(tok.encode(text)) == text
