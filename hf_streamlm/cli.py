"""The ``hf-streamlm`` console script: one argparse subcommand per job, each with the same ``--help``
shape (usage, description, arguments, options; the config key reference for those that take a config).

``train``, ``config``, ``tokenizer``, ``stats``, ``plan``, ``eval`` and ``cache`` take ``recipe=NAME key=value``
config arguments as ``python -m hf_streamlm.run`` does: ``parse_known_args`` leaves them, wherever they
stand among the flags, to :func:`hf_streamlm.config.load_config`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from hf_streamlm.config import ConfigError, available_recipes, load_config
from hf_streamlm.run import OVERRIDE, ArgumentParser, add_overrides, config_epilog, fail, setup_logging
from hf_streamlm.run import main as train_main

COMMANDS = {
    "train": "train a model: hf-streamlm train recipe=NAME [key=value ...]",
    "config": "print the resolved config of recipe=NAME [key=value ...] as YAML (--reference: all keys)",
    "recipes": "list the shipped recipes",
    "tokenizer": "train the recipe's tokenizer from its stream: tokenizer recipe=NAME [key=value ...] [--output DIR]",
    "stats": "measure the recipe's data pipeline: stats recipe=NAME [key=value ...] [--json] [--plot FILE]",
    "models": "list the named model shapes (model.preset=NAME) with parameter counts and traced training memory",
    "plan": "will recipe=NAME fit, how fast, how long, what cost: plan recipe=NAME [key=value ...] [--gpus N] "
            "[--gpu NAME] [--config FILE] [--price-per-gpu-hour USD] [--json]",
    "eval": "score a model on the held-out stream: eval PATH [recipe=NAME] [key=value ...] [--json FILE]; or on "
            "lm-evaluation-harness tasks: eval PATH --tasks NAMES [--include-path DIR] [--limit N]",
    "export": "export a checkpoint or run directory in Hub format: export PATH [--format native|custom] --output DIR",
    "push": "upload an export folder (or a run's export/) to the Hub: push DIR --repo-id USER/NAME [--private|--public] "
            "[--revision BRANCH]",
    "cache": "the processed-data cache: cache info|clear|usage [--cache-dir DIR | recipe=NAME] [--key KEY] [--json]",
}

EVAL_HELP = """Score a model on the held-out stream: eval loss, perplexity, MicroBERT's masked-token accuracy
(accuracy: all positions the masking chose; mask_accuracy, mask_top5: at [MASK] inputs only).
PATH: an export folder (Hub format), a checkpoint (checkpoints/step-N) or a run directory (its
newest checkpoint). Without recipe=NAME the training config saved with the model is used;
key=value overrides apply on top (e.g. runtime.evaluation.max_batches=20).

