#!/usr/bin/env bash
# The GPU check in one command, for the device machine (one H100/H200, no network), run in the repository root
# after benchmarks/gpu_wheels.sh has filled .whl/ here (docs/performance.md, "The GPU check"):
#   device run: command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560
# 1. the wheels the image lacks into /tmp/site (the image's CUDA torch is kept); versions and GPU to versions.txt;
# 2. bench_gpu.py --fsdp only: FSDP2 train / resume / export through the real loop, <= 150 s;
# 3. bench_gpu.py --fsdp off: the table (runpod_1b shape, bf16, sequence 2048), <= 300 s (--time-budget 240
#    skips the variants that would not fit; the rows so far are in gpu.json after each one).
# Everything lands in $OUT (6 files): versions.txt, fsdp.log, fsdp.json, fsdp_runs.log, table.log, gpu.json.
# A rehearsal on a CPU machine (no .whl/): EXTRA=--dry-run OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=$(command -v python3)
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib.metadata as m
import torch
names = ["torch", "transformers", "accelerate", "datasets", "evaluate", "tokenizers", "huggingface_hub", "pyarrow",
         "fsspec", "safetensors", "flash_attn"]
for name in names:
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name} -")
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
import hf_streamlm.train.loop  # noqa: F401  (the whole import chain, before the timed parts)
print("hf_streamlm imports")
PY
status=0
timeout 150 "$PY" benchmarks/bench_gpu.py ${EXTRA:-} --fsdp only --fsdp-dir /tmp/fsdp --json "$OUT/fsdp.json" 2>&1 \
  | tee "$OUT/fsdp.log" || status=1
for log in /tmp/fsdp/*.log; do [ -f "$log" ] && { echo "=== $log"; tail -c 20000 "$log"; }; done > "$OUT/fsdp_runs.log"
timeout 300 "$PY" benchmarks/bench_gpu.py ${EXTRA:-} --fsdp off --time-budget 240 --json "$OUT/gpu.json" 2>&1 \
  | tee "$OUT/table.log" || status=1
exit $status
