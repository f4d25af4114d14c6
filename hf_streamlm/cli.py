"""The ``hf-streamlm`` console script.

``train`` and ``config`` take the same ``recipe=NAME key=value`` arguments as
``python -m hf_streamlm.run``; the other commands take ordinary flags.
"""

from __future__ import annotations

import argparse
import sys

from hf_streamlm.config import ConfigError, available_recipes, load_config
from hf_streamlm.run import fail, setup_logging
from hf_streamlm.run import main as train_main

COMMANDS = {
    "train": "train a model: hf-streamlm train recipe=NAME [key=value ...]",
    "config": "print the resolved config of recipe=NAME [key=value ...] as YAML (--reference: all keys)",
    "recipes": "list the shipped recipes",
    "tokenizer": "train the recipe's tokenizer from its stream: tokenizer recipe=NAME [key=value ...] [--output DIR]",
    "stats": "measure the recipe's data pipeline: stats recipe=NAME [key=value ...] [--json] [--plot FILE]",
    "models": "list the named model shapes (model.preset=NAME) with parameter counts",
    "eval": "score a model on the held-out stream: eval PATH [recipe=NAME] [key=value ...] [--json FILE]; or on "
            "lm-evaluation-harness tasks: eval PATH --tasks NAMES [--include-path DIR] [--limit N]",
    "export": "export a checkpoint or run directory in Hub format: export PATH [--format native|custom] --output DIR",
    "push": "upload an export folder (or a run's export/) to the Hub: push DIR --repo-id USER/NAME [--private|--public] "
            "[--revision BRANCH]",
    "cache": "the processed-data cache: cache info|clear|usage [--cache-dir DIR | recipe=NAME] [--key KEY] [--json]",
}


def usage() -> str:
    width = max(map(len, COMMANDS)) + 2
    return "usage: hf-streamlm COMMAND [args]\n\ncommands:\n" + "\n".join(f"  {k:<{width}}{v}" for k, v in COMMANDS.items())


EVAL_USAGE = ("usage: hf-streamlm eval PATH [recipe=NAME] [key=value ...] [--json FILE]\n"
              "       hf-streamlm eval PATH --tasks NAMES [--include-path DIR] [--limit N] [--json FILE]")


def eval_command(args: list[str]) -> int:
    """Eval loss, perplexity and (MicroBERT) masked-token accuracy of an export or a checkpoint on the
    held-out stream the training loop evaluates on, through the ``evaluate`` modules in hf_streamlm.metrics;
    with ``--tasks``, lm-evaluation-harness tasks on a decoder instead."""
    import json
    from pathlib import Path

    path, json_file, overrides = None, None, []
    tasks, include_path, limit = None, None, None
    rest = iter(args)

    def value_of(option: str, what: str, example: str) -> str:
        value = next(rest, None)
        if value is None or value.startswith("-"):
            fail(f"{option} needs {what} (e.g. {option} {example})")
        return value

    for arg in rest:
        if arg in ("-h", "--help"):
            print(EVAL_USAGE + "\n\n"
                  "Score a model on the held-out stream: eval loss, perplexity, MicroBERT's masked-token accuracy.\n"
                  "PATH: an export folder (Hub format), a checkpoint (checkpoints/step-N) or a run directory (its\n"
                  "newest checkpoint). Without recipe=NAME the training config saved with the model is used;\n"
                  "key=value overrides apply on top (e.g. runtime.evaluation.max_batches=20).\n\n"
                  "--tasks NAMES: run lm-evaluation-harness tasks (comma-separated names or globs) on a decoder\n"
                  "instead (pip install 'hf_streamlm[eval]'). A run directory gives its export (else its newest\n"
                  "checkpoint). --include-path DIR adds your own task YAMLs (e.g. over a local JSONL: offline);\n"
                  "--limit N scores the first N documents of each task. The results go to the run's history.jsonl\n"
                  "(lm_eval/<task>/<metric>) and, for an export, to its model card.")
            return 0
        if arg == "--json":
            json_file = value_of("--json", "a file name", "eval.json")
        elif arg == "--tasks":
            tasks = [t.strip() for t in value_of("--tasks", "task names", "hellaswag,my_task").split(",") if t.strip()]
        elif arg == "--include-path":
            include_path = value_of("--include-path", "a folder", "my_tasks/")
        elif arg == "--limit":
            limit = value_of("--limit", "a number", "100")
            if not limit.isdigit() or int(limit) < 1:
                fail(f"--limit takes a positive number of documents per task, got '{limit}'")
            limit = int(limit)
        elif arg.startswith("-"):
            fail(f"unknown option '{arg}' for eval; options: --json FILE, --tasks NAMES, --include-path DIR, --limit N")
        elif "=" in arg:
            overrides.append(arg)
        elif path is None:
            path = arg
        else:
            fail(f"eval takes one model folder, got '{path}' and '{arg}' (overrides are key=value)")
    if path is None:
        fail("eval needs a model folder: " + EVAL_USAGE.split("\n")[0].removeprefix("usage: "))
    if tasks is None and (include_path or limit):
        fail("--include-path and --limit go with --tasks NAMES (lm-evaluation-harness tasks)")
    if tasks is not None:
        if not tasks:
            fail("--tasks needs at least one task name (e.g. --tasks hellaswag,my_task)")
        if overrides:
            fail(f"--tasks runs lm-evaluation-harness tasks; key=value overrides ({overrides[0]}) choose the "
                 "held-out stream of the other mode: drop them or drop --tasks")
        return tasks_command(path, tasks, include_path, limit, json_file)

    from hf_streamlm.evaluation import evaluate_model

    result = evaluate_model(path, overrides)
    if json_file:
        Path(json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(json_file).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['kind']} {result['model']} ({result['family']}), recipe {result['recipe']}: "
          f"{result['blocks']} held-out blocks in {result['batches']} batches, {result['eval_tokens']:,} tokens scored")
    print(f"  held out   {result['held_out']}")
    for key in ("eval_loss", "eval_perplexity", "eval_accuracy"):
        if key in result:
            print(f"  {key.removeprefix('eval_'):<10} {result[key]:.6g}")
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


