"""The export's model card (``README.md``), built with ``huggingface_hub``'s ``ModelCard``/``ModelCardData``
so that the Hub reads its metadata as it reads any model's: ``library_name``, ``pipeline_tag``, ``license``,
``tags``, ``datasets`` (Hub ids; the commits trained on under ``dataset_revisions``), and a
``model-index`` with the eval results -- the held-out stream's loss, perplexity and masked-token
accuracies (all chosen positions; at [MASK]), and the lm-evaluation-harness tasks when the run or
``hf-streamlm eval --tasks`` scored any.

The body says in prose what the metadata says in fields, plus the training command."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_streamlm.config import Config

TRAINING_CONFIG = "hf_streamlm_config.yaml"
"""The resolved training config travels with every export (nanoGPT/litgpt practice)."""

HARNESS = ("lm-evaluation-harness", "https://github.com/EleutherAI/lm-evaluation-harness")
"""``source_name``/``source_url`` of the model-index entries that lm-evaluation-harness scored: they are
the ones ``hf-streamlm eval --tasks`` replaces."""

HELDOUT_METRICS = {"eval_loss": ("loss", "eval loss"), "eval_perplexity": ("perplexity", "perplexity"),
                   "eval_bits_per_byte": ("bits_per_byte", "bits per byte"),
                   "eval_accuracy": ("accuracy", "masked-token accuracy (all chosen positions)"),
                   "eval_mask_accuracy": ("accuracy_at_mask", "accuracy at [MASK]"),
                   "eval_mask_top5": ("top5_accuracy_at_mask", "top-5 accuracy at [MASK]")}
"""History's held-out figures -> (model-index ``metric.type``, ``metric.name``)."""

MASK_NOTE = ("`accuracy` counts every position the masking chose ({share:.0%} of the tokens: 80% replaced by the "
             "mask token, 10% by a random token, 10% left unchanged, which the model scores by copying its input); "
             "`mask_accuracy` counts only the positions whose input was the mask token, as a fill-mask user "
             "sees them, and `mask_top5` whether the true token is among the 5 highest-scored there.")
"""Said under the card's table when it holds the accuracy at [MASK] (``share``: ``data.mlm_probability``): why
``accuracy`` is the higher one."""


def task_of(config: Config) -> str:
    return "fill-mask" if config.model.type == "microbert" else "text-generation"


def heldout_results(config: Config, figures: dict[str, float]) -> list[EvalResult]:
    """The last held-out evaluation as model-index entries. The held-out documents are a share of the
    training stream (by a hash of the text) or ``data.validation_shards``: the dataset named is the single
    Hub source when there is one (with its pinned commit), else a description."""
    from hf_streamlm.data.revisions import hub_datasets

    hub = hub_datasets(config)
    single = hub[0] if len(hub) == 1 and len(config.data.sources) == 1 and not config.data.validation_shards else None
    if config.data.validation_shards:
        name = "validation shards (data.validation_shards)"
    else:
        name = f"held-out share ({config.data.eval_holdout:g}) of the training stream"
    out = []
    for key, (metric, label) in HELDOUT_METRICS.items():
        if figures.get(key) is None:
            continue
        out.append(EvalResult(
            task_type=task_of(config), dataset_type=single["id"] if single else "hf_streamlm/held-out-stream",
            dataset_name=name, dataset_config=single["config"] if single else None,
            dataset_split=single["split"] if single else None, dataset_revision=single["revision"] if single else None,
            metric_type=metric, metric_name=label, metric_value=float(figures[key]),
        ))
    return out


def harness_results(config_task: str, results: dict[str, float]) -> list[EvalResult]:
    """lm-evaluation-harness figures (``lm_eval/<task>/<metric>[/<filter>]``; stderr left to the table)
    as model-index entries, one per task and metric."""
    out = []
    for key, value in sorted(results.items()):
        _, task, metric = key.split("/", 2)
        if metric.endswith("_stderr") or "_stderr/" in metric or not isinstance(value, (int, float)):
            continue
        out.append(EvalResult(task_type=config_task, task_name=task, dataset_type=task, dataset_name=task,
                              metric_type=metric.replace("/", "_"), metric_name=metric, metric_value=float(value),
                              source_name=HARNESS[0], source_url=HARNESS[1]))
    return out


