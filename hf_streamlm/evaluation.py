"""``hf-streamlm eval``: score an export or a checkpoint on the held-out stream of a recipe, or (``--tasks``,
``runtime.evaluation.tasks``) on lm-evaluation-harness tasks (see "downstream tasks" below).

The held-out blocks, the collator (MicroBERT's masks seeded by ``runtime.seed``) and the batching are
the training loop's own (``build_eval_blocks``, ``make_collator``), and the figures go through the
``evaluate`` modules in :mod:`hf_streamlm.metrics` (the accuracies at [MASK], ``eval_mask_accuracy`` and
``eval_mask_top5``, are counted by :func:`mask_hits`), so they equal the last eval row a run wrote to
``history.jsonl`` for the same weights.
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from hf_streamlm.config import Config, ConfigError, load_config
from hf_streamlm.data.collate import CausalCollator, batch_to, make_collator
from hf_streamlm.env import default_device

MASKED, CAUSAL = "microbert", "decoder"
"""The two families, named by their ``model.type``."""


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``runtime.precision`` (None for fp32): what the loop's evals run under."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def token_bytes(tokenizer) -> torch.Tensor | None:
    """The UTF-8 bytes each token id of a byte-level BPE stands for (special tokens: 0), as a tensor indexed by id;
    None for other tokenizers (WordPiece, word-level: their tokens do not map back to exact bytes). A byte-level
    token's string has one character per byte (GPT-2's byte-to-unicode alphabet); an added token is its text."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    for token, i in backend.get_vocab(with_added_tokens=False).items():
        if i < len(lengths):
            lengths[i] = len(token)
    for i, added in backend.get_added_tokens_decoder().items():
        if i < len(lengths):
            lengths[i] = 0 if added.special else len(added.content.encode("utf-8"))
    return lengths


def mask_hits(logits: torch.Tensor, predictions: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
              mask_token_id: int, k: int = 5) -> torch.Tensor:
    """``[positions, top-1 hits, top-k hits]`` at the labelled positions whose input is ``mask_token_id``, as a
    tensor on the logits' device (summed over batches there: no read-back per batch). ``predictions``: the
    argmax of ``logits``, as ``eval_accuracy`` takes it.

    The MLM collator labels the 15% of tokens it chose and leaves a tenth of them unchanged in the input
    (BERT's 80/10/10): a model scores those by copying its input, which lifts ``eval_accuracy``. At [MASK]
    inputs it has only the context, the case a fill-mask user sees."""
    at_mask = (input_ids == mask_token_id) & (labels != -100)
    top1 = predictions == labels
    topk = (logits.topk(min(k, logits.shape[-1]), dim=-1).indices == labels.unsqueeze(-1)).any(-1) | top1
    return torch.stack([at_mask.sum(), (top1 & at_mask).sum(), (topk & at_mask).sum()])