--tasks NAMES: run lm-evaluation-harness tasks (comma-separated names or globs) on a decoder
instead (pip install 'hf_streamlm[eval]'). A run directory gives its export (else its newest
checkpoint). --include-path DIR adds your own task YAMLs (e.g. over a local JSONL: offline);
--limit N scores the first N documents of each task. The results go to the run's history.jsonl
(lm_eval/<task>/<metric>) and, for an export, to its model card."""


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--limit takes a positive number of documents per task, got '{value}'")
    return int(value)


def task_names(value: str) -> list[str]:
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--tasks needs at least one task name (e.g. --tasks hellaswag,my_task)")
    return names


def add_eval_args(parser: ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", metavar="PATH", help="an export, a checkpoint or a run directory")
    add_overrides(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    parser.add_argument("--tasks", type=task_names, metavar="NAMES",
                        help="lm-evaluation-harness tasks (comma-separated names or globs), on a decoder")
    parser.add_argument("--include-path", metavar="DIR", help="with --tasks: a folder of your own task YAMLs")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="with --tasks: the first N documents per task")
    parser.needs.update({"--json": "a file name (e.g. --json eval.json)",
                         "--tasks": "task names (e.g. --tasks hellaswag,my_task)",
                         "--include-path": "a folder (e.g. --include-path my_tasks/)",
                         "--limit": "a number (e.g. --limit 100)"})


def eval_command(ns: argparse.Namespace, overrides: list[str]) -> int:
    """Eval loss, perplexity and (MicroBERT) masked-token accuracy of an export or a checkpoint on the
    held-out stream the training loop evaluates on, through the ``evaluate`` modules in hf_streamlm.metrics;
    with ``--tasks``, lm-evaluation-harness tasks on a decoder instead."""
    import json
    from pathlib import Path

    path, json_file, tasks = ns.path, ns.json, ns.tasks
    if path is not None and OVERRIDE.match(path):  # `eval recipe=NAME PATH`: the folder came after a config argument
        folders = [a for a in overrides if not OVERRIDE.match(a)]
        overrides = [path, *(a for a in overrides if OVERRIDE.match(a))]
        path = folders[0] if len(folders) == 1 else None
    else:
        folders = [a for a in overrides if not OVERRIDE.match(a)]
        if folders:
            fail(f"eval takes one model folder, got '{path}' and '{folders[0]}' (overrides are key=value)")
    if path is None:
        fail("eval needs a model folder: eval PATH [recipe=NAME] [key=value ...] [--json FILE]")
    if tasks is None and (ns.include_path or ns.limit):
        fail("--include-path and --limit go with --tasks NAMES (lm-evaluation-harness tasks)")
    if tasks is not None:
        if overrides:
            fail(f"--tasks runs lm-evaluation-harness tasks; key=value overrides ({overrides[0]}) choose the "
                 "held-out stream of the other mode: drop them or drop --tasks")
        return tasks_command(path, tasks, ns.include_path, ns.limit, json_file)

    from hf_streamlm.evaluation import evaluate_model

    result = evaluate_model(path, overrides)
    if json_file:
        Path(json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(json_file).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['kind']} {result['model']} ({result['family']}), recipe {result['recipe']}: "
          f"{result['blocks']} held-out blocks in {result['batches']} batches, {result['eval_tokens']:,} tokens scored")
    print(f"  held out   {result['held_out']}")
    for key in ("eval_loss", "eval_perplexity", "eval_bits_per_byte", "eval_accuracy", "eval_mask_accuracy",
                "eval_mask_top5"):
        if key in result:
            print(f"  {key.removeprefix('eval_'):<13} {result[key]:.6g}")
    if json_file:
        print(f"  written to {json_file}")
    return 0


def tasks_command(path: str, tasks: list[str], include_path: str | None, limit: int | None,
                  json_file: str | None) -> int:
    """``eval PATH --tasks``: lm-evaluation-harness on a decoder, the results printed and recorded."""
    import json
    from pathlib import Path

    from hf_streamlm.evaluation import HARNESS_PREFIX, evaluate_tasks

    result = evaluate_tasks(path, tasks, include_path, limit)
    if json_file:
        Path(json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(json_file).write_text(json.dumps(result, indent=2) + "\n")
    at = f" (step {result['step']})" if result["step"] is not None else ""
    print(f"{result['kind']} {result['model']}{at}: lm-evaluation-harness {', '.join(tasks)}")
    figures = {k: v for k, v in result.items() if k.startswith(HARNESS_PREFIX + "/")}
    width = max(map(len, figures), default=0)
    for key, value in figures.items():
        task = key.split("/")[1]
        print(f"  {key:<{width}}  {value:.4f}  ({result['samples'].get(task, '?')} samples)")
    for what in ("history", "model_card"):
        if what in result:
            print(f"  written to {result[what]}")
    if json_file:
        print(f"  written to {json_file}")
    return 0


def add_export_args(parser: ArgumentParser) -> None:
    from hf_streamlm.models.export_formats import EXPORT_FORMATS

    parser.add_argument("path", help="a checkpoint folder (checkpoints/step-N) or a run directory (newest checkpoint)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="native",
                        help="native: stock BertForMaskedLM/LlamaForCausalLM; custom: hf_streamlm classes + auto_map")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write")


def export_command(ns: argparse.Namespace, overrides: list[str]) -> int:
    from hf_streamlm.export import export_checkpoint

    out = export_checkpoint(ns.path, ns.output, ns.format)
    print(f"Exported {ns.path} ({ns.format}) to {out}")
    return 0


def add_push_args(parser: ArgumentParser) -> None:
    from hf_streamlm.config import HubConfig

    parser.add_argument("path", help="an export folder, or a run directory (its export/); training state "
                                     "(optimizer, scheduler, RNG, pickles) is never uploaded")
    parser.add_argument("--repo-id", required=True, metavar="USER/NAME")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=HubConfig.private,
                            help="create the repository as private (the default, as hub.private)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create it as public")
    parser.add_argument("--revision", default=None, metavar="BRANCH",
                        help="branch to push to (created from main if missing)")
    parser.add_argument("--commit-message", default=HubConfig.commit_message, metavar="TEXT")


def push_command(ns: argparse.Namespace, overrides: list[str]) -> int:
    """``push_export`` with flags: the token is HF_TOKEN or the stored login (``hf auth login``)."""
    from hf_streamlm.config import Config, HubConfig
    from hf_streamlm.export import export_to_push, push_export

    hub = HubConfig(push=True, repo_id=ns.repo_id, private=ns.private, revision=ns.revision,
                    commit_message=ns.commit_message)
    folder = export_to_push(ns.path)
    url = push_export(folder, Config(hub=hub))
    print(f"Pushed {folder} to {ns.repo_id}" + (f" (branch {ns.revision})" if ns.revision else "") + f": {url}")
    return 0


def add_tokenizer_args(parser: ArgumentParser) -> None:
    add_overrides(parser)
    parser.add_argument("--output", metavar="DIR", help="folder to save it in (default: the run's tokenizer/, where "
                                                        "train looks for it)")
    parser.needs["--output"] = "a folder"


def tokenizer_command(ns: argparse.Namespace, overrides: list[str]) -> int:
    """Train (or load) the recipe's tokenizer and save it where ``train`` looks for it."""
    from pathlib import Path

    from tqdm.auto import tqdm

    from hf_streamlm.data import iter_texts
    from hf_streamlm.tokenizer import build_tokenizer

    output = ns.output
    config = load_config(overrides)
    target = Path(output) if output else config.output_dir / "tokenizer"
    from hf_streamlm.tokenizer.train import tokenizer_doc_limit

    limit = tokenizer_doc_limit(config)  # tokenizer.train_samples and data.max_samples: the smaller
    texts = tqdm(iter_texts(config, limit=limit), total=limit, desc="tokenizer", unit=" docs")
    tokenizer = build_tokenizer(config, texts)
    tokenizer.save_pretrained(target)
    if config.tokenizer.kind == "bpe" and (target / "tokenizer.json").is_file():
        _write_vocab_and_merges(target)
    print(f"Saved a {len(tokenizer)}-token tokenizer to {target}")
    return 0