def card_data(model, config: Config, summary: dict) -> ModelCardData:
    from hf_streamlm.data.revisions import hub_datasets

    hub = hub_datasets(config)
    harness = (summary.get("lm_eval") or {}).get("results") or {}
    results = heldout_results(config, summary.get("eval") or {}) + harness_results(task_of(config), harness)
    family = "llama" if config.model.type == "decoder" else "modernbert" if config.model.architecture == "modern" \
        else "bert"
    extra = {}
    if hub:  # the commit of each Hub dataset trained on (model cards have no field for it; the Hub keeps others)
        extra["dataset_revisions"] = {d["id"]: d["revision"] for d in hub if d["revision"]}
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=task_of(config),
        license=config.hub.license,
        tags=["hf_streamlm", family, config.model.type, *config.hub.tags],
        datasets=sorted({d["id"] for d in hub}) or None,
        model_name=config.runtime.experiment,
        eval_results=results or None,
        **extra,
    )


def model_card(model, config: Config, fmt: str, summary: dict | None = None) -> ModelCard:
    """The export's card: model, data mixture (with the commits of Hub sources), training length and tokens
    seen, the final eval figures, the command that trained it (``summary``: the loop's
    step/tokens/eval/lm_eval/command)."""
    from hf_streamlm.data.pipeline import training_sources
    from hf_streamlm.data.schedule import first_rate
    from hf_streamlm.data.sources import describe_source

    summary = summary or {}
    n_params = sum(p.numel() for p in model.parameters())
    task = task_of(config)
    auto = "AutoModelForMaskedLM" if task == "fill-mask" else "AutoModelForCausalLM"
    remote = ", trust_remote_code=True" if fmt == "custom" else ""
    sources = training_sources(config)
    total = sum(s.weight for s in sources)
    mixture = "\n".join(f"  - {describe_source(s)}" + (f" (commit {s.pinned_revision})" if s.pinned_revision else "")
                        + (f": weight {s.weight / total:.3g}" if len(sources) > 1 else "") for s in sources)
    mixture += realized_mixture(config, summary.get("stage_tokens"))
    steps = summary.get("step", config.scheduler.total_steps)
    tokens = f"{summary['tokens']:,} tokens seen" if summary.get("tokens") else "tokens seen: not recorded"
    spikes = (f"\n- Loss spikes (`runtime.spikes`, {config.runtime.spikes.sigma:g} sigma over {config.runtime.spikes.window} "
              f"steps): {summary.get('spike_skips', 0)} step(s) skipped, listed in the run's `spikes.jsonl`"
              if config.runtime.spikes.enabled else "")
    if spikes and summary.get("rollbacks"):  # hf_streamlm.train.rollback
        spikes += (f"; {summary['rollbacks']} rollback(s) after repeated spikes (`rollbacks.jsonl`), "
                   f"{summary.get('skipped_documents', 0)} document(s) skipped since, listed in the run's "
                   f"`skipped_documents.jsonl`" + (f", {summary['dropped_micro_batches']} micro-batches dropped "
                   "(no document trace)" if summary.get("dropped_micro_batches") else ""))
    figures = summary.get("eval") or {}
    results = "\n".join(f"| {k.removeprefix('eval_')} | {v:.4f} |" for k, v in figures.items())
    results = f"| metric | value |\n|---|---|\n{results}" if results else "No evaluation was recorded."
    if "eval_mask_accuracy" in figures:
        results += "\n\n" + MASK_NOTE.format(share=first_rate(config))
    command = summary.get("command") or f"accelerate launch -m hf_streamlm.run recipe={config.recipe}"
    harness = summary.get("lm_eval") or {}
    downstream = harness_section(harness.get("results", {}), harness.get("samples", {}), harness.get("step"))
    body = f"""
# {config.runtime.experiment}

A {config.model.type} model ({n_params:,} parameters) pretrained with
hf_streamlm from the recipe `{config.recipe}`.

- Data mixture (streamed; sequence length {config.data.sequence_length}):
{mixture}
- Training: {steps} optimizer steps, {tokens}, batch {config.data.batch_size} x
  accumulation {config.data.gradient_accumulation_steps}, peak learning rate {config.optimizer.learning_rate},
  precision {config.runtime.precision}{spikes}
- Format: `{fmt}` ({"stock transformers classes" if fmt == "native" else "hf_streamlm classes with remote code"})

```python
from transformers import AutoTokenizer, {auto}, pipeline

model = {auto}.from_pretrained("path/or/repo"{remote})
tokenizer = AutoTokenizer.from_pretrained("path/or/repo")
pipe = pipeline("{task}", model="path/or/repo"{remote})
```

## Evaluation (held-out stream, last evaluation of the run)

{results}
{downstream}
## Training command

```bash
{command}
```

The full training configuration is in `{TRAINING_CONFIG}`.
"""
    return ModelCard(f"---\n{card_data(model, config, summary).to_yaml()}\n---\n{body}")