def export_command(args: list[str]) -> int:
    from hf_streamlm.export import export_checkpoint
    from hf_streamlm.models.export_formats import EXPORT_FORMATS

    parser = argparse.ArgumentParser(prog="hf-streamlm export", description=COMMANDS["export"])
    parser.add_argument("path", help="a checkpoint folder (checkpoints/step-N) or a run directory (newest checkpoint)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="native",
                        help="native: stock BertForMaskedLM/LlamaForCausalLM; custom: hf_streamlm classes + auto_map")
    parser.add_argument("--output", required=True, help="folder to write")
    ns = parser.parse_args(args)
    out = export_checkpoint(ns.path, ns.output, ns.format)
    print(f"Exported {ns.path} ({ns.format}) to {out}")
    return 0


def push_command(args: list[str]) -> int:
    """``push_export`` with flags: the token is HF_TOKEN or the stored login (``hf auth login``)."""
    from hf_streamlm.config import Config, HubConfig
    from hf_streamlm.export import export_to_push, push_export

    parser = argparse.ArgumentParser(prog="hf-streamlm push", description=COMMANDS["push"])
    parser.add_argument("path", help="an export folder, or a run directory (its export/); training state "
                                     "(optimizer, scheduler, RNG, pickles) is never uploaded")
    parser.add_argument("--repo-id", required=True)
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=HubConfig.private,
                            help="create the repository as private (the default, as hub.private)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create it as public")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--commit-message", default=HubConfig.commit_message)
    ns = parser.parse_args(args)
    hub = HubConfig(push=True, repo_id=ns.repo_id, private=ns.private, revision=ns.revision,
                    commit_message=ns.commit_message)
    folder = export_to_push(ns.path)
    url = push_export(folder, Config(hub=hub))
    print(f"Pushed {folder} to {ns.repo_id}" + (f" (branch {ns.revision})" if ns.revision else "") + f": {url}")
    return 0


def tokenizer_command(args: list[str]) -> int:
    """Train (or load) the recipe's tokenizer and save it where ``train`` looks for it."""
    from pathlib import Path

    from tqdm.auto import tqdm

    from hf_streamlm.data import iter_texts
    from hf_streamlm.tokenizer import build_tokenizer

    output = None
    if "--output" in args:
        i = args.index("--output")
        if i + 1 >= len(args):
            fail("--output needs a folder")
        output, args = args[i + 1], args[:i] + args[i + 2 :]
    config = load_config(args)
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


def stats_command(args: list[str]) -> int:
    """Seed 002's sample_stats: docs, tokens, blocks and speed of the recipe's pipeline (data.max_samples docs)."""
    import json
    import time
    from pathlib import Path

    from hf_streamlm.data.stats import DEFAULT_MAX_DOCS, pipeline_stats, plot_token_histogram
    from hf_streamlm.tokenizer import build_tokenizer

    as_json, plot, overrides = False, None, []
    rest = iter(args)
    for arg in rest:
        if arg == "--json":
            as_json = True
        elif arg == "--plot":
            plot = next(rest, None)
            if plot is None or plot.startswith("-"):
                fail("--plot needs a file name (e.g. --plot tokens.png)")
        elif arg.startswith("-"):
            fail(f"unknown option '{arg}' for stats; options: --json, --plot FILE")
        else:
            overrides.append(arg)
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


