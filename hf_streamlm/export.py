"""Hub-format export of a trained model: weights (safetensors), config, tokenizer, model card, and
the resolved training config; optional ``push_to_hub``."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import PreTrainedModel

from hf_streamlm.config import Config

logger = logging.getLogger(__name__)

TRAINING_CONFIG = "hf_streamlm_config.yaml"
"""The resolved training config travels with every export (nanoGPT/litgpt practice)."""

NEVER_PUSHED = ["*.pt", "*.pth", "*.bin", "*.pkl", "*.pickle", "*.ckpt", "optimizer*", "*/optimizer*", "scheduler*",
                "*/scheduler*", "random_states*", "*/random_states*", "rng_state*", "*/rng_state*"]
"""Left out of every push (``upload_folder`` ignore patterns): optimizer, scheduler and RNG states and
anything pickled -- a checkpoint's training state. An export is safetensors, JSON, YAML and text."""


def model_card(model: PreTrainedModel, config: Config, fmt: str, summary: dict | None = None) -> str:
    """The export's ``README.md``: model, data mixture, training length and tokens seen, the final
    eval figures, and the command that trained it (``summary``: the loop's step/tokens/eval/command)."""
    from hf_streamlm.data.sources import describe_source
    from hf_streamlm.data.pipeline import training_sources

    summary = summary or {}
    n_params = sum(p.numel() for p in model.parameters())
    task = "fill-mask" if config.model.type == "microbert" else "text-generation"
    auto = "AutoModelForMaskedLM" if task == "fill-mask" else "AutoModelForCausalLM"
    remote = ", trust_remote_code=True" if fmt == "custom" else ""
    sources = training_sources(config)
    total = sum(s.weight for s in sources)
    mixture = "\n".join(f"  - {describe_source(s)}" + (f": weight {s.weight / total:.3g}" if len(sources) > 1 else "")
                         for s in sources)
    steps = summary.get("step", config.scheduler.total_steps)
    tokens = f"{summary['tokens']:,} tokens seen" if summary.get("tokens") else "tokens seen: not recorded"
    figures = summary.get("eval") or {}
    results = "\n".join(f"| {k.removeprefix('eval_')} | {v:.4f} |" for k, v in figures.items())
    results = f"| metric | value |\n|---|---|\n{results}" if results else "No evaluation was recorded."
    command = summary.get("command") or f"accelerate launch -m hf_streamlm.run recipe={config.recipe}"
    harness = summary.get("lm_eval") or {}
    downstream = harness_section(harness.get("results", {}), harness.get("samples", {}), harness.get("step"))
    return f"""---
library_name: transformers
pipeline_tag: {task}
tags:
- hf_streamlm
---

# {config.runtime.experiment}

A {config.model.type} model ({n_params:,} parameters) pretrained with
hf_streamlm from the recipe `{config.recipe}`.

- Data mixture (streamed; sequence length {config.data.sequence_length}):
{mixture}
- Training: {steps} optimizer steps, {tokens}, batch {config.data.batch_size} x
  accumulation {config.data.gradient_accumulation_steps}, peak learning rate {config.optimizer.learning_rate},
  precision {config.runtime.precision}
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
    """Put the lm-evaluation-harness table into the model card ``readme`` (before the training command),
    replacing the one an earlier evaluation wrote."""
    text = readme.read_text()
    section = harness_section(results, samples, step)
    if HARNESS_BEGIN in text and HARNESS_END in text:
        head, rest = text.split(HARNESS_BEGIN, 1)
        text = head + section + rest.split(HARNESS_END, 1)[1].removeprefix("\n")
    elif "## Training command" in text:
        head, tail = text.split("## Training command", 1)
        text = head + section + "\n## Training command" + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    readme.write_text(text)


def export_run(model: PreTrainedModel, tokenizer, config: Config, output_dir: Path, fmt: str = "native",
               summary: dict | None = None) -> Path:
    """Write ``output_dir`` so that ``AutoModel*.from_pretrained(output_dir)``, ``AutoTokenizer`` and ``pipeline``
    work, in transformers 4.x as in 5.x (native format; the custom format's code needs 5.x)."""
    from hf_streamlm.models.export_formats import save_model
    from hf_streamlm.tokenizer.export import save_export_tokenizer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, output_dir, format=fmt)
    # model_max_length = the positions the model has: truncation=True then cuts where the model ends.
    save_export_tokenizer(tokenizer, output_dir, config.model.type, model.config.max_position_embeddings)
    config.save(output_dir / TRAINING_CONFIG)
    (output_dir / "README.md").write_text(model_card(model, config, fmt, summary))
    return output_dir


