"""DOCS CHECK: every command in the README and in docs/ is exercised by a test or by this check.

Every shell command line in a fenced code block of ``README.md`` and ``docs/*.md`` (and, in
``docs/seed_commands.md``, whose tables are made of commands, every inline code span) that runs
``hf-streamlm``, ``python -m hf_streamlm.run``, ``accelerate launch`` or ``python benchmarks/...`` is
checked without running it:

- ``recipe=`` names a shipped recipe or a file (a ``cp recipes/X.yaml Y.yaml`` on the same page makes
  ``Y.yaml`` stand for recipe ``X``), and the ``key=value`` overrides validate with
  :func:`hf_streamlm.config.load_config` (a ``runtime.resume=`` checkpoint path is stood in for by an
  existing folder). A command followed by a documented ``hf-streamlm: error: ...`` line must fail with
  that message instead;
- ``accelerate launch``: the flags parse with accelerate's own launch parser and pass its validation,
  the ``--config_file`` exists and loads with accelerate's loader, and the script is
  ``-m hf_streamlm.run``;
- ``hf-streamlm CMD``: the arguments parse with the console script's own argparse subparser (flags,
  their values and choices, the positional arguments it takes), and what it leaves must be
  ``key=value`` config arguments of a subcommand that takes them; ``hf-streamlm CMD --help`` exits 0,
  once per distinct subcommand, and every subcommand's help has the same shape;
- ``python benchmarks/X.py``: the script exists, and its ``--help`` (once per script and subcommand)
  shows every flag used.

Placeholders that stand in config values (``$SLURM_NODEID``, ``<experiment>``) are substituted from
:data:`PLACEHOLDERS`; one left in a checked argument fails. Placeholders in paths that are not
validated (``hf-streamlm export runs/<exp>/...``) are left as they are.

Links between pages are checked too: every relative link and ``#anchor`` resolves, and the index
``docs/README.md`` lists every page.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from hf_streamlm import cli
from hf_streamlm.config import ConfigError, load_config
from hf_streamlm.run import OVERRIDE
from hf_streamlm.run import main as run_main

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
INLINE_PAGES = {DOCS / "seed_commands.md"}
"""Pages whose inline code spans are commands too (tables of equivalents), not only their code blocks."""

PLACEHOLDERS = {
    "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)": "10.0.0.1",
    "$((SLURM_NNODES * 8))": "16",
    "$SLURM_NNODES": "2",
    "$SLURM_NODEID": "1",
    "$MAIN_IP": "10.0.0.1",
    "<experiment>": "quickstart",
}
"""Placeholders of the docs and the values they are checked with (the longest is replaced first)."""

WRAPPERS = {"nohup", "setsid", "exec", "time", "srun"}
"""Commands that run the command after them (``srun`` with its own options)."""


@dataclass(frozen=True)
class Command:
    page: Path
    line: int
    text: str  # as written (continuation lines joined, prompt removed)
    tokens: tuple[str, ...]  # one command, placeholders substituted, wrappers and env assignments removed
    kind: str  # cli | run | launch | bench
    error: str | None = None  # the documented "hf-streamlm: error: ..." line that follows it

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------


def fenced_blocks(text: str) -> list[list[tuple[int, str]]]:
    """The lines of every fenced code block, with their 1-based line numbers."""
    blocks, current, fence = [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m and current is None:
            current, fence = [], m.group(1)
        elif m and line.strip().startswith(fence) and current is not None:
            blocks.append(current)
            current = None
        elif current is not None:
            current.append((number, line))
    return blocks


def logical_lines(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined and a leading ``$ `` prompt removed."""
    out, i = [], 0
    while i < len(block):
        number, line = block[i]
        while line.rstrip().endswith("\\") and i + 1 < len(block):
            i += 1
            line = line.rstrip()[:-1] + " " + block[i][1].strip()
        line = line.strip()
        out.append((number, line[2:] if line.startswith("$ ") else line))
        i += 1
    return out


