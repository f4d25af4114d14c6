"""``python -m hf_streamlm.run recipe=NAME key=value ...``: train (also under ``accelerate launch``).

Exit statuses (docs/troubleshooting.md): 0 finished or stopped by a signal with a checkpoint; 2 bad
input (unknown key, wrong type, unknown recipe, impossible combination, unreadable data before any
step, a refused resume), one line naming what is wrong; 3 stopped on a NaN/inf with the last good state
saved; 4 a data source failed after training started, with the last completed step saved; 5 stopped after
``runtime.spikes.max_rollbacks`` rollbacks after loss spikes.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from hf_streamlm.config import ConfigError, describe, load_config
from hf_streamlm.config.errors import one_line
from hf_streamlm.env import launched_by_accelerate

USAGE = """python -m hf_streamlm.run recipe=NAME [section.key=value ...]
       accelerate launch [--config_file accelerate_configs/X.yaml] -m hf_streamlm.run recipe=NAME ..."""

CONFIG_HELP = """Values are YAML: lists and mappings work (data.sources='[{path: json, data_files: a.jsonl}]').
Precedence: command line > recipe > defaults. Keys:
"""

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
"""A ``section.key=value`` argument (``recipe=NAME`` included)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with this project's error line (``hf-streamlm: error: ...``, exit 2, no usage block) and
    ``key=value`` config arguments left to :func:`load_config`.

    ``needs`` names what an option's value is, for the message when it is missing (``--json needs a
    file name``); ``epilog_fn`` builds the help's epilog only when help is printed (the config key
    reference takes a second to build)."""

    def __init__(self, *args, needs: dict[str, str] | None = None, epilog_fn=None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --js is not --json: documented flags are checked as written
        super().__init__(*args, **kwargs)
        self.needs = needs or {}
        self.epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self.epilog_fn is not None and self.epilog is None:
            self.epilog = self.epilog_fn()
        return super().format_help()

    def error(self, message: str):
        m = re.match(r"argument ([^:]+): (.*)", message)
        if m:
            flag, why = m.group(1).split("/")[-1], m.group(2)
            message = f"{flag} needs {self.needs[flag]}" if why.startswith("expected") and flag in self.needs \
                else why if flag.startswith("-") and not why.startswith(("expected", "invalid choice")) else f"{flag}: {why}"
        fail(message)

    def options(self) -> str:
        return ", ".join(" ".join([a.option_strings[-1], *([a.metavar] if a.metavar and a.nargs != 0 else [])])
                         for a in self._actions if a.option_strings and a.dest != "help")

    def split_overrides(self, given: list[str], extras: list[str]) -> list[str]:
        """The ``key=value`` arguments among ``given`` (parsed as positionals) and ``extras`` (what
        ``parse_known_args`` left); an unknown ``--option`` is refused, naming the ones there are."""
        for arg in extras:
            if arg.startswith("-"):
                fail(f"unknown option '{arg}' for {self.prog.removeprefix('hf-streamlm ')}; options: {self.options()}")
        return [*given, *extras]


def config_epilog() -> str:
    return CONFIG_HELP + describe()


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe=NAME (a shipped recipe or a YAML file) and section.key=value overrides")


def run_parser() -> ArgumentParser:
    """``python -m hf_streamlm.run`` (and ``hf-streamlm train``): config arguments only."""
    parser = ArgumentParser(prog="python -m hf_streamlm.run", usage=USAGE, epilog_fn=config_epilog,
                            description="Train a model according to a recipe and overrides (exit statuses: "
                                        "docs/troubleshooting.md).")
    add_overrides(parser)
    return parser


def fail(message: str) -> None:
    print(f"hf-streamlm: error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)


def setup_logging() -> None:
    main = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    import datasets
    import transformers

    datasets.utils.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    for name in ("accelerate", "matplotlib"):  # per-file checkpoint chatter; font cache notices
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = run_parser()
    ns, extras = parser.parse_known_args(argv)
    argv = parser.split_overrides(ns.overrides, extras)
    try:
        config = load_config(argv)
        from hf_streamlm.data.schedule import check_schedules

        check_schedules(config)  # before a tokenizer is trained: the run's length is known by the config
    except ConfigError as err:
        fail(str(err))
    setup_logging()
    from hf_streamlm.train.loop import train
    from hf_streamlm.train.stops import DataFailure
    from hf_streamlm.train.monitor import NonFiniteError
    from hf_streamlm.train.rollback import SPIKE_STOP_STATUS, SpikeStop

    try:
        train(config, command=command_line(argv))
    except ConfigError as err:  # bad input discovered while building (empty stream, vocab mismatch ...)
        fail(str(err))
    except NonFiniteError as err:  # diverged; the last good state is saved
        print(f"hf-streamlm: error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    except DataFailure as err:  # a source failed mid-run; the last completed step is saved
        print(f"hf-streamlm: error: {err}", file=sys.stderr)
        raise SystemExit(4) from None
    except SpikeStop as err:  # repeated loss spikes after runtime.spikes.max_rollbacks rollbacks
        print(f"hf-streamlm: error: {one_line(str(err))}", file=sys.stderr)
        raise SystemExit(SPIKE_STOP_STATUS) from None
    return 0


def command_line(argv: list[str]) -> str:
    """The command that started this run, for the model card (``accelerate launch`` when launched by it)."""
    import shlex

    launcher = "accelerate launch -m hf_streamlm.run" if launched_by_accelerate() else "python -m hf_streamlm.run"
    return " ".join([launcher, *map(shlex.quote, argv)])


if __name__ == "__main__":
    sys.exit(main())