def realized_mixture(config: Config, stage_tokens: dict[str, dict[str, int]] | None) -> str:
    """The mixture a run trained on (``data.schedule`` or ``mix_by: tokens``): per stage, each source's share of the
    tokens against its scheduled weight; empty without one."""
    from hf_streamlm.data.pipeline import source_names

    if not stage_tokens:
        return ""
    names = source_names(config)
    stages = config.data.schedule or [{"until": 1.0, "weights": {}}]
    lines = ["", "  - Mixture as trained (share of tokens per stage; scheduled weight in brackets):"]
    for k, counts in sorted(stage_tokens.items(), key=lambda item: int(item[0])):
        total = sum(counts.values())
        stage = stages[min(int(k), len(stages) - 1)]
        weights = stage.get("weights") or {n: s.weight for n, s in zip(names, config.data.sources)}
        planned = sum(weights.values()) or 1
        shares = ", ".join(f"{n} {counts.get(n, 0) / max(total, 1):.3f} ({weights.get(n, 0) / planned:.3f})"
                           for n in names)
        lines.append(f"    - stage {k} (until {stage['until']}, {total:,} tokens): {shares}")
    return "\n".join(lines)


HARNESS_BEGIN, HARNESS_END = "<!-- lm_eval results -->", "<!-- /lm_eval results -->"
"""Markers around the model card's lm-evaluation-harness table, which ``hf-streamlm eval --tasks`` replaces."""


def harness_section(results: dict[str, float], samples: dict[str, int], step: int | None) -> str:
    """The model card's table of lm-evaluation-harness results (``lm_eval/<task>/<metric>`` figures), or ""."""
    if not results:
        return ""
    rows = []
    for key, value in sorted(results.items()):
        _, task, metric = key.split("/", 2)
        if metric.endswith("_stderr") or "_stderr/" in metric:
            continue  # shown beside its metric
        name, _, filter_name = metric.partition("/")
        stderr = results.get(f"lm_eval/{task}/{name}_stderr" + (f"/{filter_name}" if filter_name else ""))
        shown = f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
        rows.append(f"| {task} | {metric} | {shown} | {samples.get(task, '')} |")
    at = f" at step {step}" if step is not None else ""
    return (f"{HARNESS_BEGIN}\n## Downstream evaluation (lm-evaluation-harness{at})\n\n"
            "| task | metric | value | samples |\n|---|---|---|---|\n" + "\n".join(rows) + f"\n{HARNESS_END}\n")


def write_harness_card(readme: Path, results: dict[str, float], samples: dict[str, int], step: int | None) -> None:
    """Put lm-evaluation-harness results into the model card ``readme``: its table (before the training
    command) and its model-index entries, replacing those an earlier evaluation wrote."""
    card = ModelCard.load(readme)
    data = card.data
    task = data.pipeline_tag or "text-generation"
    kept = [r for r in data.eval_results or [] if r.source_name != HARNESS[0]]
    data.eval_results = (kept + harness_results(task, results)) or None
    if data.eval_results and not data.model_name:
        data.model_name = readme.parent.name
    text = card.text
    section = harness_section(results, samples, step)
    if HARNESS_BEGIN in text and HARNESS_END in text:
        head, rest = text.split(HARNESS_BEGIN, 1)
        text = head + section + rest.split(HARNESS_END, 1)[1].removeprefix("\n")
    elif "## Training command" in text:
        head, tail = text.split("## Training command", 1)
        text = head + section + "\n## Training command" + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.text = text
    card.save(readme)
