"""transformers' own common model tests, run against the project's classes (issue 26): every test of the installed
transformers' `ModelTesterMixin` (and `ConfigTester`) that the stock class passes, the project's class passes too.

transformers' test files are not in its wheel. Its sdist on PyPI ships the top-level common ones (`tests/*.py`), not
`tests/models/` (the Llama and Bert testers), `tests/causal_lm_tester.py`, `tests/generation/` nor
`tests/exporters/`. The sdist of the installed version is downloaded once (`pip download`) into
``$XDG_CACHE_HOME/hf_streamlm/transformers-tests/<version>`` (``~/.cache`` without XDG_CACHE_HOME) and its
`tests/*.py` are kept there; nothing of it is committed here. Each run builds a package `transformers_tests` of them
in a temporary folder, with stand-ins for what they import and the sdist lacks (`GenerationTesterMixin` and
`ExportTesterMixin`, empty: their tests do not run; `config_common_kwargs`), and runs tests/models/
transformers_suite.py over it in one pytest process: for each family, the project's classes and the stock classes,
with the same tiny tester written here (decoder vs `LlamaModel`/`LlamaForCausalLM`, MicroBERT vs
`BertModel`/`BertForMaskedLM`). The outcomes are compared test by test; the only allowed difference is a skip of a
test of a transformers mechanism the project does not use (`NOT_APPLICABLE`).

Without the package index the download fails: a network error skips the test (saying so), any other failure fails it.
About 25 s on 2 cores for both families (16 s of tests, the rest its start, imports and collection), plus ~8 s for
the download on first use.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple
from xml.etree import ElementTree

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# family -> (the project's test class, the stock test class), in tests/models/transformers_suite.py.
FAMILIES = {
    "decoder": ("DecoderTest", "StockLlamaTest"),
    "microbert": ("MicroBertTest", "StockBertTest"),
}

# Tests that may skip for the project's class where they pass for the stock one: they test a transformers mechanism
# the project's models do not use, not a behaviour. Failing one still counts.
NOT_APPLICABLE = {
    "test_capture_outputs_decorator": "transformers' `@capture_outputs` / `_can_record_outputs` machinery; the "
    "project's models gather hidden states and attentions in their own layer loop (test_hidden_states_output and "
    "test_attention_outputs check what they return)",
    "test_can_capture_specific_layers_hidden_states": "the same `_can_record_outputs` machinery",
    "test_tp_plan_matches_params": "transformers' tensor-parallel plans (`base_model_tp_plan`); the project trains "
    "with DDP, FSDP2 and DeepSpeed ZeRO",
}

# Stand-ins for the modules `test_modeling_common` / `test_configuration_common` import that the sdist does not ship.
STANDINS = {
    "exporters/test_export.py": '''"""Stand-in: `tests/exporters/test_export.py` is not shipped in transformers' sdist.

`ModelTesterMixin` derives from `ExportTesterMixin`; without the real module its export tests are not run."""


class ExportTesterMixin:
    pass
''',
    "generation/test_utils.py": '''"""Stand-in: `tests/generation/test_utils.py` is not shipped in transformers' sdist.

The test classes of generative models list `GenerationTesterMixin` as transformers' do (`ModelTesterMixin`'s
`test_generation_tester_mixin_inheritance` checks that); without the real module no `generate` test is run."""


class GenerationTesterMixin:
    pass
''',
    "utils/test_configuration_utils.py": '''"""Stand-in: `tests/utils/test_configuration_utils.py` is not shipped in transformers' sdist.

