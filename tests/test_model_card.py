"""The export's model card read back by ``huggingface_hub``: ``ModelCard.load`` parses its metadata into
``ModelCardData`` (library, pipeline, license, tags, datasets with their pinned commits) and its
``model-index`` into ``EvalResult`` entries (``model_index_to_eval_results``) that round-trip through
``eval_results_to_model_index``; ``hf-streamlm eval --tasks`` replaces the harness entries only.

The card is built from a config and a run summary, as the loop and ``hf-streamlm export`` build it; no
training is needed (the model only counts its parameters)."""

from __future__ import annotations

import pytest
import torch
import yaml

from hf_streamlm.config import load_config

SHA = "0123456789abcdef0123456789abcdef01234567"
SUMMARY = {
    "step": 40, "tokens": 5120, "command": "python -m hf_streamlm.run recipe=quickstart_decoder",
    "eval": {"eval_loss": 3.25, "eval_perplexity": 25.79, "eval_tokens": 900, "eval_accuracy": 0.31},
    "lm_eval": {"results": {"lm_eval/cloze/acc": 0.5, "lm_eval/cloze/acc_stderr": 0.08,
                            "lm_eval/cloze/acc_norm": 0.45}, "samples": {"cloze": 40}, "step": 40},
}


def card_for(tmp_path, family: str, sources: str, summary: dict = SUMMARY):
    from huggingface_hub import ModelCard

    from hf_streamlm.card import model_card

    recipe = "quickstart" if family == "microbert" else "quickstart_decoder"
    config = load_config([f"recipe={recipe}", f"data.sources={sources}", "hub.license=apache-2.0",
                          "hub.tags=[demo]", "runtime.experiment=tiny-lm"])
    path = tmp_path / "README.md"
    model_card(torch.nn.Linear(4, 4), config, "native", summary).save(path)
    return ModelCard.load(path), path


def test_card_metadata_and_model_index_parse_back(tmp_path):
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    card, path = card_for(tmp_path, "decoder", f"[{{path: org/web, name: sample, pinned_revision: {SHA}}}]")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0" and data.tags == ["hf_streamlm", "llama", "decoder", "demo"]
    assert data.datasets == ["org/web"] and data.dataset_revisions == {"org/web": SHA}
    assert data.model_name == "tiny-lm"
    got = {(r.source_name, r.metric_type): r for r in data.eval_results}
    assert {k: r.metric_value for k, r in got.items()} == {
        (None, "loss"): 3.25, (None, "perplexity"): 25.79, (None, "accuracy"): 0.31,
        ("lm-evaluation-harness", "acc"): 0.5, ("lm-evaluation-harness", "acc_norm"): 0.45}  # stderr: table only
    heldout = got[(None, "loss")]
    assert (heldout.dataset_type, heldout.dataset_config, heldout.dataset_revision) == ("org/web", "sample", SHA)
    assert got[("lm-evaluation-harness", "acc")].dataset_type == "cloze"
    assert all(isinstance(r, EvalResult) for r in data.eval_results)

    # The YAML is the Hub's model-index shape, and it round-trips through huggingface_hub's converters.
    front = yaml.safe_load(path.read_text().split("---")[1])
    index = front["model-index"]
    assert index[0]["name"] == "tiny-lm" and front["datasets"] == ["org/web"]
    name, results = model_index_to_eval_results(index)
    assert name == "tiny-lm" and results == data.eval_results
    assert eval_results_to_model_index(name, results) == index
    # The prose says it too.
    assert f"org/web/sample (commit {SHA})" in card.text and "| loss | 3.2500 |" in card.text
    assert "mask_accuracy" not in card.text  # no accuracy at [MASK], no note about it


def test_a_local_mixture_names_no_hub_dataset_and_microbert_is_fill_mask(tmp_path):
    figures = {**SUMMARY["eval"], "eval_mask_accuracy": 0.22, "eval_mask_top5": 0.41}
    summary = {**SUMMARY, "eval": figures, "lm_eval": None}
    card, _ = card_for(tmp_path, "microbert", "[{path: builtin, name: pydocs}, {path: json, data_files: a.jsonl}]",
                       summary)
    data = card.data
    assert data.pipeline_tag == "fill-mask" and data.tags[:3] == ["hf_streamlm", "modernbert", "microbert"]  # the recipe's tier
    assert data.datasets is None and not hasattr(data, "dataset_revisions")
    accuracy = next(r for r in data.eval_results if r.metric_type == "accuracy")
    assert accuracy.metric_name == "masked-token accuracy (all chosen positions)"
    assert accuracy.dataset_type == "hf_streamlm/held-out-stream" and accuracy.dataset_revision is None
    # The accuracy at [MASK] apart from it, in the model-index and in the table with what each one counts.
    at_mask = {r.metric_type: (r.metric_name, r.metric_value) for r in data.eval_results}
    assert at_mask["accuracy_at_mask"] == ("accuracy at [MASK]", 0.22)
    assert at_mask["top5_accuracy_at_mask"] == ("top-5 accuracy at [MASK]", 0.41)
    assert "| mask_accuracy | 0.2200 |" in card.text and "| mask_top5 | 0.4100 |" in card.text
    assert "30% of the tokens" in card.text and "left unchanged" in card.text  # the recipe's data.mlm_probability


def test_harness_results_replace_the_earlier_ones_in_metadata_and_table(tmp_path):
    from huggingface_hub import ModelCard

    from hf_streamlm.card import write_harness_card

    _, path = card_for(tmp_path, "decoder", "[{path: builtin, name: pydocs}]")
    write_harness_card(path, {"lm_eval/cloze/acc": 0.75, "lm_eval/cloze/acc_stderr": 0.07}, {"cloze": 40}, 60)
    card = ModelCard.load(path)
    harness = [(r.metric_type, r.metric_value) for r in card.data.eval_results if r.source_name]
    assert harness == [("acc", 0.75)]
    assert len([r for r in card.data.eval_results if not r.source_name]) == 3  # held-out entries kept
    assert card.text.count("## Downstream evaluation") == 1 and "| cloze | acc | 0.7500 ± 0.0700 | 40 |" in card.text
    assert card.data.license == "apache-2.0"  # the rest of the metadata untouched


@pytest.mark.parametrize("summary", [{}, {"step": 3}])
def test_a_run_without_evaluation_has_no_model_index(tmp_path, summary):
    card, path = card_for(tmp_path, "decoder", "[{path: builtin, name: pydocs}]", summary)
    assert card.data.eval_results is None and "model-index" not in path.read_text()
    assert "No evaluation was recorded." in card.text
