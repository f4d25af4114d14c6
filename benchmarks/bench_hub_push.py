"""Step time of a run that pushes its checkpoints to a slow Hub, against the same run pushing nothing.

    python benchmarks/bench_hub_push.py [--steps 60] [--every 10] [--latency 2] [--repeats 2] [--json out.json]

Starts the loopback Hub of the tests (``tests/hub_server.py``) with ``--latency`` seconds before every answer (2 s:
each push, with its preupload, commit and branch calls, takes ~10 s, longer than the ``--every`` steps between two
checkpoints, so pushes also coalesce), and runs the real entry point (``python -m hf_streamlm.run``) on the offline
quickstart_decoder recipe (hidden 256, 4 layers, sequence 256, batch 8 on the CPU; the shipped corpus and its
2,000-token BPE, trained once here) twice per repeat, alternating: ``hub.push=false``, and ``hub.push=true
hub.strategy=checkpoint hub.min_commit_interval=0`` (every save is exported and queued on the main process, then
uploaded by the background thread). Both save a checkpoint every ``--every`` steps. The step time comes from the
loop's own ``history.jsonl`` (a row per step: its tokens over ``tokens_per_s``, which counts everything between two
rows, the saves and the queuing included; the first row, start-up, left out). Reported: mean and median step time
of each, the ratio push / none of the means (the issue's bar: <= 1.05), and the saves pushed per run (their
``step-<N>`` branches) against the saves made (the difference: saves coalesced away). The Hub runs in a process of
its own at the lowest priority (its work is the remote Hub's); the numbers are the medians over ``--repeats``, and
the ratio of each pair of runs (push / the run just before it) is listed too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BATCH, SEQUENCE = 8, 256


SERVER = """
import sys, time
from tests.hub_server import HubServer
server = HubServer(sys.argv[1])
latency = float(sys.argv[2])
class Slow(server._httpd.RequestHandlerClass):
    def _dispatch(self, method):
        time.sleep(latency)  # the Hub taking `latency` seconds to answer any request
        super()._dispatch(method)
server._httpd.RequestHandlerClass = Slow
print(server.start().url, flush=True)
sys.stdin.read()  # until the benchmark ends
server.stop()
"""


def slow_hub(root: Path, latency: float) -> tuple[subprocess.Popen, str]:
    """The loopback Hub in a process of its own at the lowest priority: its work (decoding and writing what it
    receives) is the remote Hub's, not the training machine's, and must not take the training's CPU here."""
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", SERVER, str(root), str(latency)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def pushed_steps(url: str, repo: str) -> int:
    """Saves pushed: the ``step-<N>`` branches of ``repo``."""
    from huggingface_hub import HfApi

    refs = HfApi(endpoint=url, token="hf_bench").list_repo_refs(repo)
    return sum(branch.name.startswith("step-") for branch in refs.branches)


def train(push: bool, steps: int, every: int, tokenizer: Path, out: Path, env: dict, repo: str) -> dict:
    args = ["recipe=quickstart_decoder", f"tokenizer.path={tokenizer}", f"data.batch_size={BATCH}",
            f"data.sequence_length={SEQUENCE}", f"model.max_position_embeddings={SEQUENCE}", "model.hidden_size=256",
            "model.num_layers=4", "model.num_attention_heads=4", "model.intermediate_size=704",
            f"scheduler.total_steps={steps}", "scheduler.warmup_steps=5", "runtime.log_every_n_steps=1",
            "runtime.evaluation.every_n_steps=null", f"runtime.checkpoint.every_n_steps={every}",
            "runtime.logging.progress_bar=false", "runtime.logging.enable_stdout=false", "runtime.demo_sentences=[]",
            "runtime.logging.tensorboard=false", f"runtime.output_dir={out}", "runtime.resume=never"]
    if push:
        args += ["hub.push=true", f"hub.repo_id={repo}", "hub.strategy=checkpoint", "hub.min_commit_interval=0",
                 "hub.retry_backoff=1"]
    proc = subprocess.run([sys.executable, "-m", "hf_streamlm.run", *args], cwd=REPO, capture_output=True, text=True, check=False,
                          env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    times = [r["tokens"] / r["step"] / r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return {"push": push, "mean_s": statistics.fmean(times), "median_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="steps between two checkpoints")
    parser.add_argument("--latency", type=float, default=2.0, help="seconds the Hub takes to answer each request")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = tmp / "tokenizer"
        subprocess.run([sys.executable, "-m", "hf_streamlm.cli", "tokenizer", "recipe=quickstart_decoder",
                        "tokenizer.vocab_size=2000", "--output", str(tokenizer)], cwd=REPO, check=True,
                       capture_output=True)
        server, url = slow_hub(tmp / "hub", args.latency)
        env = {**os.environ, "HF_ENDPOINT": url, "HF_TOKEN": "hf_bench", "HF_HOME": str(tmp / "hf_home"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        results = []
        try:
            for i in range(args.repeats):
                for push in (False, True):
                    out = tmp / f"run-{i}-{'push' if push else 'none'}"
                    results.append(train(push, args.steps, args.every, tokenizer, out, env, f"me/bench-{i}"))
                    print(json.dumps(results[-1]), flush=True)
            pushed = [pushed_steps(url, f"me/bench-{i}") for i in range(args.repeats)]
        finally:
            server.communicate("")
    mean = {p: statistics.median(r["mean_s"] for r in results if r["push"] == p) for p in (False, True)}
    median = {p: statistics.median(r["median_s"] for r in results if r["push"] == p) for p in (False, True)}
    summary = {"latency_s": args.latency, "steps": args.steps, "every": args.every,
               "step_s_none": {"mean": mean[False], "median": median[False]},
               "step_s_push": {"mean": mean[True], "median": median[True]},
               "ratio_mean": mean[True] / mean[False], "ratio_median": median[True] / median[False],
               # each push run against the run just before it: the machine's load drifts between repeats
               "ratio_pairs": [push["mean_s"] / none["mean_s"] for none, push in zip(results[::2], results[1::2])],
               "saves_pushed_per_run": pushed, "saves_per_run": args.steps // args.every}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
