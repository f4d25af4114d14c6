"""``hf-streamlm eval`` and the metrics shipped as ``evaluate`` modules: the modules load by path with
the network refused, their figures are token-weighted over batches, and the command reproduces the
eval row a tiny training run logged, from its export and from its checkpoint, for both families."""

from __future__ import annotations

import glob
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MLM, REPO

os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")  # read when evaluate is imported: before any test imports it


# Runs the eval command in a process whose sockets refuse to connect, recording any attempt.
GUARDED_EVAL = """
import json, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[1:] if args and isinstance(args[0], socket.socket) else args))
    raise OSError("network refused by the test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
from hf_streamlm.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exit:
    rc = exit.code
print("NETWORK_ATTEMPTS", json.dumps(attempts))
sys.exit(rc)
"""


def last_eval(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r][-1]


def eval_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``hf-streamlm eval ARGS`` in this process (the command's own main); exit status, stdout, stderr."""
    from hf_streamlm.cli import main

    try:
        rc = main(["eval", *args])
    except SystemExit as exit:
        rc = exit.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_same_figures(result: dict, logged: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert result[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-7), key


# ---------------------------------------------------------------------------------------------- metrics


def test_metric_scripts_ship_in_wheels():
    from hf_streamlm import metrics

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["hf_streamlm.metrics"]
    shipped = {Path(p) for pattern in patterns for p in glob.glob(str(metrics.METRICS_DIR / pattern))}
    for name in metrics.METRICS:
        assert metrics.path(name) / f"{name}.py" in shipped, name
    with pytest.raises(ValueError, match="perplexity, masked_accuracy"):
        metrics.path("bleu")


def test_metric_modules_load_with_evaluate_by_path():
    import evaluate

    from hf_streamlm import metrics

    ppl = evaluate.load(str(metrics.path("perplexity")))
    assert ppl.compute(losses=[1.0, 3.0]) == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2.0)), "tokens": 2}
    acc = evaluate.load(str(metrics.path("masked_accuracy")))
    assert acc.compute(predictions=[1, 2], references=[1, -100]) == {"accuracy": 1.0, "tokens": 1}


def test_perplexity_is_token_weighted_and_exact_over_batches():
    from hf_streamlm import metrics

    rng = random.Random(0)
    losses = [rng.uniform(0.1, 9.0) for _ in range(500)]
    expected = math.fsum(losses) / len(losses)
    # per-token losses in batches of uneven sizes, shuffled order
    ppl = metrics.load("perplexity", keep_in_memory=True)
    shuffled, cuts = rng.sample(losses, len(losses)), [0, 3, 120, 121, 377, 500]
    for a, b in zip(cuts, cuts[1:]):
        ppl.add_batch(losses=shuffled[a:b])
    by_token = ppl.compute()
    # the same tokens as (loss sum, token count) per batch, as the eval command adds them
    sums = [math.fsum(losses[a:b]) for a, b in zip(cuts, cuts[1:])]
    ppl.add_batch(losses=sums, token_counts=[b - a for a, b in zip(cuts, cuts[1:])])
    by_batch = ppl.compute()
    for result in (by_token, by_batch):
        assert result["tokens"] == 500
        assert result["loss"] == pytest.approx(expected, rel=1e-12)
        assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-12)
    # a mean of batch means would weigh the 1-token batch like the 256-token one
    batch_means = [s / (b - a) for s, (a, b) in zip(sums, zip(cuts, cuts[1:]))]
    assert abs(sum(batch_means) / len(batch_means) - expected) > 1e-3
    assert ppl.compute(losses=[1000.0])["perplexity"] == math.inf


def test_masked_accuracy_ignores_minus_100_in_rows_and_flat():
    from hf_streamlm import metrics

    acc = metrics.load("masked_accuracy", keep_in_memory=True)
    predictions, references = [[5, 7, 9, 4], [1, 2, 3, 3]], [[5, -100, 8, 4], [-100, 2, -100, -100]]
    acc.add_batch(predictions=predictions[:1], references=references[:1])
    acc.add_batch(predictions=predictions[1:], references=references[1:])
    assert acc.compute() == {"accuracy": 0.75, "tokens": 4}
    flat = acc.compute(predictions=sum(predictions, []), references=sum(references, []))
    assert flat == {"accuracy": 0.75, "tokens": 4}
    assert acc.compute(predictions=[1, 2], references=[9, 2], ignore_index=9) == {"accuracy": 1.0, "tokens": 1}


# ------------------------------------------------------------------------------------------ eval command


