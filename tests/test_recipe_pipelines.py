"""Every shipped recipe's data pipeline runs, offline: the Hub datasets and the GPT-2 tokenizer the
recipes name are served under those same names (repo ids, configurations, splits, columns, file
layouts of the real repositories) by the loopback Hub server (tests/hub_server.py), with small
contents. Each recipe is loaded as shipped, with only its sizes made small (sequence length, batch,
workers, shuffle buffer, tokenizer vocabulary): its tokenizer is trained from (or loaded through)
that Hub, its model is built on the meta device, and a few training batches and the held-out blocks
come out of its stream. Also: seed 000's fallback chain falls through to IMDB when nothing before it
can be opened, naming each failure.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
from collections.abc import Callable
from itertools import islice

import pytest
import torch

from hf_streamlm.config import available_recipes, load_config
from hf_streamlm.data.corpus import BUILTIN_CORPORA
from hf_streamlm.data.pipeline import build_eval_blocks, build_train_loader, iter_rows
from hf_streamlm.tokenizer import build_tokenizer
from hf_streamlm.train.builders import build_model
from hf_streamlm.data.collate import make_collator
from tests.conftest import REPO
from tests.hub_fixtures import hub_server  # noqa: F401 - the fixture

SMALL = ["data.sequence_length=32", "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer_size=16",
         "tokenizer.vocab_size=400", "tokenizer.train_samples=300", "tokenizer.min_frequency=1",
         "model.vocab_size=null"]  # the served GPT-2 tokenizer is a small one
"""Sizes only: sources, configurations, splits, columns, caps, filters and fallbacks stay as shipped."""


def prose() -> list[str]:
    """Real English documents (the shipped corpus) to fill the fake repositories with."""
    return [json.loads(line)["text"] for line in gzip.open(BUILTIN_CORPORA["pydocs"], "rt")]


def write_parquet(path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100)


def readme(configs: dict[str, dict[str, str]]) -> str:
    """A dataset card whose YAML ``configs`` map config -> split -> files, as the real repos have."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in splits.items()]
    return "\n".join(lines + ["---", "", "A small stand-in served by tests/hub_server.py."]) + "\n"


def serve_wikitext(server, docs: list[str]) -> None:
    """Salesforce/wikitext: one folder of parquet shards per configuration; WikiText's rows are lines,
    with empty lines and " = Heading = " lines between paragraphs."""
    rows = []
    for i, doc in enumerate(docs):
        rows += [{"text": ""}, {"text": f" = Section {i} = \n"}, {"text": ""}, {"text": f" {doc} \n"}]
    repo = server.repo_dir("Salesforce/wikitext")
    configs = {}
    for config in ("wikitext-103-raw-v1", "wikitext-103-v1"):
        half = len(rows) // 2
        for k, part in enumerate((rows[:half], rows[half:])):
            write_parquet(repo / config / f"train-{k:05d}-of-00002.parquet", [
                {"text": r["text"] if config.endswith("raw-v1") else r["text"].replace("Python", "<unk>")}
                for r in part])
        write_parquet(repo / config / "validation-00000-of-00001.parquet", rows[:8])
        configs[config] = {"train": f"{config}/train-*", "validation": f"{config}/validation-*"}
    (repo / "README.md").write_text(readme(configs))


