"""The rehearsal of ``runpod_1b`` in miniature (benchmarks/rehearse.py), in CI: 2 processes x 2 workers,
accumulation 4, micro-batch 2, 256-token blocks, document masking, an endless stream on the loopback Hub read as two
sources mixed by tokens along a data schedule whose stage boundary the legs cross, and
in one run a burst of 429/500 on one rank's shard, a group SIGTERM mid-accumulation, a 429 for good on one
rank, a same-layout resume, a resume on 1 x 1 and one back on 2 x 2. Every leg's checks are the script's;
this asserts it passed and that its figures hold what the docs quote (docs/resume.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_the_runpod_1b_rehearsal_passes_every_leg(tmp_path):
    figures = tmp_path / "rehearsal.json"
    result = subprocess.run([sys.executable, "benchmarks/rehearse.py", "--workdir", str(tmp_path / "work"),
                             "--json", str(figures)], cwd=REPO, capture_output=True, text=True, timeout=900)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    legs = json.loads(figures.read_text())["legs"]
    assert [leg["layout"] for leg in legs] == ["2x2", "2x2", "2x2", "1x0", "2x2"]
    assert [leg["exit"] != 0 for leg in legs] == [True, True, False, False, False]  # SIGTERM'd launcher; exit 4
    traced = [leg["documents_traced"] for leg in legs]
    assert traced == sorted(traced) and len(set(traced)) == len(traced)  # every leg trained more documents
