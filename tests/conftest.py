"""Shared fixtures. Tests never touch the network: the Hub is pinned offline unless a test starts its
own loopback server."""

from __future__ import annotations

import fcntl
import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread for every run the tests start: the exact-resume tests compare losses bit for
# bit, and a parallel float reduction split over a different number of threads rounds differently
# (one 1-ulp difference at one step between two fresh 2-thread processes was seen once). Multi-process
# launches get this from torchrun anyway; the tiny test models do not run slower for it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The packages whose releases move the APIs this project builds on (docs/dependencies.md): every pytest run names
# the versions it tested in its header, so a CI log says what a fresh install resolved to that day.
TESTED_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "accelerate",
    "deepspeed",
    "huggingface_hub",
    "evaluate",
    "safetensors",
)


def tested_with() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return "tested with: " + ", ".join(f"{name} {installed(name)}" for name in TESTED_PACKAGES)


def pytest_terminal_summary(terminalreporter) -> None:
    # At the end rather than in the header: `pytest -q` (the README's command) prints no header.
    terminalreporter.write_line(tested_with())


# The files that take longest (seconds of one worker, `--durations=0` of a full run), longest first: pytest-xdist's
# `--dist loadfile` hands whole files to the two workers in collection order, so a long file collected last keeps
# one worker busy while the other idles (the suite's tail was test_resume_run, test_run* and test_signals, all near
# the end of the alphabet). Collected first, they run while the many short files fill the gaps.
SLOW_FILES = (
    "tests/test_rehearsal.py",
    "tests/test_preemption.py",
    "tests/test_deepspeed.py",
    "tests/test_resume_run.py",
    "tests/test_signals.py",
    "tests/test_fsdp.py",
    "tests/test_hub.py",
    "tests/test_hub_checkpoints.py",
    "tests/test_host_sync.py",
    "tests/test_multinode.py",
    "tests/test_mixture_run.py",
    "tests/test_spikes_rollback.py",
    "tests/test_plan.py",
    "tests/test_spikes.py",
    "tests/test_run_decoder.py",
    "tests/test_run_launch.py",
    "tests/test_elastic_resume.py",
    "tests/test_elastic_endless.py",
    "tests/test_trace_durable.py",
    "tests/test_tokenizer.py",
    "tests/test_run.py",
    "tests/test_harness.py",
    "tests/models/test_transformers_suite.py",
    "tests/models/test_decoder_attention.py",
    "tests/test_push.py",
    "tests/test_gpu_path.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """The slow files first, in SLOW_FILES's order; the rest after, in their own order (a stable sort keeps each
    file's tests together and in order, so module fixtures are made once)."""
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FILES)))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m hf_streamlm.run ARGS`` (or another module via args[0]='-m', ...) for real."""
    cmd = [sys.executable, *args] if args and args[0] == "-m" else [sys.executable, "-m", "hf_streamlm.run", *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def reset_accelerate():
    """For a test that makes an ``Accelerator`` or calls ``hf_streamlm.run``'s main in the test process (an
    interpreter start is ~6-10 s): afterwards, Accelerate's process-wide state is reset, so a later test in this
    worker can make an ``Accelerator`` with other settings (accelerate refuses to change an initialized state).
    Reset before the test too: a test that made one in this worker without this fixture (directly or through a
    library call) must not decide this test's settings."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def run_in_process(*args: str) -> None:
    """``python -m hf_streamlm.run ARGS`` as its ``main`` in this process, for a run whose subject is not the
    process itself (an uninterrupted reference, a resume after a kill, a shared run): the same run bit for bit
    (this process has the one intra-op thread too; history.jsonl compared between the two ways: equal), without
    the ~6 s of interpreter start and imports of a subprocess. Accelerate's process-wide state is reset before
    and after. Its stdout is the test's (``capsys``), its log records are the test's (``caplog``: pytest's
    handlers on the root logger make the run's ``logging.basicConfig`` a no-op)."""
    from hf_streamlm.run import main

    reset_accelerate_state()
    try:
        assert main(list(args)) == 0
    finally:
        reset_accelerate_state()


