"""Turn the GPU check's results into the calibration ``hf-streamlm plan`` reads:

    python -m hf_streamlm.plan.calibrate gpu.json [--gpu h100-80gb] [--output plan_calibration.json]

``gpu.json`` is what ``benchmarks/bench_gpu.py --json`` writes: the device and one row per variant, each with the
MFU and ``torch.cuda.max_memory_allocated`` of a ``runpod_1b``-shaped step (one micro-step per optimizer step, bf16
autocast, fused AdamW). The row of ``runpod_1b``'s own settings (``sdpa docs=on compile=off``) gives the measured
MFU, and its peak over the plan's traced peak of the same step (same micro-batch, no accumulation, one GPU) gives the
memory ratio. The entry for that GPU is added to (or replaces the one in) the output file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hf_streamlm.config import ConfigError, load_config
from hf_streamlm.plan.gpus import CALIBRATION_FILE, GPUS

RECIPE_ROW = "sdpa docs=on compile=off"
"""bench_gpu.py's variant with runpod_1b's settings (SDPA, document masking, eager)."""

DEVICE_NAMES = (("H200", "h200-141gb"), ("H100", "h100-80gb"), ("A100-SXM4-80GB", "a100-80gb"),
                ("A100 80GB", "a100-80gb"), ("A100", "a100-40gb"), ("L40S", "l40s-48gb"))
"""``torch.cuda.get_device_name`` substrings -> the plan's GPU names (first match wins)."""


def gpu_of(device: str) -> str:
    for part, name in DEVICE_NAMES:
        if part in device:
            return name
    raise ConfigError(f"gpu.json's device '{device}' is none of plan's GPUs; name it with --gpu ({', '.join(GPUS)})")


def calibration_entry(results: dict, recipe: str = "runpod_1b") -> dict:
    """The calibration entry (``mfu``, ``memory_ratio``, ``source``) of one GPU check's results (``recipe``: the
    shape bench_gpu.py trains, ``runpod_1b``)."""
    from hf_streamlm.plan.engines import read_layout
    from hf_streamlm.plan.planner import rank_memory

    rows = [r for r in results.get("rows", []) if r.get("variant") == RECIPE_ROW and r.get("mfu")]
    if not rows:
        raise ConfigError(f"gpu.json has no measured '{RECIPE_ROW}' row with an MFU (was the check cut short?)")
    row = rows[0]
    entry = {"mfu": row["mfu"], "source": f"bench_gpu.py on {results.get('device', '?')}, {RECIPE_ROW}, "
                                          f"micro-batch {row['batch_size']}"}
    if row.get("peak_memory_gib"):
        config = load_config([f"recipe={recipe}", f"data.batch_size={row['batch_size']}",
                              "data.gradient_accumulation_steps=1"])
        traced = rank_memory(config, read_layout(None, 1)).peak
        entry["memory_ratio"] = round(row["peak_memory_gib"] * 2**30 / traced, 4)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_streamlm.plan.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="bench_gpu.py's --json file")
    parser.add_argument("--gpu", choices=GPUS, help="the GPU it ran on (default: from the file's device name)")
    parser.add_argument("--output", default=CALIBRATION_FILE, help=f"file to update (default {CALIBRATION_FILE})")
    args = parser.parse_args(argv)
    import hf_streamlm.models  # noqa: F401  (the families registered with the Auto classes)

    try:
        results = json.loads(Path(args.results).read_text())
        name = args.gpu or gpu_of(results.get("device", ""))
        entry = calibration_entry(results)
    except (OSError, json.JSONDecodeError, ConfigError) as err:
        print(f"calibrate: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    existing.setdefault("gpus", {})[name] = entry
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"{out}: {name} {entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