def export_to_push(path: str | Path) -> Path:
    """The export folder to push for ``path``: the folder itself when it holds a model (``config.json``),
    else the ``export/`` of a run directory."""
    from hf_streamlm.config import ConfigError

    path = Path(path)
    for folder in (path, path / "export"):
        if (folder / "config.json").is_file():
            return folder
    raise ConfigError(f"'{path}' is neither an export folder (with config.json) nor a run directory with an export/; "
                      "make one with: hf-streamlm export CHECKPOINT --output DIR")


def push_export(export_dir: Path, config: Config) -> str:
    """Upload the export folder (or a run directory's ``export/``) to ``hub.repo_id`` on the branch
    ``hub.revision``, creating the repository (``hub.private``) and the branch if needed; returns the
    commit URL. The token is huggingface_hub's: ``HF_TOKEN`` or the stored login. Training state
    (:data:`NEVER_PUSHED`) is never uploaded, and a folder that did not change makes no new commit."""
    from huggingface_hub import HfApi

    from hf_streamlm.config import ConfigError

    hub = config.hub
    if not hub.repo_id:
        raise ConfigError("'hub.repo_id' is not set: the repository to push to (user/name)")
    export_dir = export_to_push(export_dir)
    api = HfApi()
    api.create_repo(hub.repo_id, private=hub.private, exist_ok=True)
    if hub.revision and hub.revision != "main":  # upload_folder needs the branch to exist
        api.create_branch(hub.repo_id, branch=hub.revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=hub.repo_id, folder_path=str(export_dir), revision=hub.revision, commit_message=hub.commit_message,
        ignore_patterns=NEVER_PUSHED,
    )
    logger.info("pushed %s to %s (branch %s): %s", export_dir, hub.repo_id, hub.revision or "main", info.commit_url)
    return str(info.commit_url)


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint, else the newest complete checkpoint of a run directory."""
    from hf_streamlm.config import ConfigError, load_config
    from hf_streamlm.train.checkpoint import STATE_FILE, list_checkpoints

    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if (path / "config.yaml").is_file():
        config = load_config([f"recipe={path / 'config.yaml'}", "runtime.resume=never"])
        found = list_checkpoints(Path(config.runtime.checkpoint.directory or path / "checkpoints"))
        if found:
            return found[-1]
    raise ConfigError(f"'{path}' is neither a checkpoint (step-<N>/ with {STATE_FILE}) nor a run directory with one")


def load_checkpoint_model(path: str | Path) -> tuple[PreTrainedModel, object, Config]:
    """Rebuild the model of a checkpoint (or the newest one of a run directory) on the CPU."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from hf_streamlm.config import load_config
    from hf_streamlm.train.builders import build_model
    from hf_streamlm.train.fsdp import fsdp_checkpoint_weights, is_fsdp_checkpoint
    from hf_streamlm.train.zero import is_zero_checkpoint, zero_checkpoint_weights

    ckpt = find_checkpoint(path)
    config = load_config([f"recipe={ckpt / 'config.yaml'}", "runtime.resume=never"])
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    model = build_model(config, tokenizer)
    # A run with runtime.compile=true saves the compiled wrapper's keys ("_orig_mod." prefix).
    # DeepSpeed and FSDP checkpoints hold shards instead of model.safetensors (hf_streamlm.train.zero, .fsdp).
    if is_zero_checkpoint(ckpt):
        weights = zero_checkpoint_weights(ckpt)
    elif is_fsdp_checkpoint(ckpt):
        weights = fsdp_checkpoint_weights(ckpt)
    else:
        weights = load_file(ckpt / "model.safetensors")
    state = {k.removeprefix("_orig_mod."): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Accelerate drops tied copies (e.g. the MLM decoder that shares the embedding) when saving.
    tied = set(getattr(model, "all_tied_weights_keys", None) or model._tied_weights_keys or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval(), tokenizer, config


def export_checkpoint(path: str | Path, output_dir: str | Path, fmt: str = "native") -> Path:
    import json

    from hf_streamlm.train.checkpoint import STATE_FILE

    model, tokenizer, config = load_checkpoint_model(path)
    summary = json.loads((find_checkpoint(path) / STATE_FILE).read_text())
    return export_run(model, tokenizer, config, Path(output_dir), fmt, summary)