def test_score_is_fp32_unless_asked_and_the_loop_eval_runs_under_accelerates_autocast(reset_accelerate):
    """``score`` without ``autocast`` is a plain fp32 forward (token-weighted over batches); with it, the
    forward runs under ``torch.autocast``; the loop's eval (``loop_eval``) adds no autocast of its own and
    gets the one a bf16-prepared model brings: the figure ``hf-streamlm eval`` gives with
    ``runtime.precision=bf16``."""
    import copy

    import torch
    from accelerate import Accelerator
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_streamlm.data.collate import CausalCollator
    from hf_streamlm.evaluation import autocast_dtype, loop_eval, score

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16)).eval()
    rng = random.Random(0)
    blocks = [{"input_ids": [rng.randrange(64) for _ in range(16)]} for _ in range(6)]
    collator = CausalCollator()
    with torch.no_grad():  # batches of 4 and 2 blocks, 15 predicted tokens per block
        losses = [model(**collator(blocks[i : i + 4])).loss.item() * 15 * len(blocks[i : i + 4]) for i in (0, 4)]
    fp32 = score(model, blocks, collator, 4)
    assert fp32["eval_tokens"] == 90 and fp32["eval_loss"] == pytest.approx(sum(losses) / 90, rel=1e-6)
    bf16 = score(model, blocks, collator, 4, autocast=autocast_dtype("bf16"))
    assert autocast_dtype("fp32") is None and abs(bf16["eval_loss"] - fp32["eval_loss"]) > 1e-5
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    prepared = accelerator.prepare(copy.deepcopy(model))
    in_loop = loop_eval(prepared, blocks, collator, 4, accelerator)
    assert in_loop["eval_loss"] == pytest.approx(bf16["eval_loss"], rel=1e-6) and prepared.training


def test_accuracy_at_mask_counts_the_mask_inputs_alone():
    """``eval_accuracy`` counts every labelled position; ``eval_mask_accuracy`` and ``eval_mask_top5`` only those
    whose input is the collator's ``mask_token_id``. A real MicroBERT scores two hand-built rows (one batch each:
    the counts add up over batches), labelled from its own ranking of the vocabulary at each position: of the 4
    [MASK] inputs, 2 labels are its first choice, 1 its fourth, 1 its sixth; of the 4 other labelled positions
    (a random or an unchanged token in the input), 3 are its first choice and 1 its second."""
    import torch

    from hf_streamlm.evaluation import score
    from hf_streamlm.models import MicroBertConfig, MicroBertForMaskedLM

    mask = 3
    torch.manual_seed(0)
    model = MicroBertForMaskedLM(MicroBertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, max_position_embeddings=16)).eval()
    input_ids = torch.randint(5, 64, (2, 8))
    input_ids[0, [1, 4]] = input_ids[1, [2, 6]] = mask
    with torch.no_grad():  # row by row with the attention mask, as score runs them: the same logits
        ranked = torch.cat([model(input_ids=row[None], attention_mask=torch.ones_like(row[None])).logits
                            .topk(6, dim=-1).indices for row in input_ids])
    labels = torch.full_like(input_ids, -100)
    at_mask = {(0, 1): 0, (0, 4): 0, (1, 2): 3, (1, 6): 5}
    elsewhere = {(0, 0): 0, (0, 7): 0, (1, 3): 0, (1, 5): 1}
    for (row, col), rank in {**at_mask, **elsewhere}.items():
        labels[row, col] = ranked[row, col, rank]

    class HandBuilt:  # the collator of the rows above; MLMCollator names its [MASK] id the same way
        mask_token_id = mask

        def __call__(self, blocks: list[dict]) -> dict:
            rows = [b["row"] for b in blocks]
            return {"input_ids": input_ids[rows], "attention_mask": torch.ones_like(input_ids[rows]),
                    "labels": labels[rows]}

    result = score(model, [{"row": 0}, {"row": 1}], HandBuilt(), batch_size=1)
    assert result["eval_tokens"] == 8
    assert result["eval_accuracy"] == 5 / 8  # 2 + 3 first choices
    assert result["eval_mask_accuracy"] == 2 / 4 and result["eval_mask_top5"] == 3 / 4


def test_eval_of_export_and_checkpoint_equals_the_logged_eval_masked_lm(mlm_run, tmp_path, capsys):
    logged = last_eval(mlm_run)
    assert logged["step"] == 4 and logged["eval_accuracy"] > 0
    assert 0 <= logged["eval_mask_accuracy"] <= logged["eval_mask_top5"] <= 1  # the eval rows of history.jsonl
    keys = ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_mask_accuracy", "eval_mask_top5")

    rc, out, err = eval_cli(capsys, str(mlm_run / "export"), "--json", str(tmp_path / "export.json"))
    assert rc == 0, err
    result = json.loads((tmp_path / "export.json").read_text())
    assert_same_figures(result, logged, keys)
    assert result["kind"] == "export" and result["family"] == "microbert"
    assert result["blocks"] == 12 and result["batches"] == 3  # max_batches x batch_size, as the loop
    assert f"{'loss':<13} {result['eval_loss']:.6g}" in out and "accuracy" in out
    assert f"{'mask_accuracy':<13} {result['eval_mask_accuracy']:.6g}" in out and "mask_top5" in out
    assert "eval_bits_per_byte" not in result  # WordPiece tokens do not map back to exact bytes

    rc, _, err = eval_cli(capsys, str(mlm_run / "checkpoints" / "step-4"), "--json", str(tmp_path / "ckpt.json"))
    assert rc == 0, err
    assert_same_figures(json.loads((tmp_path / "ckpt.json").read_text()), logged, keys)

    # An export without the training config it carries: the recipe and the run's overrides name the stream.
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (mlm_run / "export").iterdir():
        if f.name != "hf_streamlm_config.yaml":
            (bare / f.name).write_bytes(f.read_bytes())
    rc, _, err = eval_cli(capsys, str(bare), *MLM, "--json", str(tmp_path / "bare.json"))
    assert rc == 0, err
    assert_same_figures(json.loads((tmp_path / "bare.json").read_text()), logged, keys)

    rc, _, err = eval_cli(capsys, str(bare))
    assert rc == 2 and "give recipe=NAME" in err and len(err.strip().splitlines()) == 1