@torch.no_grad()
def score(model: PreTrainedModel, blocks: list[dict], collator, batch_size: int,
          device: torch.device | str = "cpu", autocast: torch.dtype | None = None,
          byte_lengths: torch.Tensor | None = None) -> dict[str, float]:
    """Mean loss per predicted token over ``blocks``, its perplexity, and (masked LM) accuracy: ``eval_accuracy``
    over every position the collator chose (the [MASK], random and unchanged ones), ``eval_mask_accuracy`` and
    ``eval_mask_top5`` over the positions whose input is the collator's ``mask_token_id`` (:func:`mask_hits`).

    Each batch adds its loss sum (the model's mean loss x its labelled tokens) to the perplexity
    metric, so the mean is token-weighted exactly as the training loop's eval computes it.
    ``autocast``: run the forward under ``torch.autocast`` with this dtype; None runs the model as it
    is (fp32 for a loaded model; a model prepared by Accelerate brings its own autocast).
    ``byte_lengths`` (:func:`token_bytes`, causal LMs): adds ``eval_bits_per_byte``, the loss summed over the
    predicted tokens in bits, per UTF-8 byte of text they stand for: a figure that does not depend on the
    tokenizer, so runs with different vocabularies compare (OLMo, llm-foundry and the GPT-2 line report it).
    """
    from hf_streamlm import metrics

    device = torch.device(device)
    causal = isinstance(collator, CausalCollator)
    perplexity = metrics.load("perplexity", keep_in_memory=True)
    accuracy = None if causal else metrics.load("masked_accuracy", keep_in_memory=True)
    mask_id = None if causal else getattr(collator, "mask_token_id", None)
    at_mask = torch.zeros(3, dtype=torch.long, device=device)  # mask_hits, summed over the batches
    context = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    model.eval()
    tokens = text_bytes = 0
    byte_lengths = byte_lengths.to(device) if causal and byte_lengths is not None else None
    for i in range(0, len(blocks), batch_size):
        batch = batch_to(collator(blocks[i : i + batch_size]), device)
        with context:
            out = model(**batch)
        labels = batch["labels"][:, 1:] if causal else batch["labels"]  # a causal LM predicts the next token
        n = int((labels != -100).sum())
        if n == 0:  # nothing labelled (the loss is NaN): nothing to add
            continue
        tokens += n
        perplexity.add_batch(losses=[float(out.loss) * n], token_counts=[n])
        if byte_lengths is not None:
            text_bytes += int(byte_lengths[labels[labels != -100]].sum())
        if accuracy is not None:
            predictions = out.logits.argmax(-1)
            accuracy.add_batch(predictions=predictions.tolist(), references=labels.tolist())
            if mask_id is not None:
                at_mask += mask_hits(out.logits, predictions, batch["input_ids"], labels, mask_id)
    if tokens == 0:
        return {}
    ppl = perplexity.compute()
    result = {"eval_loss": ppl["loss"], "eval_perplexity": ppl["perplexity"], "eval_tokens": ppl["tokens"]}
    if text_bytes:
        result["eval_bits_per_byte"] = ppl["loss"] * ppl["tokens"] / (math.log(2) * text_bytes)  # summed loss, bits
    if accuracy is not None:
        result["eval_accuracy"] = accuracy.compute()["accuracy"]
        masked, top1, topk = at_mask.tolist()
        if masked:
            result["eval_mask_accuracy"] = top1 / masked
            result["eval_mask_top5"] = topk / masked
    return result


def _held_out(config: Config) -> str:
    d = config.data
    if d.validation_shards:
        return f"data.validation_shards ({len(d.validation_shards)} file{'s' * (len(d.validation_shards) > 1)})"
    return f"data.eval_holdout={d.eval_holdout} (documents held out of the training sources by a hash of the text)"