def run_in_process_stdout(capsys, *args: str) -> str:
    """``run_in_process``, returning what the run printed on stdout."""
    capsys.readouterr()
    run_in_process(*args)
    return capsys.readouterr().out


def main_refuses(args: list[str], capsys, code: int = 2) -> str:
    """Run ``hf_streamlm.run``'s main in this process on ``args``; assert it exits ``code`` (2: bad input; 3: a
    non-finite stop; 4: a source failed mid-run) without a traceback and return its stderr (use with the
    ``reset_accelerate`` fixture)."""
    from hf_streamlm.run import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(args)
    err = capsys.readouterr().err
    assert exited.value.code == code and "Traceback" not in err, err[-1500:]
    return err


def two_source_corpus(root: Path, per_shard: tuple[int, int]) -> dict[int, list[str]]:
    """Two sources of 4 jsonl shards each (``a-*.jsonl``, ``b-*.jsonl``), ``per_shard`` short documents per
    shard, each text distinct (the elastic tests' document traces key on it); returns the texts by source."""
    import json

    docs: dict[int, list[str]] = {0: [], 1: []}
    n = 0
    for source, name in ((0, "a"), (1, "b")):
        for shard in range(4):
            lines = []
            for _ in range(per_shard[source]):
                text = f"{name}{n:04d} " + " ".join(f"w{(n * 7 + i) % 40}" for i in range(2 + n % 5))
                lines.append(json.dumps({"text": text}))
                docs[source].append(text)
                n += 1
            (root / f"{name}-{shard}.jsonl").write_text("\n".join(lines) + "\n")
    return docs


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The shipped corpus dealt into 4 jsonl files (``part-<i>.jsonl`` holds documents i, i+4, ...), so
    that 2 DataLoader workers or 2 ranks each read whole shards of a local source."""
    from hf_streamlm.data.corpus import BUILTIN_CORPORA

    root = tmp_path_factory.mktemp("shards")
    lines = gzip.open(BUILTIN_CORPORA["pydocs"], "rt").read().splitlines()
    for i in range(4):
        (root / f"part-{i}.jsonl").write_text("\n".join(lines[i::4]) + "\n")
    return root


def shared_root(tmp_path_factory) -> Path:
    """A folder both xdist workers see: the session's base temp folder, one level above each worker's own
    (``popen-gw<N>``); without xdist, the base temp folder itself."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_tokenizer(tmp_path_factory, recipe: str, vocab_size: int, train_samples: int | None = None) -> Path:
    """A tokenizer trained once per test session (both xdist workers share it) from the stream of ``recipe``
    (the shipped corpus), with ``vocab_size`` and ``train_samples``: pass it as ``tokenizer.path`` so a run
    loads it instead of training one. Each run costs a fresh process anyway; retraining the same tokenizer in
    ~80 of them was a good part of the suite's time. Runs that exist to train their tokenizer (tests/
    test_tokenizer.py, the shared ``mlm_run``) do not take one."""
    key = f"{recipe}-v{vocab_size}-n{train_samples}"
    root = shared_root(tmp_path_factory) / "tokenizers"
    root.mkdir(exist_ok=True)
    folder = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits for the one that trains, then loads
        if not (folder / "tokenizer.json").is_file():
            from hf_streamlm.config import load_config
            from hf_streamlm.tokenizer.train import build_tokenizer

            samples = "null" if train_samples is None else train_samples
            config = load_config([f"recipe={recipe}", f"tokenizer.vocab_size={vocab_size}",
                                  f"tokenizer.train_samples={samples}"])
            build_tokenizer(config).save_pretrained(root / f".tmp-{key}")
            (root / f".tmp-{key}").rename(folder)
    return folder


@pytest.fixture(scope="session")
def wordpiece_800(tmp_path_factory) -> Path:
    """MicroBERT's WordPiece (the quickstart recipe's settings), 800 tokens, from 300 documents."""
    return shared_tokenizer(tmp_path_factory, "quickstart", 800, 300)


@pytest.fixture(scope="session")
def bpe_800(tmp_path_factory) -> Path:
    """The decoder's byte-level BPE (the quickstart_decoder recipe's settings), 800 tokens, from 300 documents."""
    return shared_tokenizer(tmp_path_factory, "quickstart_decoder", 800, 300)


