#!/usr/bin/env bash
# Run HERE, where pip reaches the package index, before the GPU check (benchmarks/gpu_check.sh): downloads into
# .whl/ (git-ignored through .git/info/exclude) the wheels the GPU machine's image lacks (datasets, evaluate and
# theirs) or holds at other versions than the ones this project's tests ran with (transformers; fsspec,
# regex for datasets' and transformers' minimum versions), at this environment's versions. The image's torch,
# accelerate, tokenizers, safetensors, pyarrow and huggingface_hub are used as they are (docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir .whl
pins=$("$PYTHON" - <<'PY'
import importlib.metadata as m
names = ["transformers", "datasets", "evaluate", "dill", "multiprocess", "fsspec", "regex"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
PY
)
echo "wheels: $pins"
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
ls -l .whl && du -sh .whl
