"""Shared fixtures. Tests never touch the network: the Hub is pinned offline unless a test starts its
own loopback server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m hf_streamlm.run ARGS`` (or another module via args[0]='-m', ...) for real."""
    cmd = [sys.executable, *args] if args and args[0] == "-m" else [sys.executable, "-m", "hf_streamlm.run", *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli
