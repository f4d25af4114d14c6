"""A second Python environment with the clients whose pins clash with ours: transformers 4.57 (the last 4.x,
still what much of the ecosystem runs), optimum-onnx (which pins transformers < 4.58) and onnxruntime.

Built once from the package index into the user's cache (``~/.cache/hf_streamlm/venv-compat-<hash of the
requirements>``; ``HF_STREAMLM_COMPAT_VENV`` names another folder, e.g. ``.venv-compat``, git-ignored) and
reused while its requirement list is unchanged (a stamp file records it). Outside the work tree, so that CI's
fresh clone finds the environment that a developer or an earlier CI run on the same machine built (180 s on
2 busy cores with a warm pip cache) instead of building it again: it holds third-party packages only, never
the project. The tests get it through the ``compat_python`` fixture (tests/conftest.py);
``python tests/compat_env.py`` builds it ahead of a test run.
PyTorch is the pinned CPU build from the local disk, as in the main environment (an unpinned torch would
pull a multi-GB CUDA build).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REQUIREMENTS = ["torch==2.13.0", "transformers==4.57.*", "optimum-onnx==0.1.*", "onnxruntime"]
_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_streamlm"
COMPAT_DIR = Path(os.environ.get("HF_STREAMLM_COMPAT_VENV")
                  or _CACHE / f"venv-compat-{hashlib.sha256(' '.join(REQUIREMENTS).encode()).hexdigest()[:12]}")
STAMP = "hf_streamlm-compat-requirements.txt"
BUILD_TIME = "hf_streamlm-compat-build-seconds.txt"


def compat_python(log=print) -> Path:
    """The ``python`` of the compat environment, built first if missing or built for other requirements.
    Two processes asking at once (two test runs) build it once: the second waits on a file lock."""
    import fcntl

    COMPAT_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(COMPAT_DIR.parent / f"{COMPAT_DIR.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(log)


def _build(log) -> Path:
    python = COMPAT_DIR / "bin" / "python"
    wanted = "\n".join(REQUIREMENTS) + "\n"
    stamp = COMPAT_DIR / STAMP
    if python.exists() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    shutil.rmtree(COMPAT_DIR, ignore_errors=True)
    start = time.perf_counter()
    log(f"building {COMPAT_DIR} ({' '.join(REQUIREMENTS)}) from the package index, once")
    subprocess.run([sys.executable, "-m", "venv", str(COMPAT_DIR)], check=True)
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING: Location")]
        raise RuntimeError(f"pip could not build {COMPAT_DIR}:\n" + "\n".join(errors[-30:]))
    seconds = time.perf_counter() - start
    (COMPAT_DIR / BUILD_TIME).write_text(f"{seconds:.1f}\n")
    stamp.write_text(wanted)  # last: a build stopped half-way is redone
    log(f"built {COMPAT_DIR} in {seconds:.0f} s")
    return python


if __name__ == "__main__":
    print(compat_python())