@pytest.fixture(scope="session")
def bpe_500(tmp_path_factory) -> Path:
    """The decoder's byte-level BPE, 500 tokens, from the whole corpus (the small decoders' setting)."""
    return shared_tokenizer(tmp_path_factory, "quickstart_decoder", 500)


# Tiny runs shared by every test that needs a trained model, its checkpoints or its export: trained once per
# session, in the process of the first test that needs one (``run_in_process``; the entry point's own process
# is tests/test_run.py's and tests/test_run_decoder.py's). Tests that write into a run (eval
# results, model card) copy it first (``copy_run``).
TINY = [
    "scheduler.total_steps=4",
    "scheduler.warmup_steps=1",
    "runtime.log_every_n_steps=2",
    "runtime.evaluation.every_n_steps=2",
    "runtime.evaluation.max_batches=3",
    "runtime.checkpoint.every_n_steps=2",
    "runtime.logging.progress_bar=false",
    "runtime.logging.tensorboard=false",
    "runtime.demo_sentences=[]",
    "tokenizer.vocab_size=800",
    "tokenizer.train_samples=300",
    "data.shuffle_buffer_size=50",
    "data.batch_size=4",
    "data.sequence_length=64",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.max_position_embeddings=64",
]
# The classic MicroBERT (BERT's design, 15% masked): the quickstart recipe ships the modern tier, whose own run
# tests are tests/models/test_modern_microbert.py and tests/test_run.py.
MLM = ["recipe=quickstart", "model.architecture=classic", "data.mlm_probability=0.15", *TINY,
       "optimizer.learning_rate=1e-2"]  # a few right guesses: accuracy > 0
MLM_BPE = [*MLM, "tokenizer.kind=bpe"]  # RoBERTa-style byte-level BPE (<s> <pad> </s> <mask>) for MicroBERT
# document_masking (the recipe's): packed-document inputs in the eval batches. A non-default rotary base:
# an export that loses it (transformers 4.x reads only rope_theta) gives other logits.
DECODER = ["recipe=quickstart_decoder", *TINY, "model.rope_theta=500000"]
DECODER_LINEAR_ROPE = ["recipe=quickstart_decoder", *TINY, "model.rope_mode=linear", "model.rope_factor=2.0"]


def trained(tmp_path_factory, name: str, args: list[str]) -> Path:
    """The run ``name``, trained once per test session: the first xdist worker that needs it trains it while
    the other waits on the lock (test files are spread over the workers by file, and the users of one
    shared run sit in several files)."""
    import json
    import shutil

    root = shared_root(tmp_path_factory) / "runs"
    root.mkdir(exist_ok=True)
    out, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(out, ignore_errors=True)  # what a failed first try left
            run_in_process(*args, f"runtime.output_dir={out}")
            (root / f"{name}.files").write_text(json.dumps(files_of(out)))
            done.write_text(json.dumps(args))
        elif json.loads(done.read_text()) != args:
            # Never retrain a shared run in place: the other worker may be reading it. Any path in the arguments
            # must be the same on both workers (made under shared_root, not by mktemp).
            raise AssertionError(f"shared run {name!r} asked for with other arguments: {args}, "
                                 f"trained with {json.loads(done.read_text())}")
    return out


def files_of(run: Path) -> list[list]:
    """Every file of ``run`` with its size and modification time: what a test that writes into it changes."""
    return sorted([str(p.relative_to(run)), p.stat().st_size, p.stat().st_mtime_ns] for p in run.rglob("*") if p.is_file())


@pytest.fixture(autouse=True)
def shared_runs_unchanged(request):
    """After each test, the shared runs it asked for must hold the files ``trained`` left: a test that writes
    into one (eval results, a model card, a resumed step) changes what every later test reads, on both
    workers. Such a test copies the run first (``copy_run``)."""
    yield
    import json

    for run in list((request.node.funcargs or {}).values()):  # the test's fixture values: nothing is set up anew
        if isinstance(run, Path) and run.parent.joinpath(f"{run.name}.files").is_file():
            before = {tuple(f) for f in json.loads(run.parent.joinpath(f"{run.name}.files").read_text())}
            changed = sorted({f[0] for f in before.symmetric_difference(tuple(f) for f in files_of(run))})
            # Most likely by this test; a test of the other worker that wrote into it at the same time shows here too.
            assert not changed, f"the shared run {run.name!r} changed during {request.node.nodeid}: {changed[:10]}"