def inline_spans(text: str) -> list[tuple[int, str]]:
    """Inline code spans outside code blocks (``\\|`` in table cells unescaped)."""
    spans, in_block = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(r"^\s*(```|~~~)", line):
            in_block = not in_block
            continue
        if not in_block:
            spans += [(number, m.group(1).replace("\\|", "|")) for m in re.finditer(r"`([^`]+)`", line)]
    return spans


def substitute(line: str) -> str:
    for placeholder in sorted(PLACEHOLDERS, key=len, reverse=True):
        line = line.replace(placeholder, PLACEHOLDERS[placeholder])
    return line


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line: split at ``&&``, ``||``, ``;``, ``|``, ``&``; redirections,
    comments, environment assignments and wrappers (``nohup``, ``srun ...``) removed; ``bash -c '...'``
    opened."""
    line = re.sub(r"(?<=\s)[0-9]?(?:>>?|<)&?\s*\S+", " ", substitute(line))
    lexer = shlex.shlex(line, posix=True, punctuation_chars="();|&")  # not <>: placeholders
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: prose, unless it looks like one of our commands
        ours = re.search(r"hf-streamlm|hf_streamlm\.run|accelerate launch|benchmarks/", line)
        return [["<unparsable>", line]] if ours else []
    commands, current = [], []
    for token in tokens + [";"]:
        if token and set(token) <= set("&|;()"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    out = []
    for command in commands:
        while command and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]):
            command = command[1:]
        while command and command[0] in WRAPPERS:
            command = command[1:]
            while command and command[0].startswith("-"):  # the wrapper's own options (srun --x=y)
                command = command[1:]
        if len(command) >= 3 and command[0] in ("bash", "sh") and command[1] == "-c":
            out += split_commands(command[2])
        elif command:
            out.append(command)
    return out


def classify(tokens: list[str]) -> str | None:
    if tokens[0] == "<unparsable>":
        return "unparsable"
    if tokens[0] == "hf-streamlm":
        return "cli"
    if tokens[0] in ("python", "python3") and tokens[1:3] == ["-m", "hf_streamlm.run"]:
        return "run"
    if tokens[:2] == ["accelerate", "launch"]:
        return "launch"
    if tokens[0] in ("python", "python3") and len(tokens) > 1 and tokens[1].startswith("benchmarks/"):
        return "bench"
    return None


def page_items(page: Path) -> list[tuple[int, str, str | None]]:
    """(line, text, documented error) of every candidate command line of a page."""
    text = page.read_text()
    items = []
    for block in fenced_blocks(text):
        lines = logical_lines(block)
        for i, (number, line) in enumerate(lines):
            if not line or line.startswith("#"):
                continue
            following = lines[i + 1][1] if i + 1 < len(lines) else ""
            items.append((number, line, following if following.startswith("hf-streamlm: error:") else None))
    if page in INLINE_PAGES:
        items += [(number, span, None) for number, span in inline_spans(text)]
    return items


def recipe_aliases(page: Path) -> dict[str, str]:
    """``cp recipes/X.yaml Y.yaml`` on a page: ``Y.yaml`` stands for recipe ``X`` there."""
    return dict((m.group(2), m.group(1)) for m in re.finditer(r"cp recipes/(\w+)\.yaml (\S+\.ya?ml)", page.read_text()))


def extract() -> list[Command]:
    commands = []
    for page in PAGES:
        for number, text, error in page_items(page):
            for tokens in split_commands(text):
                kind = classify(tokens)
                if kind:
                    commands.append(Command(page, number, text, tuple(tokens), kind, error))
    return commands


COMMANDS = extract()


# --------------------------------------------------------------------------------------------------
# Helpers: help texts, flags, config arguments
# --------------------------------------------------------------------------------------------------


def captured(fn, *args) -> tuple[int, str]:
    """Call ``fn(*args)``, capturing stdout/stderr; (exit status, output)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = fn(*args)
        except SystemExit as exit_:
            rc = exit_.code
    return (0 if rc is None else rc if isinstance(rc, int) else 1), out.getvalue()