def serve_imdb(server, docs: list[str]) -> None:
    """stanfordnlp/imdb: config plain_text, columns text and label, sorted by label as the real one."""
    repo = server.repo_dir("stanfordnlp/imdb")
    rows = [{"text": doc, "label": int(i >= len(docs) // 2)} for i, doc in enumerate(docs)]
    write_parquet(repo / "plain_text" / "train-00000-of-00001.parquet", rows)
    write_parquet(repo / "plain_text" / "test-00000-of-00001.parquet", rows[:10])
    (repo / "README.md").write_text(readme({"plain_text": {"train": "plain_text/train-*",
                                                            "test": "plain_text/test-*"}}))


def serve_fineweb(server, docs: list[str]) -> None:
    """HuggingFaceFW/fineweb: data/<dump>/<n>.parquet with text, id, dump, url ... columns."""
    repo = server.repo_dir("HuggingFaceFW/fineweb")
    for k, dump in enumerate(("CC-MAIN-2024-10", "CC-MAIN-2024-18")):
        part = docs[k::2]
        write_parquet(repo / "data" / dump / "000_00000.parquet", [
            {"text": doc, "id": f"<urn:uuid:{dump}-{i}>", "dump": dump, "url": f"https://example.org/{i}",
             "language": "en", "language_score": 0.9, "token_count": len(doc.split())} for i, doc in enumerate(part)])
    (repo / "README.md").write_text(readme({"default": {"train": "data/*/*"},
                                            "sample-10BT": {"train": "sample/10BT/*"}}))


def serve_fineweb_edu(server, docs: list[str]) -> None:
    """HuggingFaceFW/fineweb-edu: data/<dump>/train-<n>-of-<m>.parquet, FineWeb's columns plus the classifier's
    score and int_score."""
    repo = server.repo_dir("HuggingFaceFW/fineweb-edu")
    for k, dump in enumerate(("CC-MAIN-2024-10", "CC-MAIN-2024-18")):
        part = docs[1 - k::2]
        write_parquet(repo / "data" / dump / "train-00000-of-00001.parquet", [
            {"text": doc, "id": f"<urn:uuid:edu-{dump}-{i}>", "dump": dump, "url": f"https://example.org/edu/{i}",
             "language": "en", "language_score": 0.9, "token_count": len(doc.split()), "score": 3.1, "int_score": 3}
            for i, doc in enumerate(part)])
    (repo / "README.md").write_text(readme({"default": {"train": "data/*/*"},
                                            "sample-10BT": {"train": "sample/10BT/*"}}))


def serve_gpt2_tokenizer(server, docs: list[str]) -> None:
    """openai-community/gpt2 (model repo): a GPT-2-style byte-level BPE (small vocabulary) saved in the
    real repo's files: tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(docs[:300], trainer=trainer)
    repo = server.repo_dir("openai-community/gpt2", repo_type="model")
    repo.mkdir(parents=True)
    bpe.save(str(repo / "tokenizer.json"))
    bpe.model.save(str(repo))  # vocab.json, merges.txt
    (repo / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    (repo / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": bpe.get_vocab_size(),
        "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
        "bos_token_id": bpe.token_to_id("<|endoftext|>"), "eos_token_id": bpe.token_to_id("<|endoftext|>")}))


SERVED: dict[str, Callable] = {
    "Salesforce/wikitext": serve_wikitext,
    "stanfordnlp/imdb": serve_imdb,
    "HuggingFaceFW/fineweb": serve_fineweb,
    "HuggingFaceFW/fineweb-edu": serve_fineweb_edu,
    "openai-community/gpt2": serve_gpt2_tokenizer,
}


@pytest.fixture
def hub(hub_server, monkeypatch):  # noqa: F811 - the fixture of the same name
    docs = prose()
    for serve in SERVED.values():
        serve(hub_server, docs)
    monkeypatch.chdir(REPO)  # mixture_example reads README.md and docs/*.md relative to the repository
    return hub_server


def hub_repos_read(server) -> set[str]:
    return {r.repo_id for r in server.requests() if r.repo_id and r.file and r.status in (200, 206)}


@pytest.mark.parametrize("name", available_recipes())
def test_recipe_pipeline_runs_offline(hub, tmp_path, name):
    config = load_config([f"recipe={name}", *SMALL, f"runtime.output_dir={tmp_path / 'run'}",
                          f"data.cache_dir={tmp_path / 'cache'}"])
    shipped = load_config([f"recipe={name}"])
    assert config.data.sources == shipped.data.sources  # same names, configs, splits, columns, fallbacks

    tokenizer = build_tokenizer(config)
    if shipped.tokenizer.name:
        assert shipped.tokenizer.name in hub_repos_read(hub)  # loaded by name through the Hub
    with torch.device("meta"):
        model = build_model(config, tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert all(p.is_meta for p in model.parameters())

    loader = build_train_loader(config, tokenizer, functools.partial(make_collator, config, tokenizer))
    batches = list(islice(iter(loader), 3))
    assert len(batches) == 3
    for batch in batches:
        assert batch["input_ids"].shape == (2, 32)
        assert int(batch["input_ids"].max()) < len(tokenizer)
        if config.model.type == "microbert":
            assert (batch["labels"] != -100).any()  # masked positions to predict
    docs, tokens = loader.source_counts()
    assert docs.get(0, 0) > 0 and tokens.get(0, 0) > 0  # the first source (not a fallback of it) was read
    assert build_eval_blocks(config, tokenizer, 2), "no held-out blocks"

    # The documents came from the repository (and configuration) the recipe names.
    hub_sources = [s for s in config.data.sources if s.path not in ("builtin", "json", "text", "parquet", "csv")]
    for source in hub_sources:
        assert source.path in hub_repos_read(hub)
        if source.name:
            files = {r.file for r in hub.requests() if r.repo_id == source.path and (r.file or "").endswith(".parquet")}
            assert files and all(f.startswith(f"{source.name}/") for f in files), files


def test_seed_000_chain_falls_through_to_imdb_naming_each_failure(hub_server, caplog):  # noqa: F811
    serve_imdb(hub_server, prose())  # nothing else of the chain exists on this Hub
    config = load_config(["recipe=microbert_v2", "data.retries=1", "data.retry_backoff=0"])
    with caplog.at_level(logging.WARNING, logger="hf_streamlm.data.sources"):
        rows = list(iter_rows(config, limit=20))
    assert len(rows) == 20 and all(len(text.split()) >= 5 for text, _ in rows)  # min_words 5
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "using stanfordnlp/imdb/plain_text" in message
    for tried in ("Salesforce/wikitext/wikitext-103-raw-v1", "wikimedia/wikipedia/20231101.en",
                  "Skylion007/openwebtext", "allenai/c4/en", "monology/pile-uncopyrighted"):
        assert f"{tried}: DatasetNotFoundError" in message
