"""Run a snippet in a Python that cannot import hf_streamlm: how exports are checked to load in stock
transformers (native) or through ``trust_remote_code`` (custom) without the project installed.

``python -I`` (no PYTHONPATH, no user site, no cwd on sys.path) from a temporary directory, plus a
meta-path blocker that also covers an installed (e.g. editable) hf_streamlm: any attempt to import it
fails loudly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

_PREAMBLE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class _BlockHfStreamlm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_streamlm" or name.startswith("hf_streamlm."):
                raise ModuleNotFoundError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _BlockHfStreamlm())
    model_dir, inputs_file, outputs_file, trust = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    """
)

_REPORT = textwrap.dedent(
    """
    print(json.dumps({
        "class": type(model).__module__ + "." + type(model).__name__,
        "hf_streamlm_imported": any(m.split(".")[0] == "hf_streamlm" for m in sys.modules),
    }))
    """
)


def run_isolated(body: str, model_dir: Path, tmp_path: Path, inputs: dict, trust_remote_code: bool):
    """Run ``body`` (which loads ``model`` from ``model_dir``, reads ``inputs_file`` and saves to
    ``outputs_file``) in a clean process; return its report and what it saved."""
    inputs_file, outputs_file = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(inputs, inputs_file)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        # Remote code is copied into this cache and imported from there; keep it out of the user's cache.
        "HF_MODULES_CACHE": str(tmp_path / "modules_cache"),
        "TRANSFORMERS_VERBOSITY": "error",
    }
    script = _PREAMBLE + textwrap.dedent(body) + _REPORT
    result = subprocess.run(
        [sys.executable, "-I", "-c", script, str(model_dir), str(inputs_file), str(outputs_file),
         "1" if trust_remote_code else "0"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["hf_streamlm_imported"] is False
    return report, torch.load(outputs_file)