def load_export(path: Path) -> tuple[PreTrainedModel, Any, str]:
    """The model and tokenizer of a Hub-format folder, and its family (``microbert``/``decoder``)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from hf_streamlm.models.export_formats import from_native

    family = export_family(path)
    auto = AutoModelForMaskedLM if family == MASKED else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the model and tokenizer of '{path}': {str(err).splitlines()[0]}") from None
    if model.config.model_type in ("bert", "modernbert", "llama"):
        # A native export: score it as the class that trained it. It computes the same function
        # (to_native/from_native copy weights strictly), and it honours the packed-document
        # inputs (data.document_masking) that a stock Llama would ignore.
        try:
            model = from_native(model)
        except (TypeError, RuntimeError, KeyError, AttributeError):
            pass  # a BERT/Llama from elsewhere: scored as the stock class
    return model.eval(), tokenizer, family


def load_model(path: str | Path) -> tuple[PreTrainedModel, Any, str, Path | None, str]:
    """Model, tokenizer, family, the training config it carries (or None) and what ``path`` is:
    ``export`` (Hub format), ``checkpoint`` (``checkpoints/step-N``; a run directory gives its newest)."""
    from hf_streamlm.card import TRAINING_CONFIG
    from hf_streamlm.train.checkpoint import STATE_FILE, find_checkpoint, load_checkpoint_model

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"'{path}' is not a folder: give an export folder or a checkpoint (checkpoints/step-N)")
    if (path / STATE_FILE).is_file() or ((path / "config.yaml").is_file() and not (path / "config.json").is_file()):
        checkpoint = find_checkpoint(path)
        model, tokenizer, config = load_checkpoint_model(checkpoint)
        return model, tokenizer, config.model.type, checkpoint / "config.yaml", "checkpoint"
    if (path / "config.json").is_file():
        model, tokenizer, family = load_export(path)
        saved = path / TRAINING_CONFIG
        return model, tokenizer, family, saved if saved.is_file() else None, "export"
    raise ConfigError(
        f"'{path}' is neither an export (config.json and weights) nor a checkpoint "
        f"(step-N/ with {STATE_FILE}) nor a run directory"
    )


def eval_config(overrides: list[str], saved: Path | None, path: str | Path) -> Config:
    """The config whose held-out stream is scored: ``recipe=NAME`` and overrides, or else the training
    config that the export/checkpoint carries, with the overrides on top."""
    if any(a.startswith("recipe=") for a in overrides):
        return load_config(overrides)
    if saved is None:
        raise ConfigError(f"'{path}' carries no hf_streamlm training config: give recipe=NAME (and the overrides "
                          "the model was trained with) to choose the held-out stream")
    return load_config([f"recipe={saved}", "runtime.resume=never", *overrides])


def evaluate_model(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Score the export or checkpoint at ``path`` on the held-out stream; the figures and what was scored."""
    from hf_streamlm.data import build_eval_blocks

    model, tokenizer, family, saved, kind = load_model(path)
    config = eval_config(overrides, saved, path)
    if config.model.type != family:
        what = "a masked LM (MicroBERT/BERT)" if family == MASKED else "a causal LM (decoder/Llama)"
        raise ConfigError(f"'{path}' holds {what} but the config has model.type={config.model.type}; "
                          f"add model.type={family} or give the recipe it was trained with")
    d, r = config.data, config.runtime
    if not d.validation_shards and not d.eval_holdout > 0:
        raise ConfigError("no held-out stream: data.eval_holdout is 0 and data.validation_shards is empty; "
                          "set one of them (the same as in training, or the score is on training data)")
    blocks = build_eval_blocks(config, tokenizer, r.evaluation.max_batches * d.batch_size)
    if not blocks:
        raise ConfigError(f"the held-out stream ({_held_out(config)}) holds less than one block of "
                          f"data.sequence_length={d.sequence_length} tokens")
    device = default_device()
    model.to(device)
    collator = make_collator(config, tokenizer, seed=r.seed)  # the loop's eval masks: same seed, fresh generator
    # Under the autocast the loop evaluates with (runtime.precision), so the figures match its eval rows.
    metrics = score(model, blocks, collator, d.batch_size, device, autocast_dtype(r.precision), token_bytes(tokenizer))
    return {
        "model": str(path),
        "kind": kind,
        "family": family,
        "recipe": config.recipe,
        "held_out": _held_out(config),
        "blocks": len(blocks),
        "batches": -(-len(blocks) // d.batch_size),
        **metrics,
    }


# ----------------------------------------------------------------------------------- downstream tasks
# lm-evaluation-harness (EleutherAI) through its Python API, on causal LMs: an export as lm_eval loads any
# Hub model (``HFLM(pretrained=PATH)``), or the model object of a checkpoint or of the training loop.
# MicroBERT has no path there (the harness scores log-likelihoods and generations of causal and seq2seq
# models); its downstream figure stays the masked-token accuracy above.

HARNESS_PREFIX = "lm_eval"
"""History keys of downstream results: ``lm_eval/<task>/<metric>``."""
HARNESS_MISSING = ("downstream tasks need lm-evaluation-harness, which is not installed: "
                   "pip install 'hf_streamlm[eval]' (or: pip install lm_eval)")


def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        if getattr(err, "name", "") and not str(err.name).startswith("lm_eval"):
            raise  # lm_eval is there but broken: a bug to see whole
        raise ConfigError(HARNESS_MISSING) from None
    return lm_eval, HFLM, TaskManager


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None, include_defaults: bool):
    _, _, TaskManager = _harness()
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(tasks: list[str], include_path: str | Path | None = None, key: str = "--include-path"):
    """lm_eval's ``TaskManager`` with ``include_path`` added, after checking that every task name (or glob)
    matches a task, group or tag there or among the built-in ones. Indexing lm_eval's thousands of built-in
    task YAMLs takes 10-40 s, so tasks that are all in ``include_path`` get a manager of that folder alone;
    managers are kept for the next evaluation."""
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"{key} '{include_path}' is not a folder (of lm-evaluation-harness task YAMLs)")
    own = str(Path(include_path).resolve()) if include_path else None
    manager = _task_manager(own, False) if own else None
    if manager is None or not all(manager.match_tasks([t]) for t in tasks):
        manager = _task_manager(own, True)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f"in {include_path} or " if include_path else ""
        raise ConfigError(f"unknown lm-evaluation-harness task{'s' * (len(unknown) > 1)} {', '.join(unknown)}: not "
                          f"{where}among the built-in tasks (list them: lm_eval ls tasks; your own task YAMLs: "
                          "--include-path DIR)")
    return manager