@cache
def cli_help(command: str) -> tuple[int, str]:
    return captured(cli.main, [command, "--help"])


@cache
def cli_parser():
    return cli.build_parser()


@cache
def bench_help(script: str, sub: str | None = None) -> tuple[int, str]:
    def run():
        saved = sys.argv
        sys.argv = [script, *([sub] if sub else []), "--help"]
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        finally:
            sys.argv = saved

    return captured(run)


def usage_text(help_text: str) -> str:
    """The usage block (to the first blank line) and the argparse options list of a help text; the
    description, which may mention flags in prose, is left out."""
    lines = help_text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.lower().startswith("usage:")), None)
    usage = []
    if start is not None:
        for line in lines[start:]:
            if not line.strip():
                break
            usage.append(line)
    options = [l for l in lines if re.match(r"^\s{2}(-\w[ ,]|--)", l)]
    return "\n".join(usage + options)


def flags_in(text: str) -> tuple[dict[str, set[str] | None], set[str]]:
    """``--flags`` of a usage text: flag -> its choices (empty set: takes any value; None: takes no
    value); and the choices of the first positional ``{a,b}``."""
    flags: dict[str, set[str] | None] = {}
    for m in re.finditer(r"(--[a-z][a-z0-9-]*)(?:[ =](\{[^}]+\}|[A-Z][A-Z_]*)(?![a-z]))?", text):
        flag, value = m.group(1), m.group(2)
        if value is None:
            flags.setdefault(flag, None)
        else:
            flags[flag] = set(value.strip("{}").split(",")) if value.startswith("{") else set()
    rest = re.sub(r"--[a-z][a-z0-9-]*[ =]\{[^}]+\}", "", text)
    choice = re.search(r"\{([\w,-]+)\}", rest)
    return flags, set(choice.group(1).split(",")) if choice else set()


def check_flags(args: list[str], flags: dict[str, set[str] | None], where: str) -> list[str]:
    """Check the ``--flags`` of ``args`` (and the values of those that take one); return the other args."""
    rest, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and not re.match(r"^-\d", arg):
            flag, eq, value = arg.partition("=")
            assert flag in flags, f"{where}: unknown flag {flag}; the usage shows {sorted(flags)}"
            choices = flags[flag]
            if choices is not None and not eq:
                assert i + 1 < len(args), f"{where}: {flag} needs a value"
                i += 1
                value = args[i]
            if choices:
                assert value in choices, f"{where}: {flag} {value!r} is not one of {sorted(choices)}"
        else:
            rest.append(arg)
        i += 1
    return rest


def no_placeholder(arg: str, where: str) -> None:
    assert "$" not in arg and not re.search(r"<[^>]*>", arg), (
        f"{where}: placeholder left in {arg!r}; write a real value or add it to PLACEHOLDERS in tests/test_docs.py")


def config_args(args: list[str], page: Path, where: str, resume_dir: Path) -> list[str]:
    """The ``recipe=``/``key=value`` arguments as :func:`load_config` should see them."""
    aliases = recipe_aliases(page)
    out = []
    for arg in args:
        no_placeholder(arg, where)
        assert re.match(r"^[A-Za-z_][\w.]*=", arg), f"{where}: {arg!r} is not a key=value argument"
        key, _, value = arg.partition("=")
        if key == "recipe" and value in aliases:
            value = aliases[value]  # a copy of a shipped recipe, made on the same page
        if key == "runtime.resume" and value not in ("auto", "never"):
            assert re.search(r"(^|/)(checkpoints|best)/step-\d+/?$", value), (
                f"{where}: {value!r} is not a checkpoint path")
            value = str(resume_dir)
        out.append(f"{key}={value}")
    return out


