"""Shared fixtures. Tests never touch the network: the Hub is pinned offline unless a test starts its
own loopback server."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread for every run the tests start: the exact-resume tests compare losses bit for
# bit, and a parallel float reduction split over a different number of threads rounds differently
# (one 1-ulp difference at one step between two fresh 2-thread processes was seen once). Multi-process
# launches get this from torchrun anyway; the tiny test models do not run slower for it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The packages whose releases move the APIs this project builds on (docs/dependencies.md): every pytest run names
# the versions it tested in its header, so a CI log says what a fresh install resolved to that day.
TESTED_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "accelerate",
    "deepspeed",
    "huggingface_hub",
    "evaluate",
    "safetensors",
)


def tested_with() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return "tested with: " + ", ".join(f"{name} {installed(name)}" for name in TESTED_PACKAGES)


def pytest_terminal_summary(terminalreporter) -> None:
    # At the end rather than in the header: `pytest -q` (the README's command) prints no header.
    terminalreporter.write_line(tested_with())


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m hf_streamlm.run ARGS`` (or another module via args[0]='-m', ...) for real."""
    cmd = [sys.executable, *args] if args and args[0] == "-m" else [sys.executable, "-m", "hf_streamlm.run", *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The shipped corpus dealt into 4 jsonl files (``part-<i>.jsonl`` holds documents i, i+4, ...), so
    that 2 DataLoader workers or 2 ranks each read whole shards of a local source."""
    from hf_streamlm.data.corpus import BUILTIN_CORPORA

    root = tmp_path_factory.mktemp("shards")
    lines = gzip.open(BUILTIN_CORPORA["pydocs"], "rt").read().splitlines()
    for i in range(4):
        (root / f"part-{i}.jsonl").write_text("\n".join(lines[i::4]) + "\n")
    return root
