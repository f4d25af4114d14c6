"""The ``hf-streamlm`` console script: ``train``, ``recipes``, ``config``."""

from __future__ import annotations

import sys

from hf_streamlm.config import ConfigError, available_recipes, load_config
from hf_streamlm.run import fail
from hf_streamlm.run import main as train_main

COMMANDS = {
    "train": "train a model: hf-streamlm train recipe=NAME [key=value ...]",
    "recipes": "list the shipped recipes",
    "config": "print the resolved config of recipe=NAME [key=value ...] as YAML",
}


def usage() -> str:
    return "usage: hf-streamlm COMMAND [args]\n\n" + "\n".join(f"  {k:<10}{v}" for k, v in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    if command == "recipes":
        print("\n".join(available_recipes()))
        return 0
    if command == "config":
        try:
            print(load_config(rest).to_yaml(), end="")
        except ConfigError as err:
            fail(str(err))
        return 0
    fail(f"unknown command '{command}'. Commands: {', '.join(COMMANDS)}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