def add_stats_args(parser: ArgumentParser) -> None:
    add_overrides(parser)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--plot", metavar="FILE", help="write a histogram of tokens per document")
    parser.needs["--plot"] = "a file name (e.g. --plot tokens.png)"


def stats_command(ns: argparse.Namespace, overrides: list[str]) -> int:
    """Seed 002's sample_stats: docs, tokens, blocks and speed of the recipe's pipeline (data.max_samples docs)."""
    import json
    import time
    from pathlib import Path

    from hf_streamlm.data.stats import DEFAULT_MAX_DOCS, pipeline_stats, plot_token_histogram
    from hf_streamlm.tokenizer import build_tokenizer

    as_json, plot = ns.json, ns.plot
    config = load_config(overrides)
    max_docs = config.data.max_samples or DEFAULT_MAX_DOCS

    start = time.perf_counter()
    saved = config.output_dir / "tokenizer"
    t = config.tokenizer
    if not (t.path or t.name or t.tokenizer_json or t.vocab) and (saved / "tokenizer.json").is_file():
        # What `train` would use: the tokenizer saved in the run (e.g. by `hf-streamlm tokenizer`).
        config.tokenizer.path = str(saved)
    tokenizer = build_tokenizer(config)
    tokenizer_s = time.perf_counter() - start

    stats = pipeline_stats(config, tokenizer, max_docs)
    doc_tokens = stats.pop("doc_tokens")
    stats = {"recipe": config.recipe, "max_docs_default": config.data.max_samples is None, **stats,
             "vocab_size": len(tokenizer), "tokenizer_s": tokenizer_s}
    if plot:
        plot_token_histogram(doc_tokens, plot, f"tokens per document: {config.recipe or 'config'}, {len(doc_tokens)} docs")
        stats["plot"] = str(Path(plot))
    if as_json:
        print(json.dumps(stats))
        return 0
    where = ("data.max_samples is null: the first 1000 documents (default; set data.max_samples to change)"
             if stats["max_docs_default"] else f"data.max_samples={max_docs}")
    print(f"recipe {config.recipe}: {where}")
    rows = [
        ("docs", f"{stats['docs']:,}"),
        ("tokens", f"{stats['tokens']:,}"),
        ("blocks", f"{stats['blocks']:,} x {stats['sequence_length']} tokens ({stats['block_tokens']:,} not padding)"),
        ("batches", f"{stats['batches']:,} x {stats['batch_size']} blocks"),
        ("avg tokens/doc", f"{stats['avg_tokens']:.1f}"),
        ("median tokens/doc", f"{stats['median_tokens']:g} (min {stats['min_tokens']}, max {stats['max_tokens']})"),
        ("bytes/token", f"{stats['bytes_per_token']:.2f}"),
        ("docs/s", f"{stats['docs_per_s']:,.0f}"),
        ("tokens/s", f"{stats['tokens_per_s']:,.0f}"),
        ("pipeline time", f"{stats['seconds']:.2f} s (tokenizer {tokenizer_s:.2f} s, not counted)"),
        ("vocab", f"{stats['vocab_size']:,}"),
    ]
    rows += [("docs per source", "")] + [(f"  {label}", f"{n:,}") for label, n in stats["sources"].items()]
    rows += [("docs skipped", f"{sum(stats['skipped'].values()):,}")]
    rows += [(f"  {kind}", f"{n:,}") for kind, n in stats["skipped"].items()]
    if plot:
        rows.append(("histogram", stats["plot"]))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def add_cache_args(parser: ArgumentParser) -> None:
    # The default spelled out, not imported: hf_streamlm.data.cache imports datasets, which every command
    # would then pay for when the parser is built (tests/test_docs.py checks the two agree).
    parser.add_argument("action", choices=("info", "clear", "usage"))
    parser.add_argument("overrides", nargs="*", metavar="recipe=NAME",
                        help="take data.cache_dir from this recipe (and key=value overrides)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR", help="cache folder (default: .dataset_cache here)")
    parser.add_argument("--key", default=None, metavar="KEY", help="clear: only the entry with this key (or a unique prefix)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def cache_command(ns: argparse.Namespace, overrides: list[str]) -> int:
    """Seed 003's cache_manager.py: list, measure or clear ``<cache_dir>/processed``."""
    import json

    from hf_streamlm.data.cache import cache_entries, cache_root, cache_usage, clear_cache

    if overrides and ns.cache_dir:
        raise ConfigError("give --cache-dir or recipe=NAME, not both")
    cache_dir = load_config(overrides).data.cache_dir if overrides else ns.cache_dir
    root = cache_root(cache_dir)

    if ns.action == "info":
        entries = cache_entries(cache_dir)
        if ns.json:
            print(json.dumps(entries))
            return 0
        if not entries:
            print(f"cache is empty ({root})")
        for e in entries:
            print(f"{e['key'][:12]}  {e.get('label') or e['source'].get('path')}  {e['docs']:,} docs  "
                  f"{_human_bytes(e['size'])}  {e['created']}")
    elif ns.action == "clear":
        removed = clear_cache(cache_dir, ns.key)
        if ns.key is not None and not removed:
            raise ConfigError(f"no cache entry with key '{ns.key}' in {root} (see: hf-streamlm cache info)")
        noun = "entry" if removed == 1 else "entries"
        print(json.dumps({"removed": removed}) if ns.json else f"removed {removed} cache {noun} from {root}")
    else:
        total = cache_usage(cache_dir)
        usage = {"bytes": total, "size": _human_bytes(total), "path": str(root)}
        print(json.dumps(usage) if ns.json else f"{usage['size']}  {root}")
    return 0


def _write_vocab_and_merges(folder) -> None:
    """Seed 004 lists vocab.json and merges.txt beside tokenizer.json; write them from the BPE model."""
    import json

    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    if model.get("type") != "BPE":
        return
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def models_command(ns: argparse.Namespace, overrides: list[str]) -> int:
    """Seed 003's model_config_comparison.py: every recipe's and preset's model, its training memory traced
    (``hf-streamlm plan``'s step on fake tensors, one GPU)."""
    import hf_streamlm.models  # noqa: F401  (registers the families with the Auto classes)
    from hf_streamlm.config import ModelConfig, build
    from hf_streamlm.models.presets import MODEL_PRESETS, PRESET_VOCAB, SEED_PARAMETER_COUNTS
    from hf_streamlm.plan import read_layout
    from hf_streamlm.plan.planner import rank_memory
    from hf_streamlm.train.builders import estimate

    one_gpu = read_layout(None, 1)
    peaks: dict[tuple, int] = {}

    def traced_peak(config) -> int:  # recipes of one shape (runpod_1b and its variants) are traced once
        d = config.data
        key = (repr(config.model), d.batch_size, d.sequence_length, d.gradient_accumulation_steps, d.document_masking,
               d.mlm_probability, config.runtime.precision, config.optimizer.algorithm, config.tokenizer.vocab_size)
        if key not in peaks:
            peaks[key] = rank_memory(config, one_gpu).peak
        return peaks[key]

    rows = []
    for name in available_recipes():
        config = load_config([f"recipe={name}"])
        vocab = config.model.vocab_size or config.tokenizer.vocab_size
        e = estimate(config.model, vocab, config.data.sequence_length, config.data.batch_size)
        rows.append((f"recipe={name}", e, traced_peak(config), ""))
    for name, values in MODEL_PRESETS.items():
        m = build(ModelConfig, values)
        vocab, length = PRESET_VOCAB[m.type], m.max_position_embeddings
        config = load_config([f"model.preset={name}", f"tokenizer.vocab_size={vocab}", "data.batch_size=1",
                              f"data.sequence_length={length}", "data.gradient_accumulation_steps=1",
                              "runtime.precision=bf16", *(["tokenizer.kind=bpe"] if m.type == "decoder" else [])])
        rows.append((f"preset={name}", estimate(m, vocab, length, 1), traced_peak(config),
                     SEED_PARAMETER_COUNTS.get(name, "")))
    width = max(34, *(len(label) + 1 for label, *_ in rows))  # the longest name, at least the old width
    header = (f"{'model':<{width}}{'family':<11}{'layers':>7}{'heads':>6}{'kv':>4}{'hidden':>7}{'inter':>7}{'vocab':>7}"
              f"{'params':>15}{'FLOPs/token':>13}{'train mem':>11}  seed")
    print(header)
    for label, e, peak, seed in rows:
        print(f"{label:<{width}}{e['type']:<11}{e['layers']:>7}{e['heads']:>6}{e['kv_heads']:>4}{e['hidden']:>7}"
              f"{e['intermediate']:>7}{e['vocab']:>7}{e['params']:>15,}{e['flops_per_token']:>13.3g}"
              f"{peak / 2**30:>9.2f}Gi  {seed}")
    print("\nFLOPs/token = 6N + 12·L·d·T (Kaplan et al. 2020 + attention; T = sequence length). train mem = the"
          " storage peak of one optimizer step on one GPU, traced on fake tensors as `hf-streamlm plan` traces it"
          " (docs/plan.md): the recipe's micro-batch, sequence length, precision, attention kernel (fused SDPA: no"
          " T x T scores), activation checkpointing and loss chunk; fused AdamW (Muon with optimizer.algorithm=muon)."
          " Presets: micro-batch 1 at their full length, bf16. Per-GPU figures under DDP, ZeRO or FSDP2, and the"
          " headroom on a given GPU: hf-streamlm plan recipe=NAME --config FILE.")
    return 0


def add_plan_args(parser: ArgumentParser) -> None:
    from hf_streamlm.plan.gpus import CALIBRATION_FILE, GPUS

    add_overrides(parser)
    parser.add_argument("--gpus", type=positive_count, metavar="N",
                        help="GPUs (one process each); default: the --config file's num_processes, else 1")
    parser.add_argument("--gpu", choices=GPUS, default="h100-80gb", help="the GPU model (default h100-80gb)")
    parser.add_argument("--config", metavar="FILE", help="an accelerate config (accelerate_configs/*.yaml): DDP, "
                                                         "DeepSpeed ZeRO-2/3 (+offload) or FSDP2")
    parser.add_argument("--price-per-gpu-hour", type=price, metavar="USD", help="price of one GPU for an hour")
    parser.add_argument("--calibration", metavar="FILE",
                        help=f"measured MFU and memory ratio per GPU (default: {CALIBRATION_FILE} here, if present)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.needs.update({"--gpus": "a number (e.g. --gpus 8)", "--config": "a file (e.g. --config "
                         "accelerate_configs/deepspeed_zero2.yaml)", "--price-per-gpu-hour": "a price (e.g. 2.49)",
                         "--calibration": "a file (e.g. --calibration plan_calibration.json)"})


def positive_count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--gpus takes a positive number of GPUs, got '{value}'")
    return int(value)


def price(value: str) -> float:
    try:
        amount = float(value)
    except ValueError:
        amount = -1.0
    if not amount >= 0:
        raise argparse.ArgumentTypeError(f"--price-per-gpu-hour takes a price (e.g. 2.49), got '{value}'")
    return amount


def plan_command(ns: argparse.Namespace, overrides: list[str]) -> int:
    """Trace one optimizer step of the recipe on fake tensors under the accelerate config's sharding: per-GPU
    peak memory and headroom, what to change when it does not fit, tokens/s, time to the budget, cost."""
    import json

    import hf_streamlm.models  # noqa: F401  (registers the families with the Auto classes)
    from hf_streamlm.plan import format_plan, make_plan

    if not overrides:
        fail("plan needs a recipe: plan recipe=NAME [key=value ...] [--gpus N] [--gpu NAME] [--config FILE]")
    plan = make_plan(overrides, ns.gpus, ns.gpu, ns.config, ns.price_per_gpu_hour, ns.calibration)
    print(json.dumps(plan) if ns.json else format_plan(plan))
    return 0


def train_command(ns: argparse.Namespace, overrides: list[str]) -> int:
    return train_main(overrides)


def recipes_command(ns: argparse.Namespace, overrides: list[str]) -> int:
    print("\n".join(available_recipes()))
    return 0


def add_config_args(parser: ArgumentParser) -> None:
    add_overrides(parser)
    parser.add_argument("--reference", action="store_true",
                        help="print the reference of every key as Markdown (docs/configuration.md) instead")


def config_command(ns: argparse.Namespace, overrides: list[str]) -> int:
    if ns.reference:
        if overrides:
            fail("--reference lists every key of every recipe; it takes no recipe=NAME or key=value")
        from hf_streamlm.config import reference_markdown

        print(reference_markdown(), end="")
        return 0
    print(load_config(overrides).to_yaml(), end="")
    return 0


Handler = Callable[[argparse.Namespace, list[str]], int]
SUBCOMMANDS: dict[str, tuple[Callable[[ArgumentParser], None] | None, Handler, bool]] = {
    "train": (add_overrides, train_command, True),
    "config": (add_config_args, config_command, True),
    "recipes": (None, recipes_command, False),
    "tokenizer": (add_tokenizer_args, tokenizer_command, True),
    "stats": (add_stats_args, stats_command, True),
    "models": (None, models_command, False),
    "plan": (add_plan_args, plan_command, True),
    "eval": (add_eval_args, eval_command, True),
    "export": (add_export_args, export_command, False),
    "push": (add_push_args, push_command, False),
    "cache": (add_cache_args, cache_command, True),
}
"""name -> (adds its arguments, runs it, takes recipe=NAME/key=value config arguments)."""

LOGS = {"tokenizer", "stats", "eval", "export", "push"}
"""Subcommands that log as training does (``train`` sets its logging up itself)."""

EPILOGS = {"eval": lambda: EVAL_HELP}


def build_parser() -> ArgumentParser:
    """The ``hf-streamlm`` parser, one subparser per entry of :data:`COMMANDS`."""
    parser = ArgumentParser(prog="hf-streamlm", description="Pretrain language models on streamed data "
                            "(python -m hf_streamlm.run and accelerate launch take the same recipe=NAME key=value).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=ArgumentParser,
                                required=True)
    parser.commands = {}
    for name, (add_args, _, takes_config) in SUBCOMMANDS.items():
        epilog = EPILOGS.get(name, config_epilog if takes_config and name != "cache" else None)
        command = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name], epilog_fn=epilog)
        if add_args is not None:
            add_args(command)
        parser.commands[name] = command
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    if argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        fail(f"unknown command '{argv[0]}'. Commands: {', '.join(COMMANDS)}")
    ns, extras = parser.parse_known_args(argv)
    overrides = parser.commands[ns.command].split_overrides(getattr(ns, "overrides", []), extras)
    _, handler, takes_config = SUBCOMMANDS[ns.command]
    if overrides and not takes_config:
        fail(f"{ns.command} takes no key=value or further arguments, got '{overrides[0]}'")
    try:
        if ns.command in LOGS:
            setup_logging()
        return handler(ns, overrides)
    except ConfigError as err:
        fail(str(err))
    return 2


if __name__ == "__main__":
    sys.exit(main())