def checkpoints_of(run: Path) -> list[Path]:
    """What a run left in its ``checkpoints/`` folder: the checkpoints and anything a kill left behind (``.tmp-``
    folders), without the ``latest.json`` record that ``runtime.resume=auto`` follows."""
    return [p for p in (run / "checkpoints").iterdir() if p.name != "latest.json"]


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of a shared run that a test may write into (its config.yaml keeps the original output_dir,
    which nothing a test runs on a finished run reads)."""
    import shutil

    return Path(shutil.copytree(run, tmp_path / run.name))


@pytest.fixture(scope="session")
def mlm_run(tmp_path_factory) -> Path:
    """Trains its own tokenizer in the run (the other shared runs load one): the in-run training, its save
    into the run and its export stay covered by every test that reads this run."""
    return trained(tmp_path_factory, "mlm", MLM)


@pytest.fixture(scope="session")
def mlm_bpe_run(tmp_path_factory) -> Path:
    """MicroBERT with byte-level BPE, trained in the run as ``mlm_run``'s WordPiece is."""
    return trained(tmp_path_factory, "mlm-bpe", MLM_BPE)


CLOZE_TASK = "pydocs_cloze"


@pytest.fixture(scope="session")
def cloze_task(tmp_path_factory) -> Path:
    """A local lm-evaluation-harness task (offline): a YAML over a JSONL of 40 four-way cloze items from the
    last documents of the shipped corpus (the context: a document's first 8-15 words; the choices: the next
    word and 3 other words of the corpus). One folder for both xdist workers: the shared ``decoder_run``'s
    arguments name it, and ``trained`` asks both workers for the same ones."""
    root = shared_root(tmp_path_factory) / "lm_eval_tasks"
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "cloze.yaml").is_file():  # written last
            write_cloze_task(root)
    return root


def write_cloze_task(root: Path) -> None:
    import json
    import random

    from hf_streamlm.data.corpus import BUILTIN_CORPORA

    root.mkdir(exist_ok=True)
    docs = [json.loads(line)["text"] for line in gzip.open(BUILTIN_CORPORA["pydocs"], "rt")][-200:]
    rng = random.Random(0)
    pool = sorted({w for d in docs for w in d.split() if w.isalpha()})
    items = []
    for words in (d.split() for d in docs):
        if len(words) < 20:
            continue
        k = rng.randrange(8, 16)
        choices = [words[k], *rng.sample([w for w in pool if w != words[k]], 3)]
        rng.shuffle(choices)
        items.append({"context": " ".join(words[:k]), "choices": choices, "label": choices.index(words[k])})
        if len(items) == 40:
            break
    (root / "cloze.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (root / "cloze.yaml").write_text(f"""task: {CLOZE_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "cloze.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")
    return root


@pytest.fixture(scope="session")
def decoder_run(tmp_path_factory, cloze_task, bpe_800) -> Path:
    """DECODER, with the cloze task run in the loop (lm-evaluation-harness) at each evaluation."""
    tasks = [f"runtime.evaluation.tasks=[{CLOZE_TASK}]", f"runtime.evaluation.tasks_include_path={cloze_task}"]
    return trained(tmp_path_factory, "decoder", [*DECODER, *tasks, f"tokenizer.path={bpe_800}"])


@pytest.fixture(scope="session")
def decoder_linear_rope_run(tmp_path_factory, bpe_800) -> Path:
    return trained(tmp_path_factory, "decoder-linear-rope", [*DECODER_LINEAR_ROPE, f"tokenizer.path={bpe_800}"])


@pytest.fixture(scope="session")
def compat_python() -> Path:
    """The ``python`` of the environment with transformers 4.57, optimum-onnx and onnxruntime
    (tests/compat_env.py), built from the package index on first use and reused after."""
    from tests.compat_env import compat_python as build

    return build(log=lambda message: print(f"\n[compat env] {message}", file=sys.stderr))