def flatten_harness_results(results: dict) -> dict[str, float]:
    """``{task: {"acc,none": 0.7, "alias": ...}}`` from lm_eval as ``{"lm_eval/<task>/acc": 0.7}``; a metric
    under a filter other than ``none`` keeps it (``lm_eval/<task>/exact_match/strict-match``)."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # alias, name, sample_len
            metric, filter_name = key.split(",", 1)
            suffix = metric if filter_name == "none" else f"{metric}/{filter_name}"
            flat[f"{HARNESS_PREFIX}/{task}/{suffix}"] = float(value)
    return flat


def run_harness(model: PreTrainedModel | str | Path, tokenizer, tasks: list[str],
                include_path: str | Path | None = None, device: torch.device | str = "cpu", batch_size: int = 8,
                limit: int | None = None, log_samples: bool = False) -> dict[str, Any]:
    """Run lm-evaluation-harness ``tasks`` on a causal LM; returns ``{"results": flat figures, "samples": n per
    task, "raw": lm_eval's output}``. ``model`` is an export folder (loaded by lm_eval itself, as a user's
    ``lm_eval --model hf --model_args pretrained=PATH`` would) or a model object with its ``tokenizer``. A model
    object is put back in the training mode it had."""
    lm_eval, HFLM, _ = _harness()
    manager = task_manager(tasks, include_path)
    if isinstance(model, (str, Path)):
        lm = HFLM(pretrained=str(model), backend="causal", device=str(device), batch_size=batch_size)
        training = None
    else:
        training = model.training
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      log_samples=log_samples)
    finally:
        if training:
            model.train()
    samples = {task: int(n.get("effective", 0)) for task, n in (out.get("n-samples") or {}).items()}
    return {"results": flatten_harness_results(out["results"]), "samples": samples, "raw": out}


def _run_of(folder: Path) -> Path | None:
    """The run directory holding ``folder`` (an export, ``checkpoints/step-N``, ``best/step-N``, the run itself)."""
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / "history.jsonl").is_file() and (candidate / "config.yaml").is_file():
            return candidate
    return None


def _last_step(run: Path | None) -> int | None:
    from hf_streamlm.train.history import read_history

    if run is None:
        return None
    steps = [row["step"] for row in read_history(run / "history.jsonl") if isinstance(row.get("step"), int)]
    return max(steps) if steps else None


def evaluate_tasks(path: str | Path, tasks: list[str], include_path: str | Path | None = None,
                   limit: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Run lm-evaluation-harness ``tasks`` on the decoder at ``path`` and record the results where the model
    lives: a row ``{"step", "lm_eval/<task>/<metric>": ...}`` in its run's ``history.jsonl``, and a table in
    the export's model card (``README.md``) when the model scored is an export.

    ``path``: an export folder; a checkpoint (``checkpoints/step-N``, ``best/step-N``); a run directory (its
    export when the run finished, else its newest checkpoint)."""
    import json

    from hf_streamlm.card import write_harness_card
    from hf_streamlm.train.checkpoint import STATE_FILE, find_checkpoint, load_checkpoint_model

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"'{path}' is not a folder: give an export folder, a checkpoint or a run directory")
    _harness()  # the missing-package line before any model is loaded
    export = next((f for f in (path, path / "export") if (f / "config.json").is_file()), None)
    run = _run_of(export or path)
    if export is not None:
        kind, where, step = "export", export, _last_step(run)
        family = export_family(export)
        model, tokenizer = export, None
    else:
        checkpoint = find_checkpoint(path)
        model, tokenizer, config = load_checkpoint_model(checkpoint)
        family = config.model.type
        kind, where = "checkpoint", checkpoint
        step = json.loads((checkpoint / STATE_FILE).read_text()).get("step")
    if family != CAUSAL:
        raise ConfigError(f"'{where}' holds a masked LM (MicroBERT/BERT): lm-evaluation-harness scores causal LMs. "
                          f"Its downstream figure is the masked-token accuracy: hf-streamlm eval {path}")
    device = default_device()
    if not isinstance(model, Path):
        model.to(device)
    out = run_harness(model, tokenizer, tasks, include_path, device, batch_size, limit)
    row = {"step": step, **out["results"], f"{HARNESS_PREFIX}_model": str(where)}
    result = {"model": str(where), "kind": kind, "step": step, "tasks": tasks, "samples": out["samples"],
              **out["results"]}
    if run is not None:
        with (run / "history.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        result["history"] = str(run / "history.jsonl")
    if export is not None and (export / "README.md").is_file():
        write_harness_card(export / "README.md", out["results"], out["samples"], step)
        result["model_card"] = str(export / "README.md")
    return result


def export_family(path: Path) -> str:
    """The family (``microbert``/``decoder``) of the export at ``path``, from its config (no weights loaded)."""
    from transformers import AutoConfig

    import hf_streamlm.models  # noqa: F401  (registers model_type microbert/streamlm_decoder: custom exports load)

    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"'{path}/config.json' is not a model config transformers can read: {err}") from None
    archs = hf_config.architectures or []
    if any(a.endswith("ForMaskedLM") for a in archs) or (not archs and hf_config.model_type in ("bert", "microbert")):
        return MASKED
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or not archs:
        return CAUSAL
    raise ConfigError(f"'{path}' holds a {', '.join(archs)}: eval scores masked or causal language models")