def cache_command(args: list[str]) -> int:
    """Seed 003's cache_manager.py: list, measure or clear ``<cache_dir>/processed``."""
    import json

    from hf_streamlm.data.cache import DEFAULT_CACHE_DIR, cache_entries, cache_root, cache_usage, clear_cache

    parser = argparse.ArgumentParser(prog="hf-streamlm cache", description=COMMANDS["cache"])
    parser.add_argument("action", choices=("info", "clear", "usage"))
    parser.add_argument("config", nargs="*", metavar="recipe=NAME",
                        help="take data.cache_dir from this recipe (and key=value overrides)")
    parser.add_argument("--cache-dir", default=None, help=f"cache folder (default: {DEFAULT_CACHE_DIR} here)")
    parser.add_argument("--key", default=None, help="clear: only the entry with this key (or a unique prefix)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    ns = parser.parse_intermixed_args(args)  # recipe=NAME may come before or after the flags
    if ns.config and ns.cache_dir:
        raise ConfigError("give --cache-dir or recipe=NAME, not both")
    cache_dir = load_config(ns.config).data.cache_dir if ns.config else ns.cache_dir
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


def models_command(args: list[str]) -> int:
    """Seed 003's model_config_comparison.py: every recipe's and preset's model, sized without memory."""
    from hf_streamlm.config import ModelConfig, build
    from hf_streamlm.models.presets import MODEL_PRESETS, PRESET_VOCAB, SEED_PARAMETER_COUNTS
    from hf_streamlm.train.builders import estimate

    rows = []
    for name in available_recipes():
        config = load_config([f"recipe={name}"])
        vocab = config.model.vocab_size or config.tokenizer.vocab_size
        rows.append((f"recipe={name}", estimate(config.model, vocab, config.data.sequence_length,
                                                config.data.batch_size), ""))
    for name, values in MODEL_PRESETS.items():
        m = build(ModelConfig, values)
        rows.append((f"preset={name}", estimate(m, PRESET_VOCAB[m.type], m.max_position_embeddings, 1),
                     SEED_PARAMETER_COUNTS.get(name, "")))
    header = (f"{'model':<34}{'family':<10}{'layers':>7}{'heads':>6}{'kv':>4}{'hidden':>7}{'inter':>7}{'vocab':>7}"
              f"{'params':>15}{'FLOPs/token':>13}{'train mem':>11}  seed")
    print(header)
    for label, e, seed in rows:
        print(f"{label:<34}{e['type']:<10}{e['layers']:>7}{e['heads']:>6}{e['kv_heads']:>4}{e['hidden']:>7}"
              f"{e['intermediate']:>7}{e['vocab']:>7}{e['params']:>15,}{e['flops_per_token']:>13.3g}"
              f"{e['train_memory_gib']:>9.2f}Gi  {seed}")
    print("\nFLOPs/token = 6N + 12·L·d·T (Kaplan et al. 2020 + attention; T = sequence length). train mem = bf16"
          " mixed precision with AdamW: 16 bytes/param (fp32 weights, grads, two moments) + activations of one"
          " micro-batch without checkpointing (Korthikanti et al. 2022: T·b·d·(34 + 5·a·T/d) bytes per layer).")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("config", "tokenizer", "stats", "recipes", "models") and any(a in ("-h", "--help") for a in rest):
        from hf_streamlm.config import describe

        if command in ("recipes", "models"):
            print(f"usage: hf-streamlm {command}\n\n{COMMANDS[command]}")
            return 0
        print(f"usage: hf-streamlm {command} recipe=NAME [key=value ...]\n\n{COMMANDS[command]}\n\nConfig keys:\n"
              + describe())
        return 0
    try:
        if command == "train":
            return train_main(rest)
        if command == "recipes":
            print("\n".join(available_recipes()))
            return 0
        if command == "tokenizer":
            setup_logging()
            return tokenizer_command(rest)
        if command == "stats":
            setup_logging()
            return stats_command(rest)
        if command == "models":
            return models_command(rest)
        if command == "config":
            if rest == ["--reference"]:
                from hf_streamlm.config import reference_markdown

                print(reference_markdown(), end="")
                return 0
            print(load_config(rest).to_yaml(), end="")
            return 0
        if command == "cache":
            return cache_command(rest)
        if command == "eval":
            setup_logging()
            return eval_command(rest)
        if command in ("export", "push"):
            setup_logging()
            return (export_command if command == "export" else push_command)(rest)
    except ConfigError as err:
        fail(str(err))
    fail(f"unknown command '{command}'. Commands: {', '.join(COMMANDS)}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
