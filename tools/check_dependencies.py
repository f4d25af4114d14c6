"""Print what a fresh install resolved, against the ranges in pyproject.toml and the newest releases on the index.

`.ci/run` calls this after the test suite, so every CI log names the versions it tested, and says when a newer
release exists that the upper bounds keep out (the next major of transformers, datasets, accelerate, deepspeed):
that is the release to try, and to raise the bound for, before users ask for it. See docs/dependencies.md.

    python tools/check_dependencies.py            # installed / allowed / newest on the index
    python tools/check_dependencies.py --offline  # installed / allowed only (no index queries)

Exit status 0 unless an installed version falls outside its range (a broken environment, not a new release).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# Installed before the project at a version picked for the machine (the README's `pip install torch==...`, or the
# CUDA build a GPU user brings); the project's lower bound only has to admit it.
CHOSEN_FIRST = {"torch"}


def requirements(pyproject: Path = PYPROJECT) -> list[Requirement]:
    """The runtime dependencies and every optional extra's, one entry per package (first spelling wins)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    seen: dict[str, Requirement] = {}
    for spec in specs:
        requirement = Requirement(spec)
        seen.setdefault(requirement.name.lower().replace("_", "-"), requirement)
    return list(seen.values())


def newest_on_index(name: str) -> Version | None:
    """The newest final release pip can see for `name`, or None when the index does not answer."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", name],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"Available versions: (.+)", out)
    if not match:
        return None
    versions = []
    for text in match.group(1).split(","):
        try:
            version = Version(text.strip())
        except InvalidVersion:
            continue
        if not version.is_prerelease:
            versions.append(version)
    return max(versions, default=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="do not ask the package index for newer releases")
    args = parser.parse_args(argv)

    rows, broken = [], []
    for requirement in requirements():
        try:
            installed = Version(importlib.metadata.version(requirement.name))
        except importlib.metadata.PackageNotFoundError:
            rows.append((requirement.name, "-", str(requirement.specifier), "", "not installed"))
            continue
        note = ""
        if not requirement.specifier.contains(installed, prereleases=True):
            note = "OUTSIDE THE ALLOWED RANGE"
            broken.append(requirement.name)
        newest = None if args.offline else newest_on_index(requirement.name)
        if newest is not None and newest > installed:
            if requirement.name in CHOSEN_FIRST:
                note = note or "installed first, at the build chosen for this machine (README)"
            elif requirement.specifier.contains(newest):
                note = note or f"newer allowed release {newest} not installed"
            else:
                note = note or f"{newest} is out, held back by the upper bound: try it, then raise the bound"
        rows.append((requirement.name, str(installed), str(requirement.specifier), str(newest or ""), note))

    widths = [max(len(row[i]) for row in rows + [("package", "installed", "allowed", "newest", "")]) for i in range(4)]
    header = ("package", "installed", "allowed", "newest on index", "")
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + ("  " + row[4] if row[4] else ""))
    print(f"python {sys.version.split()[0]}")
    if broken:
        print(f"error: installed outside pyproject.toml's ranges: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