# --------------------------------------------------------------------------- in the training loop


def check_loop_tasks(config: Config, accelerator) -> None:
    """Before training: ``runtime.evaluation.tasks`` can run (lm_eval installed, every task found, not
    under ZeRO-3), so that a bad name fails now rather than at the first evaluation hours in."""
    e = config.runtime.evaluation
    if not e.tasks:
        return
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
        raise ConfigError("'runtime.evaluation.tasks' runs the model on the main process alone, which ZeRO-3's "
                          "sharded parameters do not allow; score the checkpoints with hf-streamlm eval PATH --tasks")
    if accelerator.is_main_process:
        task_manager(e.tasks, e.tasks_include_path, "'runtime.evaluation.tasks_include_path'")


def loop_eval(model, eval_blocks: list[dict], collator, batch_size: int, accelerator,
              byte_lengths: torch.Tensor | None = None) -> dict[str, float]:
    """The loop's held-out eval: mean loss per predicted token, perplexity, MLM accuracies (all chosen positions;
    at [MASK], top 1 and top 5), bits per byte, by the same code and ``evaluate`` modules as ``hf-streamlm eval``.
    No autocast of its own: the prepared model runs under Accelerate's (``runtime.precision``). Leaves the model
    in training mode."""
    metrics = score(model, eval_blocks, collator, batch_size, accelerator.device, byte_lengths=byte_lengths)
    model.train()
    return metrics


def loop_tasks(model, tokenizer, config: Config, step: int, accelerator) -> dict[str, Any] | None:
    """Run ``runtime.evaluation.tasks`` on the main process (the others wait) on the model being trained, as
    OLMo-core and llm-foundry run downstream evals in the loop; the main process gets ``{"step", "results":
    {"lm_eval/<task>/<metric>": ...}, "samples"}`` (also kept in the checkpoint state and the model card), the
    others None."""
    e = config.runtime.evaluation
    result = None
    if accelerator.is_main_process:
        net = accelerator.unwrap_model(model, keep_torch_compile=False)
        out = run_harness(net, tokenizer, e.tasks, e.tasks_include_path, accelerator.device, config.data.batch_size,
                          e.tasks_limit)
        result = {"step": step, "results": out["results"], "samples": out["samples"]}
    accelerator.wait_for_everyone()
    return result