`ConfigTester.check_config_arguments_init` builds a config from `config_common_kwargs` and checks each value is
kept. These are `PreTrainedConfig`'s own arguments, each set away from its default (written for hf_streamlm)."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["SomeModel"],
    "problem_type": "regression",
}
''',
}

# What pip's retry warnings say when the index cannot be reached (urllib3's exceptions and the OS's messages).
PIP_NETWORK_ERRORS = re.compile(
    r"\[Errno -?\d+\] [^'\")]*|Temporary failure in name resolution|Name or service not known|NameResolutionError|"
    r"Network is unreachable|Connection refused|ConnectTimeoutError|ReadTimeoutError|timed out|ProxyError|SSLError"
)


class SdistUnavailable(Exception):
    def __init__(self, message: str, network: bool):
        super().__init__(message)
        self.network = network


def cache_folder(transformers_version: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hf_streamlm" / "transformers-tests" / transformers_version


def sdist_tests(transformers_version: str) -> Path:
    """The folder holding the top-level `tests/*.py` of transformers' sdist of `transformers_version`, downloaded
    and extracted on first use."""
    folder = cache_folder(transformers_version)
    if (folder / "test_modeling_common.py").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".tmp-") as tmp:
        # Two retries (pip's default is 5, with growing pauses): an offline machine is told within seconds.
        command = [sys.executable, "-m", "pip", "download", f"transformers=={transformers_version}",
                   "--no-binary", ":all:", "--no-deps", "--dest", tmp, "--disable-pip-version-check",
                   "--retries", "2", "--timeout", "30"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            output = result.stdout + result.stderr
            network = PIP_NETWORK_ERRORS.search(output)
            lines = [line.strip() for line in output.splitlines() if line.strip()] or ["(no output)"]
            errors = [line for line in lines if line.startswith("ERROR")] or lines  # or "No module named pip"
            detail = f"the package index could not be reached ({network.group(0)})" if network else errors[-1]
            raise SdistUnavailable(f"`pip download transformers=={transformers_version} --no-binary :all:`: {detail}",
                                   network=network is not None)
        [tarball] = Path(tmp).glob("transformers-*.tar.gz")
        extracted = Path(tmp) / "tests"
        extracted.mkdir()
        with tarfile.open(tarball) as archive:
            for member in archive.getmembers():
                parts = member.name.split("/")
                # transformers-<version>/tests/<name>.py: the top-level files only.
                if member.isfile() and len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                    (extracted / parts[2]).write_bytes(archive.extractfile(member).read())
        if not (extracted / "test_modeling_common.py").is_file():
            raise SdistUnavailable(f"{tarball.name} has no tests/test_modeling_common.py", network=False)
        try:
            extracted.rename(folder)
        except OSError:  # another process put it there first
            if not (folder / "test_modeling_common.py").is_file():
                raise
    return folder


def build_package(sources: Path, root: Path) -> None:
    """`root/transformers_tests`: the sdist's test files plus the stand-ins; `root/transformers_suite.py`: ours."""
    package = root / "transformers_tests"
    shutil.copytree(sources, package)
    (package / "__init__.py").write_text('"""The top-level tests/ of transformers\' sdist (plus stand-ins)."""\n')
    for name, text in STANDINS.items():
        (package / name).parent.mkdir(exist_ok=True)
        (package / name).parent.joinpath("__init__.py").touch()
        (package / name).write_text(text)
    shutil.copy(HERE / "transformers_suite.py", root / "transformers_suite.py")
    # An empty ini there: none of the project's pytest settings (`-n 2`) nor its conftest apply.
    (root / "pytest.ini").write_text("[pytest]\n")


class SuiteRun(NamedTuple):
    outcomes: dict[str, dict[str, str]]
    """{test class: {test name: "passed" | "failed" | "skipped"}}"""
    seconds: dict[str, float]
    """{test class: the time its tests took}"""
    output: str
    wall_time: float

    def __repr__(self) -> str:  # what pytest shows of the fixture in a failure: not the whole outcome table
        return f"SuiteRun({len(self.outcomes)} test classes in {self.wall_time:.0f} s)"


def read_junit(junit: Path) -> tuple[dict[str, dict[str, str]], dict[str, float]]:
    """The outcome of each test and the time of each test class in a JUnit XML report. A test reported more than
    once (its subtests, an error in teardown) takes its worst outcome: failed, then passed, then skipped."""
    rank = {"failed": 2, "passed": 1, "skipped": 0}
    result: dict[str, dict[str, str]] = {}
    seconds: dict[str, float] = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        test_class = case.get("classname", "").rsplit(".", 1)[-1]
        seconds[test_class] = seconds.get(test_class, 0.0) + float(case.get("time") or 0.0)
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        tests = result.setdefault(test_class, {})
        name = case.get("name")
        if name not in tests or rank[outcome] > rank[tests[name]]:
            tests[name] = outcome
    return result, seconds


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> SuiteRun:
    """Every family's two test classes, run in one pytest process (one interpreter start and import of torch and
    transformers for all)."""
    transformers_version = version("transformers")
    # What the sdist's test modules import beyond transformers' own requirements. (Not `find_spec("pip")`: in this
    # process it would switch setuptools' distutils shim to the stdlib's, which breaks inductor's builds later.)
    if importlib.util.find_spec("parameterized") is None:
        raise AssertionError("`parameterized` is not installed: transformers' test_modeling_common imports it")
    try:
        sources = sdist_tests(transformers_version)
    except SdistUnavailable as error:
        if error.network:
            pytest.skip(f"transformers {transformers_version}'s sdist could not be downloaded: {error}")
        raise AssertionError(f"transformers {transformers_version}'s sdist: {error}") from None
    root = tmp_path_factory.mktemp("transformers_suite")
    build_package(sources, root)
    junit = root / "junit.xml"
    selection = " or ".join(name for pair in FAMILIES.values() for name in pair)
    command = [sys.executable, "-m", "pytest", "transformers_suite.py", "-p", "no:cacheprovider", "-p", "no:xdist",
               "-q", "-rN", "--disable-warnings", "-c", "pytest.ini", "--rootdir", str(root), f"--junitxml={junit}",
               "-k", selection]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=500, check=False)
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert junit.is_file(), f"the transformers suite did not run (exit {result.returncode}):\n{output[-3000:]}"
    return SuiteRun(*read_junit(junit), output=output, wall_time=elapsed)


def by_outcome(tests: dict[str, str]) -> dict[str, list[str]]:
    return {kind: sorted(name for name, outcome in tests.items() if outcome == kind)
            for kind in ("passed", "failed", "skipped")}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_project_classes_pass_what_the_stock_classes_pass(suite, family):
    ours_class, stock_class = FAMILIES[family]
    ours, stock = suite.outcomes.get(ours_class, {}), suite.outcomes.get(stock_class, {})
    assert stock and ours, f"no outcome for {ours_class} or {stock_class}:\n{suite.output[-3000:]}"
    not_passed = sorted(name for name, outcome in stock.items() if outcome == "passed" and ours.get(name) != "passed")
    regressions = [name for name in not_passed if not (name in NOT_APPLICABLE and ours.get(name) == "skipped")]
    seconds = suite.seconds.get(ours_class, 0.0) + suite.seconds.get(stock_class, 0.0)
    heading = (f"{family}: transformers {version('transformers')}'s common tests, {seconds:.0f} s of tests "
               f"(the run of both families: {suite.wall_time:.0f} s)")
    lines = [heading]
    for name, tests in ((ours_class, ours), (stock_class, stock)):
        kinds = by_outcome(tests)
        counts = ", ".join(f"{len(kinds[kind])} {kind}" for kind in kinds)
        lines.append(f"  {name}: {counts}; failed: {', '.join(kinds['failed']) or 'none'}")
    lines.append(f"  skipped by {ours_class}, not applicable: "
                 + (", ".join(name for name in not_passed if name not in regressions) or "none"))
    lines.append(f"  passed by {stock_class}, not by {ours_class}: "
                 + (", ".join(f"{name} ({ours.get(name, 'not run')})" for name in regressions) or "none"))
    report = "\n".join(lines)
    print(report)
    assert not regressions, report


def test_an_unreachable_index_is_a_network_failure(tmp_path, monkeypatch):
    """What makes the suite skip rather than fail: pip's report of a connection it could not make (to a closed port
    here), in one line."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no find-links or index of the machine's pip configuration
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(SdistUnavailable) as error:
        sdist_tests(version("transformers"))
    assert error.value.network, error.value
    assert "could not be reached ([Errno" in str(error.value) and "\n" not in str(error.value), error.value
    assert not any(tmp_path.rglob("*.py"))