def check_config(args: list[str], command: Command, resume_dir: Path) -> None:
    resolved = config_args(args, command.page, command.where, resume_dir)
    if command.error is None:
        try:
            load_config(resolved)
        except ConfigError as err:
            pytest.fail(f"{command.where}: {command.text}\n  -> hf-streamlm: error: {err}")
        return
    with pytest.raises(ConfigError) as err:
        load_config(resolved)
    shown = command.error.removeprefix("hf-streamlm: error:").strip().split("...")[0].rstrip(" ,")
    assert str(err.value).startswith(shown), f"{command.where}: the docs show {shown!r}, the code says {err.value}"


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------


def check_cli(command: Command, resume_dir: Path) -> None:
    tokens = list(command.tokens)
    assert len(tokens) > 1, f"{command.where}: hf-streamlm without a subcommand"
    name = tokens[1]
    if re.fullmatch(r"<[^>]+>", name):  # `hf-streamlm <cmd> --help`: a placeholder for any of them
        return
    if name in ("--help", "-h"):
        assert captured(cli.main, [name])[0] == 0 and len(tokens) == 2, f"{command.where}: {command.text}"
        return
    assert name in cli.COMMANDS, f"{command.where}: unknown subcommand {name!r}; commands: {', '.join(cli.COMMANDS)}"
    if "--help" in tokens or "-h" in tokens:
        rc, text = cli_help(name)
        assert rc == 0, f"{command.where}: hf-streamlm {name} --help exits {rc}: {text[-300:]}"
        return
    parser = cli_parser().commands[name]
    parsed = {}

    def parse() -> None:  # the subcommand's own parser; its errors are one `hf-streamlm: error:` line and exit 2
        ns, extras = parser.parse_known_args(tokens[2:])
        parsed["ns"], parsed["rest"] = ns, parser.split_overrides(getattr(ns, "overrides", []), extras)

    rc, output = captured(parse)
    assert rc == 0, f"{command.where}: {command.text}\n  -> {output.strip()}"
    ns, rest = parsed["ns"], parsed["rest"]
    configs = [a for a in rest if OVERRIDE.match(a)]
    others = [a for a in rest if a not in configs]
    takes_config = cli.SUBCOMMANDS[name][2]
    if name == "eval":  # PATH [recipe=NAME] [key=value ...]: one folder
        assert ns.path and not OVERRIDE.match(ns.path) and not others, f"{command.where}: eval takes one model folder"
    assert not others, f"{command.where}: {name} takes no further arguments, got {others}"
    if takes_config:
        check_config(configs, command, resume_dir)
    else:
        assert not configs, f"{command.where}: {name} takes no key=value arguments, got {configs}"


def check_run(command: Command, resume_dir: Path) -> None:
    args = list(command.tokens[3:])
    if "--help" in args or "-h" in args:
        rc, text = captured(run_main, ["--help"])
        assert rc == 0 and "model.type" in text
        return
    check_config(args, command, resume_dir)


