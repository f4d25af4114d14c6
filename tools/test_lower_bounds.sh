#!/usr/bin/env bash
# Run the version-sensitive tests on the LOWER bounds of pyproject.toml (docs/dependencies.md):
# a new virtualenv with torch==2.13.0, the project, and transformers/datasets/accelerate/deepspeed pinned
# to their `>=` bounds (huggingface_hub and tokenizers follow what those accept).
#   tools/test_lower_bounds.sh [VENV_DIR]        (default /tmp/hf_streamlm-lower-bounds)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/hf_streamlm-lower-bounds}"
pins=$(python3 - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = project["dependencies"] + project["optional-dependencies"]["test"]
for name in ("transformers", "datasets", "accelerate", "deepspeed"):
    spec = next(s for s in specs if re.match(rf"{name}\b", s))
    low = re.search(r">=\s*([\w.]+)", spec).group(1)
    print(f"{name}=={low}.0" if low.count(".") == 1 else f"{name}=={low}", end=" ")
PY
)
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch==2.13.0
# shellcheck disable=SC2086
pip install -q -e ".[test]" $pins
python -m pytest -q -p no:cacheprovider tests/models tests/test_run.py tests/test_run_decoder.py \
    tests/test_resume_stream.py tests/test_sources.py tests/test_hub.py tests/test_push.py tests/test_deepspeed.py \
    tests/test_dependencies.py
