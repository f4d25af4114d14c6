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
    "export": "export a checkpoint or run directory in Hub format: export PATH [--format native|custom] --output DIR",
    "push": "upload an export folder to the Hub: push DIR --repo-id USER/NAME [--private] [--revision BRANCH]",
}


def usage() -> str:
    return "usage: hf-streamlm COMMAND [args]\n\ncommands:\n" + "\n".join(f"  {k:<9}{v}" for k, v in COMMANDS.items())


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
    from huggingface_hub import HfApi

    parser = argparse.ArgumentParser(prog="hf-streamlm push", description=COMMANDS["push"])
    parser.add_argument("path", help="an export folder")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--commit-message", default="Upload model trained with hf_streamlm")
    ns = parser.parse_args(args)
    api = HfApi()
    api.create_repo(ns.repo_id, private=ns.private, exist_ok=True)
    api.upload_folder(repo_id=ns.repo_id, folder_path=ns.path, revision=ns.revision, commit_message=ns.commit_message)
    print(f"Pushed {ns.path} to {ns.repo_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            return train_main(rest)
        if command == "recipes":
            print("\n".join(available_recipes()))
            return 0
        if command == "config":
            if rest == ["--reference"]:
                from hf_streamlm.config import reference_markdown

                print(reference_markdown(), end="")
                return 0
            print(load_config(rest).to_yaml(), end="")
            return 0
        if command in ("export", "push"):
            setup_logging()
            return (export_command if command == "export" else push_command)(rest)
    except ConfigError as err:
        fail(str(err))
    fail(f"unknown command '{command}'. Commands: {', '.join(COMMANDS)}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