def check_launch(command: Command, resume_dir: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parsed = {}

    def parse() -> None:
        parsed["args"] = launch_command_parser().parse_args(list(command.tokens[2:]))

    rc, output = captured(parse)
    assert rc == 0, f"{command.where}: accelerate launch refuses the flags: {output.strip().splitlines()[-1:]}"
    ns = parsed["args"]
    assert ns.module and ns.training_script == "hf_streamlm.run", (
        f"{command.where}: launch the library as `-m hf_streamlm.run`, not {ns.training_script!r}")
    for name in ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port"):
        value = getattr(ns, name, None)
        if value is not None:
            no_placeholder(str(value), command.where)
    if ns.config_file:
        path = REPO / ns.config_file
        assert path.is_file(), f"{command.where}: --config_file {ns.config_file} does not exist"
        load_config_from_file(str(path))
    try:
        _validate_launch_command(ns)  # what `accelerate launch` checks before it starts anything
    except ValueError as err:
        pytest.fail(f"{command.where}: accelerate launch would refuse it: {err}")
    check_config(list(ns.training_script_args), command, resume_dir)


def check_bench(command: Command) -> None:
    script, args = command.tokens[1], list(command.tokens[2:])
    assert (REPO / script).is_file(), f"{command.where}: {script} does not exist"
    rc, text = bench_help(script)
    assert rc == 0, f"{command.where}: {script} --help exits {rc}: {text[-500:]}"
    flags, subcommands = flags_in(usage_text(text))
    if subcommands:
        assert args and args[0] in subcommands, f"{command.where}: {script} takes one of {sorted(subcommands)} first"
        rc, text = bench_help(script, args[0])
        assert rc == 0, f"{command.where}: {script} {args[0]} --help exits {rc}"
        sub_flags, _ = flags_in(usage_text(text))
        flags.update(sub_flags)
        args = args[1:]
    check_flags(args, flags, command.where)


@pytest.fixture
def resume_dir(tmp_path) -> Path:
    folder = tmp_path / "checkpoints" / "step-400"
    folder.mkdir(parents=True)
    return folder


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.where}:{c.kind}")
def test_documented_command(command: Command, resume_dir, monkeypatch):
    monkeypatch.chdir(REPO)  # relative recipe and config paths, as a user in the repository root types them
    assert command.kind != "unparsable", f"{command.where}: the shell cannot parse {command.text!r} (quotes?)"
    if command.kind == "cli":
        check_cli(command, resume_dir)
    elif command.kind == "run":
        check_run(command, resume_dir)
    elif command.kind == "launch":
        check_launch(command, resume_dir)
    else:
        check_bench(command)


def test_the_docs_hold_many_commands():
    kinds = {kind: sum(c.kind == kind for c in COMMANDS) for kind in ("cli", "run", "launch", "bench")}
    assert len(COMMANDS) >= 80, f"only {len(COMMANDS)} commands found in the docs: {kinds}"
    assert all(n >= 5 for n in kinds.values()), kinds
    documented_errors = [c for c in COMMANDS if c.error]
    assert documented_errors, "the README shows what a bad key prints; that example is checked too"


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_subcommand_help_has_the_same_shape(name):
    """argparse for every subcommand: usage, the one-line description, arguments, options; the config key
    reference for those that take recipe=NAME key=value."""
    rc, text = cli_help(name)
    assert rc == 0, text[-300:]
    assert text.startswith(f"usage: hf-streamlm {name}"), text[:200]
    assert cli.COMMANDS[name].split(":")[0] in " ".join(text.split())
    assert "\noptions:\n  -h, --help" in text
    takes_config = cli.SUBCOMMANDS[name][2]
    assert ("key=value" in text.split("\n\n")[0]) == (takes_config and name != "cache"), text[:300]
    if takes_config and name not in ("cache", "eval"):
        assert "Precedence: command line > recipe > defaults" in text and "model.type" in text
    if name == "cache":
        from hf_streamlm.data.cache import DEFAULT_CACHE_DIR

        assert f"(default: {DEFAULT_CACHE_DIR} here)" in " ".join(text.split())


