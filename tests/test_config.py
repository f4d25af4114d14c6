"""Config: recipes, overrides and precedence, docs on every field, and errors a user can act on."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from hf_streamlm.config import (
    Config,
    ConfigError,
    available_recipes,
    field_docs,
    iter_keys,
    load_config,
    parse_override,
)


def test_defaults_validate():
    config = load_config([])
    assert config.model.type == "microbert"
    assert config.data.sources[0].path == "builtin"


def test_recipe_values_override_defaults_and_cli_overrides_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optimizer:\n  learning_rate: 2.0e-4\n  weight_decay: 0.1\nscheduler:\n  total_steps: 7\n")
    config = load_config([f"recipe={recipe}", "optimizer.learning_rate=3e-4"])
    assert config.optimizer.learning_rate == pytest.approx(3e-4)  # command line > recipe
    assert config.optimizer.weight_decay == pytest.approx(0.1)  # recipe > default
    assert config.optimizer.beta1 == 0.9  # default
    assert config.scheduler.total_steps == 7


def test_yaml_1_1_exponent_without_dot_is_a_float(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optimizer:\n  learning_rate: 1.8e-4\n  epsilon: 1e-8\n")
    config = load_config([f"recipe={recipe}"])
    assert config.optimizer.epsilon == pytest.approx(1e-8)
    assert isinstance(config.optimizer.epsilon, float)


def test_list_and_dict_overrides_are_yaml():
    config = load_config(
        [
            "data.sources=[{path: json, data_files: corpus.jsonl, weight: 2}, {path: text, data_files: [a.txt, b.txt]}]",
            "runtime.checkpoint={every_n_steps: 5, max_keep: 1}",
            'runtime.demo_sentences=["a [MASK] b"]',
        ]
    )
    first, second = config.data.sources
    assert (first.path, first.data_files, first.weight) == ("json", "corpus.jsonl", 2.0)
    assert second.data_files == ["a.txt", "b.txt"]
    assert config.runtime.checkpoint.every_n_steps == 5 and config.runtime.checkpoint.max_keep == 1
    assert config.runtime.demo_sentences == ["a [MASK] b"]


def test_null_override_and_nested_keys():
    config = load_config(["scheduler.total_steps=null", "scheduler.total_epochs=2", "runtime.evaluation.best.max_keep=4"])
    assert config.scheduler.total_steps is None and config.scheduler.total_epochs == 2
    assert config.runtime.evaluation.best.max_keep == 4


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["optimizer.learnin_rate=1"], ["optimizer.learnin_rate", "learning_rate"]),
        (["modle.hidden_size=8"], ["modle", "model"]),
        (["data.sources=[{path: json, data_files: a.jsonl, wieght: 2}]"], ["wieght", "weight"]),
        (["data.batch_size=many"], ["data.batch_size", "integer"]),
        (["runtime.precision=fp8"], ["runtime.precision", "bf16"]),
        (["data.shuffle_buffer_size=1.5"], ["data.shuffle_buffer_size", "integer"]),
        (["runtime.logging.enable_stdout=maybe"], ["enable_stdout", "true or false"]),
        (["model.hidden_size=30", "model.num_attention_heads=4"], ["model.hidden_size", "model.num_attention_heads"]),
        (["model.num_key_value_heads=3", "model.num_attention_heads=4", "model.hidden_size=8"], ["num_key_value_heads"]),
        (["data.sequence_length=512"], ["data.sequence_length", "max_position_embeddings"]),
        (["model.loss_chunk_size=-1"], ["model.loss_chunk_size", ">= 0"]),
        (["scheduler.warmup_steps=2000", "scheduler.total_steps=10"], ["warmup_steps", "total_steps"]),
        (["scheduler.total_steps=null"], ["total_steps", "total_epochs"]),
        (["data.sources=[{path: builtin, name: nothing}]"], ["data.sources[0].name", "pydocs"]),
        (["hub.push=true"], ["hub.repo_id"]),
        (["recipe=no_such_recipe"], ["no_such_recipe", "quickstart"]),
        (["learning_rate"], ["key=value"]),
    ],
)
def test_bad_input_names_the_key(args, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(args)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_every_field_has_a_docstring():
    keys = list(iter_keys())
    assert len(keys) > 60
    missing = [key for key, _, doc in keys if not doc]
    assert missing == []
    # nested sections too
    for cls in (Config, *{typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config) if f.name != "recipe"}):
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config(["recipe=quickstart", "optimizer.learning_rate=5e-4"])
    path = tmp_path / "config.yaml"
    config.save(path)
    again = load_config([f"recipe={path}"])
    assert again.to_dict() | {"recipe": None} == config.to_dict() | {"recipe": None}
    assert yaml.safe_load(path.read_text())["optimizer"]["learning_rate"] == 5e-4


def test_every_shipped_recipe_validates():
    names = available_recipes()
    assert "quickstart" in names
    for name in names:
        assert load_config([f"recipe={name}"]).recipe == name


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=3e-4") == (["a", "b"], 3e-4)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("a.b=hello world") == (["a", "b"], "hello world")


def test_docs_configuration_reference_is_in_sync():
    from pathlib import Path

    from hf_streamlm.config import reference_markdown

    page = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert page.read_text() == reference_markdown(), "regenerate: hf-streamlm config --reference > docs/configuration.md"


def test_decoder_with_vocab_and_merges_files_needs_no_kind(tmp_path):
    """Seed 004's style: a decoder pointed at vocab.json + merges.txt is a loaded tokenizer, not one
    to train, so tokenizer.kind does not have to say bpe."""
    config = load_config(["model.type=decoder", f"tokenizer.vocab={tmp_path / 'vocab.json'}",
                          f"tokenizer.merges={tmp_path / 'merges.txt'}"])
    assert config.tokenizer.kind == "wordpiece" and config.tokenizer.vocab.endswith("vocab.json")
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        load_config(["model.type=decoder"])


def test_seed_004_training_yaml_without_model_type_is_a_decoder(tmp_path, caplog):
    """Seed 004's training.yaml (a decoder-only tool's file) has no model.type: its decoder keys
    (num_key_value_heads, rope_*) make it a decoder, and an unset data source is warned about."""
    recipe = tmp_path / "training.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 4, "max_position_embeddings": 128, "attn_dropout": None,
                  "residual_dropout": 0.0, "rope_mode": None, "rope_theta": None},
        "tokenizer": {"tokenizer_json": str(tmp_path / "tokenizer.json")},
        "data": {"train_shards": [], "validation_shards": [], "batch_size": 2, "sequence_length": 128},
    }))
    with caplog.at_level("WARNING", logger="hf_streamlm.config"):
        config = load_config([f"recipe={recipe}"])
    assert config.model.type == "decoder"
    assert "neither data.sources nor data.train_shards" in caplog.text
    assert load_config(["recipe=quickstart"]).model.type == "microbert"
