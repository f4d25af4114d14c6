"""The dependency policy (docs/dependencies.md) holds in pyproject.toml, and the environment under test obeys it."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
API_MOVERS = ("transformers", "datasets", "accelerate", "deepspeed", "huggingface_hub")
"""Packages whose next major (next minor for 0.x deepspeed) is known to move an API the project uses."""


def declared() -> dict[str, Requirement]:
    """pyproject.toml's runtime and extra requirements, as tools/check_dependencies.py reads them."""
    spec = importlib.util.spec_from_file_location("check_dependencies", REPO / "tools" / "check_dependencies.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return {requirement.name: requirement for requirement in tool.requirements(REPO / "pyproject.toml")}


def test_api_moving_packages_have_lower_and_upper_bounds():
    requirements = declared()
    for name in API_MOVERS:
        operators = {spec.operator for spec in requirements[name].specifier}
        assert ">=" in operators and "<" in operators, f"{name}: {requirements[name].specifier}"
    # The extras repeat deepspeed; both spellings carry the same range.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {str(Requirement(s).specifier) for e in project["optional-dependencies"].values() for s in e
              if Requirement(s).name == "deepspeed"}
    assert len(ranges) == 1, ranges


def test_docs_table_states_the_ranges_of_pyproject():
    text = (REPO / "docs" / "dependencies.md").read_text()
    rows = re.findall(r"^\| (\S+)(?: \(extra\))? \| `([^`]+)` \|", text, flags=re.M)
    assert len(rows) >= 6
    requirements = declared()
    for name, allowed in rows:
        assert name in requirements, name
        assert Requirement(f"{name}{allowed}").specifier == requirements[name].specifier, name


def test_installed_versions_are_inside_the_ranges():
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_dependencies.py"), "--offline"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^transformers\s+5\.\d+", result.stdout, flags=re.M), result.stdout