def test_cli_errors_are_one_line_and_config_arguments_stand_anywhere(capsys):
    cases = [
        (["bogus"], "unknown command 'bogus'"),
        (["recipes", "extra"], "recipes takes no key=value or further arguments"),
        (["export", "run", "--format", "onnx", "--output", "x"], "--format: invalid choice: 'onnx'"),
        (["export", "run"], "the following arguments are required: --output"),
        (["config", "--reference", "recipe=quickstart"], "--reference lists every key"),
        (["stats", "recipe=quickstart", "--plot"], "--plot needs a file name"),
        (["tokenizer", "--outptu", "x", "recipe=quickstart"], "unknown option '--outptu' for tokenizer; options: --output DIR"),
    ]
    for args, message in cases:
        rc, out = captured(cli.main, args)
        assert rc == 2 and out.startswith("hf-streamlm: error:") and message in out, (args, out)
        assert len(out.strip().splitlines()) == 1, (args, out)
    # key=value before, between and after the flags: all reach load_config (a bad key names itself)
    rc, out = captured(cli.main, ["config", "recipe=quickstart", "data.batch_size=3", "scheduler.total_steps=90"])
    assert rc == 0 and "batch_size: 3" in out and "total_steps: 90" in out
    rc, out = captured(cli.main, ["tokenizer", "recipe=quickstart", "--output", "/nonexistent/x", "data.batch_sise=3"])
    assert rc == 2 and "data.batch_sise" in out and len(out.strip().splitlines()) == 1


def test_console_script_and_top_level_help():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("hf-streamlm") == "hf_streamlm.cli:main", "pip install -e . installs the hf-streamlm command"
    rc, text = captured(cli.main, ["--help"])
    assert rc == 0 and all(name in text for name in cli.COMMANDS)


SUBCOMMANDS = sorted({c.tokens[1] for c in COMMANDS if c.kind == "cli" and len(c.tokens) > 1 and c.tokens[1] in cli.COMMANDS})


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_documented_subcommand_help_exits_0(name):
    rc, text = cli_help(name)
    assert rc == 0, f"hf-streamlm {name} --help exits {rc}: {text[-300:]}"


BENCH_SCRIPTS = sorted({c.tokens[1] for c in COMMANDS if c.kind == "bench"})


@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_documented_benchmark_help_exits_0(script):
    assert (REPO / script).is_file()
    rc, text = bench_help(script)
    assert rc == 0 and "usage:" in text, text[-300:]


def test_every_benchmark_is_documented():
    scripts = {f"benchmarks/{p.name}" for p in (REPO / "benchmarks").glob("bench_*.py")}
    assert scripts <= set(BENCH_SCRIPTS), f"not in the docs: {sorted(scripts - set(BENCH_SCRIPTS))}"


# --------------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------------


def slugs(page: Path) -> set[str]:
    """GitHub's heading anchors of a page (lowercase, punctuation dropped, spaces to hyphens, -1 ... for repeats)."""
    seen: dict[str, int] = {}
    text = page.read_text()
    in_code = {number for block in fenced_blocks(text) for number, _ in block}  # `# comment` is no heading
    text = "\n".join(line for number, line in enumerate(text.splitlines(), 1) if number not in in_code)
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        if n:
            seen[f"{slug}-{n}"] = 1
    return set(seen)


def links(page: Path) -> list[tuple[int, str]]:
    text = page.read_text()
    in_block, out = False, []
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(r"^\s*(```|~~~)", line):
            in_block = not in_block
            continue
        if not in_block:
            line = re.sub(r"`[^`]*`", "", line)
            out += [(number, m.group(1)) for m in re.finditer(r"\]\(([^)\s]+)\)", line)]
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(page):
    for number, target in links(page):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.relative_to(REPO)}:{number}: link to {target} does not resolve"
        if anchor and resolved.suffix == ".md":
            assert anchor in slugs(resolved), (
                f"{page.relative_to(REPO)}:{number}: no heading #{anchor} in {path or page.name}")


def test_index_lists_every_page_and_readme_links_it():
    index = DOCS / "README.md"
    linked = {(DOCS / target.partition("#")[0]).resolve() for _, target in links(index)
              if not re.match(r"^[a-z]+:", target)}
    pages = {p.resolve() for p in DOCS.glob("*.md") if p.name != "README.md"}
    assert pages <= linked, f"docs/README.md does not list {sorted(p.name for p in pages - linked)}"
    assert all(p.exists() for p in linked)
    assert "docs/README.md" in {target for _, target in links(REPO / "README.md")}
