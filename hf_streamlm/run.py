"""``python -m hf_streamlm.run recipe=NAME key=value ...``: train (also under ``accelerate launch``).

Exit statuses (docs/troubleshooting.md): 0 finished or stopped by a signal with a checkpoint; 2 bad
input (unknown key, wrong type, unknown recipe, impossible combination, unreadable data before any
step, a refused resume), one line naming what is wrong; 3 stopped on a NaN/inf with the last good state
saved; 4 a data source failed after training started, with the last completed step saved.
"""

from __future__ import annotations

import logging
import os
import sys

from hf_streamlm.config import ConfigError, describe, load_config
from hf_streamlm.config.errors import one_line
from hf_streamlm.env import launched_by_accelerate

USAGE = """usage: python -m hf_streamlm.run recipe=NAME [section.key=value ...]
       accelerate launch [--config_file accelerate_configs/X.yaml] -m hf_streamlm.run recipe=NAME ...

Values are YAML: lists and mappings work (data.sources='[{path: json, data_files: a.jsonl}]').
Precedence: command line > recipe > defaults. Keys:
"""


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
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + describe())
        return 0
    try:
        config = load_config(argv)
    except ConfigError as err:
        fail(str(err))
    setup_logging()
    from hf_streamlm.train.loop import train
    from hf_streamlm.train.stops import DataFailure
    from hf_streamlm.train.monitor import NonFiniteError

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
    return 0


def command_line(argv: list[str]) -> str:
    """The command that started this run, for the model card (``accelerate launch`` when launched by it)."""
    import shlex

    launcher = "accelerate launch -m hf_streamlm.run" if launched_by_accelerate() else "python -m hf_streamlm.run"
    return " ".join([launcher, *map(shlex.quote, argv)])


if __name__ == "__main__":
    sys.exit(main())