def test_eval_equals_the_logged_eval_decoder_with_the_network_refused(decoder_run, tmp_path, capsys):
    logged = last_eval(decoder_run)
    assert not {"eval_accuracy", "eval_mask_accuracy", "eval_mask_top5"} & logged.keys()
    assert 0 < logged["eval_bits_per_byte"] < logged["eval_loss"]
    keys = ("eval_loss", "eval_perplexity", "eval_bits_per_byte")

    rc, _, err = eval_cli(capsys, str(decoder_run / "export"), "--json", str(tmp_path / "export.json"))
    assert rc == 0, err
    result = json.loads((tmp_path / "export.json").read_text())
    assert result["family"] == "decoder" and "eval_accuracy" not in result
    assert_same_figures(result, logged, keys)

    # The checkpoint, in a fresh process whose sockets refuse to connect: loading the metric modules,
    # the model and the stream fetches nothing.
    proc = subprocess.run(
        [sys.executable, "-c", GUARDED_EVAL, "eval", str(decoder_run / "checkpoints" / "step-4"), "--json",
         str(tmp_path / "ckpt.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NETWORK_ATTEMPTS []" in proc.stdout
    assert (tmp_path / "m" / "evaluate_modules").is_dir()  # the modules were really loaded in that process
    assert_same_figures(json.loads((tmp_path / "ckpt.json").read_text()), logged, keys)


def test_eval_bad_input_is_one_line_exit_2(mlm_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(tmp_path / "missing")], "is not a folder"),
        ([str(empty)], "is neither an export"),
        ([], "eval needs a model folder"),
        ([str(mlm_run / "export"), "recipe=no_such_recipe"], "unknown recipe 'no_such_recipe'"),
        ([str(mlm_run / "export"), "recipe=quickstart_decoder"], "add model.type=microbert"),
        ([str(mlm_run / "export"), "data.eval_holdout=0"], "no held-out stream"),
        ([str(mlm_run / "export"), "--json"], "--json needs a file name"),
        ([str(mlm_run / "export"), "--jsn", "x"], "unknown option '--jsn'"),
    ]
    for args, message in cases:
        rc, _, err = eval_cli(capsys, *args)
        assert rc == 2, (args, err)
        assert message in err and err.startswith("hf-streamlm: error:"), (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)


def test_token_bytes_are_the_utf8_bytes_each_byte_level_token_stands_for(bpe_500, wordpiece_800):
    from transformers import AutoTokenizer

    from hf_streamlm.evaluation import token_bytes

    tokenizer = AutoTokenizer.from_pretrained(bpe_500)
    lengths = token_bytes(tokenizer)
    assert lengths.shape == (len(tokenizer),) and all(lengths[i] == 0 for i in tokenizer.all_special_ids)
    for text in ("def f(x):\n    return x", "Héllo wörld, naïve café — 東京 🙂", "  spaces\tand\ttabs  "):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert int(lengths[ids].sum()) == len(text.encode("utf-8")), text
    assert token_bytes(AutoTokenizer.from_pretrained(wordpiece_800)) is None


def test_bits_per_byte_is_the_summed_loss_in_bits_over_the_bytes_predicted(bpe_500):
    """``score`` with byte lengths: the loss summed over the predicted tokens, in bits, over the bytes those
    tokens stand for (the labels; a block's first token is never predicted)."""
    import math

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_streamlm.data.collate import CausalCollator
    from hf_streamlm.evaluation import score, token_bytes

    tokenizer = AutoTokenizer.from_pretrained(bpe_500)
    lengths = token_bytes(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16)).eval()
    rng = random.Random(0)
    blocks = [{"input_ids": [rng.randrange(len(tokenizer)) for _ in range(16)]} for _ in range(6)]
    result = score(model, blocks, CausalCollator(), 4, byte_lengths=lengths)
    predicted = sum(int(lengths[b["input_ids"][1:]].sum()) for b in blocks)
    assert result["eval_bits_per_byte"] == pytest.approx(result["eval_loss"] * 90 / (math.log(2) * predicted),
                                                         rel=1e-9)
    assert "eval_bits_per_byte" not in score(model, blocks, CausalCollator(), 4)

