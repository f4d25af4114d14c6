"""Reference benchmark: the hf_streamlm recipes against transformers' ``Trainer`` on the stock classes.

    python benchmarks/bench_reference.py [--families decoder,mlm] [--seeds 1,2,3] [--steps N]
                                         [--set key=value ...] [--modern] [--reuse-trainer]
                                         [--text PATH ...] [--work DIR] [--json PATH]

For each family and seed, two runs train the same model shape on the same documents with the same tokenizer,
optimizer settings, schedule and number of tokens, and one scorer grades both exports on held-out documents:

- **hf_streamlm**: ``python -m hf_streamlm.run recipe=quickstart_decoder`` (decoder) or ``recipe=quickstart``
  (MicroBERT masked LM) as a subprocess, with ``data.sources`` pointed at the benchmark's training JSONL,
  ``data.eval_holdout=0``, ``runtime.seed=S``, and the ``--set`` overrides (ablations). Its tokenizer is trained
  from that stream, as the recipe does; the export (``<run>/export``, docs: ARCHITECTURE.md "Run directory") is a
  stock Llama / BERT (``model.architecture=modern``: ModernBERT) checkpoint.
- **Trainer**: the way ``run_clm.py`` / ``run_mlm.py`` train. The tokenizer of that hf_streamlm run's export; a
  fresh stock ``LlamaForCausalLM`` / ``BertForMaskedLM`` (``--modern``: ``ModernBertForMaskedLM``) built from the
  export's own config (seeded before it is built, as run_clm does); the training documents tokenized, each
  wrapped as the hf_streamlm stream wraps it (``x <eos>`` /
  ``[CLS] x [SEP]``), concatenated and cut into blocks of ``data.sequence_length`` (the remainder dropped), the
  blocks shuffled by the Trainer's sampler; ``DataCollatorForLanguageModeling`` (``mlm_probability`` of the
  recipe, 80/10/10); ``TrainingArguments`` from the run's resolved ``config.yaml``: AdamW with its learning rate,
  weight decay, betas, epsilon and gradient clipping, warm-up then cosine to ``scheduler.min_lr``
  (``cosine_with_min_lr``), batch size, accumulation, ``max_steps = scheduler.total_steps``, fp32, seed S.
  Both sides thus train ``steps x batch x accumulation x sequence_length`` tokens; the benchmark checks it from
  hf_streamlm's ``history.jsonl`` (``tokens``) and the Trainer's ``num_input_tokens_seen``, compares the rate each
  optimizer step used on both sides (printed at a few steps), and lists any parameter that one side decays and
  the other does not. (The token stream is the one hf_streamlm packs: ``hf-streamlm stats`` over the same file
  and tokenizer counts the same documents, tokens and blocks.)
- **One scorer** (``AutoModelFor{CausalLM,MaskedLM}.from_pretrained`` of each export): the held-out documents,
  tokenized once and cut into the same blocks for both models. Causal: mean nats per predicted token, over the
  packed blocks (as run_clm evaluates) and over the documents one per sequence (no other document in the
  context, as hf_streamlm's ``data.document_masking`` trains the decoder recipe). Masked:
  a seeded 15% of the non-special positions, every one replaced by [MASK] (the same positions for both models):
  loss, accuracy and top-5 accuracy there; and the same positions replaced as BERT trains (80% [MASK], 10% a
  random token, 10% kept, seeded): loss and accuracy. The unigram baseline (the training tokens' frequencies;
  for accuracy, always the most frequent token) shows whether a model learned anything beyond it.

Text: by default the Rust documentation books that rustup installs
(``~/.rustup/toolchains/*/share/doc/rust/html/*/print.html``, about 3.5 MB of paragraph text the recipes do not
ship): one document per section (the paragraphs between two headings; code blocks dropped). ``--text`` takes
JSONL files (a ``text`` field) or ``.txt`` files (one document per paragraph, paragraphs separated by blank
lines) instead. 5% of the documents, chosen by a hash of their text, are held out. Corpus, runs and exports go
under ``--work`` (default ``~/.cache/hf_streamlm/bench_reference``), never into the repository.

``--reuse-trainer`` keeps the Trainer side's export and scores under a key of everything it depends on (tokenizer,
model config, corpus, training arguments, seed, scorer), so an ablation of the hf_streamlm side (``--set
data.block_shuffle_size=512``) reruns only that side. The pairing ``mlm-modern`` (``--modern``) trains
hf_streamlm with ``model.architecture=modern`` when the installed hf_streamlm has that key, and otherwise its
classic MicroBERT (said in the table).

Output: each run's figures and wall time, then per family a table of mean +- std over seeds on each side, the
ratio hf_streamlm / Trainer and the seed spread (max - min), in Markdown ready for docs/performance.md; ``--json``
writes all of it.
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import html.parser
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_streamlm" / "bench_reference"
RUST_BOOKS = "~/.rustup/toolchains/*/share/doc/rust/html/*/print.html"
HELD_OUT_PER_10000 = 500  # 5% of the documents, by a hash of their text
MIN_WORDS = 10  # sections shorter than this are headings' boilerplate ("This feature has no tracking issue.")
MASK_SEED = 1234  # the scorer's masked positions; fixed so that every model is graded on the same ones
SCORER_VERSION = 2  # part of the Trainer cache key: bump when the scorer changes
# After these steps both sides' rates are printed (hf_streamlm logs every 10).
LR_CHECK_STEPS = (10, 20, 40, 100, 300, 500)


@dataclass(frozen=True)
class Pairing:
    """One row of the benchmark: an hf_streamlm recipe (with its own overrides) against a stock class."""

    name: str
    recipe: str
    task: str  # "causal" or "mlm"
    trainer_class: str  # the stock transformers class the Trainer side trains
    overrides: tuple[str, ...] = ()
    note: str = ""


PAIRINGS = {
    "decoder": Pairing("decoder", "quickstart_decoder", "causal", "LlamaForCausalLM"),
    # The quickstart recipe trains the modern encoder: the classic pairing names its architecture.
    "mlm": Pairing("mlm", "quickstart", "mlm", "BertForMaskedLM", ("model.architecture=classic",)),
}


def modern_pairing() -> Pairing:
    """hf_streamlm's modern encoder against stock ModernBERT; until hf_streamlm has ``model.architecture``, its
    classic MicroBERT (the same run as the ``mlm`` pairing's) against stock ModernBERT."""
    from hf_streamlm.config import ConfigError, load_config

    try:
        load_config(["recipe=quickstart", "model.architecture=modern"])
    except ConfigError:
        return Pairing("mlm-modern", "quickstart", "mlm", "ModernBertForMaskedLM",
                       note="hf_streamlm has no model.architecture yet: its side is the classic MicroBERT")
    return Pairing("mlm-modern", "quickstart", "mlm", "ModernBertForMaskedLM", ("model.architecture=modern",))


# ---------------------------------------------------------------------------------------------------- corpus


class SectionParser(html.parser.HTMLParser):
    """mdBook ``print.html`` -> one document per section: the ``<p>`` paragraphs between two headings inside
    ``<main>``, whitespace collapsed, paragraphs joined by a blank line. Code blocks (``<pre>``) are dropped;
    inline ``<code>`` inside a paragraph stays, as the sentence needs it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities unescaped
        self.documents: list[str] = []
        self.section: list[str] = []
        self.paragraph: list[str] | None = None
        self.in_main = False
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "main":
            self.in_main = True
        if not self.in_main:
            return
        if re.fullmatch(r"h[1-6]", tag):
            self.end_section()
        elif tag == "p":
            self.paragraph = []
        elif tag in ("pre", "script", "style"):
            self.skipping += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "p" and self.paragraph is not None:
            text = " ".join("".join(self.paragraph).split())
            if text:
                self.section.append(text)
            self.paragraph = None
        elif tag in ("pre", "script", "style") and self.skipping:
            self.skipping -= 1
        elif tag == "main":
            self.end_section()
            self.in_main = False

    def handle_data(self, data: str) -> None:
        if self.paragraph is not None and not self.skipping:
            self.paragraph.append(data)

    def end_section(self) -> None:
        if self.section:
            self.documents.append("\n\n".join(self.section))
        self.section = []


def rust_book_files() -> list[Path]:
    """The books of one toolchain (stable if installed): toolchains ship the same books, nearly word for word."""
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(RUST_BOOKS)))
    toolchains = sorted({f.parents[4].name for f in files}, key=lambda t: (not t.startswith("stable"), t))
    return [f for f in files if f.parents[4].name == toolchains[0]] if toolchains else []


def read_documents(paths: list[Path]) -> list[str]:
    """Documents of ``paths``: mdBook HTML sections, JSONL ``text`` fields, or ``.txt`` paragraphs."""
    documents: list[str] = []
    for path in paths:
        if path.suffix in (".html", ".htm"):
            parser = SectionParser()
            parser.feed(path.read_text(encoding="utf-8"))
            parser.close()
            documents += parser.documents
        elif path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            text = json.loads(line).get("text")
                        except (json.JSONDecodeError, AttributeError):
                            sys.exit(f"bench_reference: {path} line {number} is not a JSON object with a 'text' field")
                        if isinstance(text, str):
                            documents.append(text)
        elif path.suffix == ".txt":
            documents += re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
        else:
            sys.exit(f"bench_reference: --text {path}: expected .jsonl, .json or .txt (or mdBook .html)")
    return documents


def text_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def build_corpus(text_paths: list[Path] | None, work: Path) -> dict:
    """Write ``train.jsonl`` and ``heldout.jsonl`` under ``work/corpus-<hash>/`` (once) and describe them."""
    if text_paths:
        missing = [str(p) for p in text_paths if not p.is_file()]
        if missing:
            sys.exit(f"bench_reference: --text: no such file: {', '.join(missing)}")
        paths, origin = text_paths, "--text " + " ".join(map(str, text_paths))
    else:
        paths, origin = rust_book_files(), "the Rust books (rustup)"
        if not paths:
            sys.exit(f"bench_reference: no text found: no Rust books under {RUST_BOOKS} (install a toolchain with "
                     "rustup) and no --text PATH given (JSONL with a 'text' field, or .txt files)")
    seen: set[str] = set()
    documents = []
    for text in read_documents(paths):
        text = text.strip()
        if len(text.split()) >= MIN_WORDS and text not in seen:
            seen.add(text)
            documents.append(text)
    if len(documents) < 20:
        sys.exit(f"bench_reference: no usable text in {origin}: {len(documents)} documents of {MIN_WORDS}+ words")
    digest = hashlib.sha256("\n\x00".join(documents).encode()).hexdigest()[:16]
    folder = work / f"corpus-{digest}"
    train = [d for d in documents if text_key(d) % 10000 >= HELD_OUT_PER_10000]
    held_out = [d for d in documents if text_key(d) % 10000 < HELD_OUT_PER_10000]
    if not (folder / "heldout.jsonl").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name, docs in (("train.jsonl", train), ("heldout.jsonl", held_out)):
            tmp = folder / (name + ".tmp")
            tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
            tmp.replace(folder / name)
    return {"origin": origin, "sha": digest, "train": str(folder / "train.jsonl"),
            "heldout": str(folder / "heldout.jsonl"), "train_documents": len(train),
            "heldout_documents": len(held_out), "train_chars": sum(map(len, train)),
            "heldout_chars": sum(map(len, held_out))}


def load_texts(path: str) -> list[str]:
    return [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


# ------------------------------------------------------------------------------------------------ tokens


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def encode_documents(tokenizer, texts: list[str], task: str) -> list[list[int]]:
    """Each document wrapped as hf_streamlm's stream and run_mlm's tokenizer call wrap it: ``[CLS] x [SEP]``
    (masked LM) or ``x <eos>`` (causal; run_clm itself adds nothing between documents, GPT-2's tokenizer having
    no post-processor, so the separator is taken from the hf_streamlm side to keep the token streams equal)."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    if task == "mlm":
        return [[tokenizer.cls_token_id, *x, tokenizer.sep_token_id] for x in ids]
    return [[*x, tokenizer.eos_token_id] for x in ids]


def cut_blocks(documents: list[list[int]], block: int):
    """run_clm's ``group_texts``: concatenate, cut ``block``-token blocks, drop the remainder."""
    import torch

    flat = torch.tensor([t for d in documents for t in d], dtype=torch.long)
    n = len(flat) // block
    return flat[: n * block].view(n, block)


class Tokens:
    """Per tokenizer (by the hash of its ``tokenizer.json``): the training blocks, the held-out blocks, the
    scorer's fixed masked positions and the unigram counts. Computed once per tokenizer in this process."""

    _cache: ClassVar[dict[tuple, Tokens]] = {}

    @classmethod
    def of(cls, export: Path, corpus: dict, task: str, block: int) -> Tokens:
        key = (file_hash(export / "tokenizer.json"), corpus["sha"], task, block)
        if key not in cls._cache:
            cls._cache[key] = cls(export, corpus, task, block, key[0])
        return cls._cache[key]

    def __init__(self, export: Path, corpus: dict, task: str, block: int, tokenizer_hash: str):
        import torch
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(export)
        self.tokenizer_hash = tokenizer_hash
        self.task = task
        self.train = cut_blocks(encode_documents(self.tokenizer, load_texts(corpus["train"]), task), block)
        held_out_documents = encode_documents(self.tokenizer, load_texts(corpus["heldout"]), task)
        self.heldout = cut_blocks(held_out_documents, block)
        if task == "causal":
            # The same documents one per sequence (cut into pieces of at most a block, right-padded): no context
            # from another document, positions from 0, as hf_streamlm's document masking trains and as run_clm
            # never does. Both models are graded on these too.
            pieces = [d[i:i + block] for d in held_out_documents for i in range(0, len(d), block)]
            pieces = [p for p in pieces if len(p) > 1]
            self.apart = torch.zeros(len(pieces), block, dtype=torch.long)
            self.apart_mask = torch.zeros(len(pieces), block, dtype=torch.long)
            for row, piece in enumerate(pieces):
                self.apart[row, :len(piece)] = torch.tensor(piece)
                self.apart_mask[row, :len(piece)] = 1
        vocab = len(self.tokenizer)
        self.counts = torch.bincount(self.train.flatten(), minlength=vocab).double()
        if task == "mlm":
            g = torch.Generator().manual_seed(MASK_SEED)
            special = torch.isin(self.heldout, torch.tensor(self.tokenizer.all_special_ids))
            self.chosen = (torch.rand(self.heldout.shape, generator=g) < 0.15) & ~special
            roll = torch.rand(self.heldout.shape, generator=g)
            random_ids = torch.randint(vocab, self.heldout.shape, generator=g)
            self.all_masked = self.heldout.masked_fill(self.chosen, self.tokenizer.mask_token_id)
            bert = self.heldout.masked_fill(self.chosen & (roll < 0.8), self.tokenizer.mask_token_id)
            self.bert_masked = torch.where(self.chosen & (roll >= 0.8) & (roll < 0.9), random_ids, bert)

    def unigram(self) -> dict:
        """The baseline that knows only the training tokens' frequencies (add-one smoothed)."""
        import torch

        counts = self.counts + 1
        if self.task == "causal":
            logp = torch.log(counts / counts.sum())
            targets = self.apart[:, 1:][self.apart_mask[:, 1:] == 1]
            return {"nats_per_token": float(-logp[self.heldout[:, 1:]].mean()),
                    "nats_per_token_apart": float(-logp[targets].mean())}
        counts[self.tokenizer.all_special_ids] = 0  # a masked label is never a special token
        logp = torch.log(counts / counts.sum())
        labels = self.heldout[self.chosen]
        top = counts.topk(5).indices
        return {"mask_loss": float(-logp[labels].mean()), "mask_acc": float((labels == top[0]).double().mean()),
                "mask_top5": float(torch.isin(labels, top).double().mean()),
                "bert_loss": float(-logp[labels].mean()), "bert_acc": float((labels == top[0]).double().mean())}


# ------------------------------------------------------------------------------------------------ scorer


def score(export: Path, tokens: Tokens, batch: int = 32) -> dict:
    """One scorer for every export: the held-out blocks of ``tokens``, no dropout, no padding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForCausalLM if tokens.task == "causal" else AutoModelForMaskedLM
    model = auto.from_pretrained(export, dtype=torch.float32).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        if tokens.task == "causal":
            nats, count = 0.0, 0
            for i in range(0, len(tokens.heldout), batch):
                ids = tokens.heldout[i:i + batch]
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].float()
                nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                                reduction="sum"))
                count += ids[:, 1:].numel()
            result = {"nats_per_token": nats / count, "predicted_tokens": count}
            nats, count = 0.0, 0
            for i in range(0, len(tokens.apart), batch):
                ids, mask = tokens.apart[i:i + batch], tokens.apart_mask[i:i + batch]
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                                ignore_index=-100, reduction="sum"))
                count += int((targets != -100).sum())
            result |= {"nats_per_token_apart": nats / count, "predicted_tokens_apart": count}
        else:
            sums = dict.fromkeys(("mask_loss", "mask_acc", "mask_top5", "bert_loss", "bert_acc"), 0.0)
            count = 0
            for i in range(0, len(tokens.heldout), batch):
                chosen, labels = tokens.chosen[i:i + batch], tokens.heldout[i:i + batch][tokens.chosen[i:i + batch]]
                for kind, inputs in (("mask", tokens.all_masked), ("bert", tokens.bert_masked)):
                    ids = inputs[i:i + batch]
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[chosen].float()
                    sums[f"{kind}_loss"] += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                    sums[f"{kind}_acc"] += float((logits.argmax(-1) == labels).sum())
                    if kind == "mask":
                        sums["mask_top5"] += float((logits.topk(5).indices == labels[:, None]).any(-1).sum())
                count += len(labels)
            result = {k: v / count for k, v in sums.items()} | {"masked_positions": count}
    result["score_s"] = round(time.perf_counter() - start, 1)
    return result


# ------------------------------------------------------------------------------------------- hf_streamlm side


def hf_streamlm_run(pairing: Pairing, seed: int, args, corpus: dict, work: Path) -> dict:
    """Train with ``python -m hf_streamlm.run`` and read back what it did."""
    sets = [*pairing.overrides, *args.set]
    tag = hashlib.sha256(json.dumps([pairing.recipe, sets, args.steps, corpus["sha"]]).encode()).hexdigest()[:10]
    out = work / "runs" / f"{pairing.recipe}-s{seed}-{tag}"
    shutil.rmtree(out, ignore_errors=True)  # always a fresh run, never a resume
    out.parent.mkdir(parents=True, exist_ok=True)
    source = json.dumps([{"path": "json", "data_files": corpus["train"]}])
    overrides = [f"recipe={pairing.recipe}", f"data.sources={source}", "data.eval_holdout=0", f"runtime.seed={seed}",
                 f"runtime.output_dir={out}", "runtime.resume=never", "runtime.evaluation.every_n_steps=null",
                 "runtime.checkpoint.every_n_steps=null", "runtime.demo_sentences=[]",
                 "runtime.logging.tensorboard=false", "runtime.logging.progress_bar=false",
                 "runtime.logging.enable_stdout=false", "runtime.log_every_n_steps=10",
                 *([f"scheduler.total_steps={args.steps}"] if args.steps else []), *sets]
    command = [sys.executable, "-m", "hf_streamlm.run", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        sys.exit(f"bench_reference: the hf_streamlm run failed (exit {done.returncode}); log: "
                 f"{out.parent / (out.name + '.log')}\n{tail}")
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    d, s = config["data"], config["scheduler"]
    per_step = d["batch_size"] * d["gradient_accumulation_steps"] * d["sequence_length"]
    last = train_rows[-1]
    # The training loop's own time: each history row covers the steps since the previous one at its tokens_per_s.
    previous, train_s = 0, 0.0
    for r in train_rows:
        train_s += (r["step"] - previous) * per_step / r["tokens_per_s"]
        previous = r["step"]
    return {"side": "hf_streamlm", "pairing": pairing.name, "seed": seed, "run_dir": str(out),
            "export": str(out / "export"), "config": config, "overrides": sets, "wall_s": round(wall, 1),
            "train_s": round(train_s, 1), "steps": last["step"], "tokens": last["tokens"],
            "tokens_per_step": per_step,
            "total_steps": s["total_steps"], "final_train_loss": last["loss"],
            # the rate logged after step N is the one step N+1 trains with (module docstring of applied_learning_rates)
            "lr_applied": {r["step"] + 1: r["lr"] for r in train_rows if r["step"] < s["total_steps"]}}


# ------------------------------------------------------------------------------------------------ Trainer side


def stock_config(pairing: Pairing, export: Path, tokenizer):
    """The stock class's config at the shape of hf_streamlm's export: the export's own config when it is of that
    class (the native export is a stock Llama/BERT config), else (ModernBERT against a classic MicroBERT export)
    one built from its width, depth, heads and positions."""
    from transformers import AutoConfig, ModernBertConfig

    native = AutoConfig.from_pretrained(export)
    wanted = {"LlamaForCausalLM": "llama", "BertForMaskedLM": "bert", "ModernBertForMaskedLM": "modernbert"}
    if native.model_type == wanted[pairing.trainer_class]:
        return native
    if pairing.trainer_class != "ModernBertForMaskedLM":
        sys.exit(f"bench_reference: {export} holds a {native.model_type} model, expected "
                 f"{wanted[pairing.trainer_class]} for the {pairing.name} pairing")
    # ModernBERT's MLP is a GLU (two input projections): 2/3 of the classic width holds as many parameters,
    # rounded up to a multiple of 32 as hf_streamlm's decoder rounds its SwiGLU width.
    intermediate = 32 * math.ceil(2 * native.intermediate_size / 3 / 32)
    return ModernBertConfig(
        vocab_size=native.vocab_size, hidden_size=native.hidden_size, intermediate_size=intermediate,
        num_hidden_layers=native.num_hidden_layers, num_attention_heads=native.num_attention_heads,
        max_position_embeddings=native.max_position_embeddings, initializer_range=native.initializer_range,
        pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, tie_word_embeddings=native.tie_word_embeddings,
    )


def training_arguments(config: dict, seed: int) -> dict:
    """TrainingArguments (as a dict, less ``output_dir``) mirroring the hf_streamlm run's resolved config."""
    o, s, d = config["optimizer"], config["scheduler"], config["data"]
    if o["algorithm"] != "adam_w" or s["strategy"] != "cosine_with_warmup":
        sys.exit(f"bench_reference: the Trainer side mirrors adam_w with cosine_with_warmup; the run used "
                 f"optimizer.algorithm={o['algorithm']}, scheduler.strategy={s['strategy']}")
    peak = s["max_lr"] if s["max_lr"] is not None else o["learning_rate"]
    return {"max_steps": s["total_steps"],
            "per_device_train_batch_size": d["batch_size"],
            "gradient_accumulation_steps": d["gradient_accumulation_steps"], "learning_rate": peak,
            "weight_decay": o["weight_decay"], "adam_beta1": o["beta1"], "adam_beta2": o["beta2"],
            "adam_epsilon": o["epsilon"], "max_grad_norm": o["max_grad_norm"] or 0.0, "optim": "adamw_torch",
            "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": s["min_lr"]},
            "warmup_steps": s["warmup_steps"], "seed": seed, "bf16": False, "fp16": False,
            "eval_strategy": "no", "save_strategy": "no", "logging_steps": 10, "report_to": [],
            "disable_tqdm": True, "dataloader_drop_last": True, "include_num_input_tokens_seen": "all",
            "mlm_probability": d["mlm_probability"]}


def trainer_run(pairing: Pairing, seed: int, hf: dict, corpus: dict, args, work: Path) -> dict:
    """Train the stock class with ``Trainer`` on the same tokens; cached under a key of its inputs when asked."""
    import transformers
    from transformers import (
        DataCollatorForLanguageModeling,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    export = Path(hf["export"])
    block = hf["config"]["data"]["sequence_length"]
    tokens = Tokens.of(export, corpus, pairing.task, block)
    config = stock_config(pairing, export, tokens.tokenizer)
    arguments = training_arguments(hf["config"], seed)
    mlm_probability = arguments.pop("mlm_probability")
    settings = {"class": pairing.trainer_class, "config": config.to_diff_dict(), "tokenizer": tokens.tokenizer_hash,
                "corpus": corpus["sha"], "block": block, "arguments": arguments,
                "mlm_probability": mlm_probability, "scorer": SCORER_VERSION, "transformers": transformers.__version__}
    settings["config"].pop("transformers_version", None)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = work / "trainer" / f"{pairing.trainer_class}-s{seed}-{key}"
    cached = folder / "result.json"
    if args.reuse_trainer and cached.is_file():
        result = json.loads(cached.read_text())
        result["cached"] = True
        return result
    shutil.rmtree(folder, ignore_errors=True)
    arguments = {**arguments, "output_dir": str(folder / "trainer")}

    set_seed(seed)  # before the model is built, as run_clm/run_mlm do
    model = getattr(transformers, pairing.trainer_class)(config)
    dataset = [{"input_ids": row} for row in tokens.train.tolist()]
    tokenizer = tokens.tokenizer
    if pairing.task == "causal" and tokenizer.pad_token_id in (None, tokenizer.eos_token_id):
        # DataCollatorForLanguageModeling(mlm=False) ignores the labels of pad tokens: with pad = eos it would not
        # train on <eos>, which hf_streamlm does; run_clm's own way then (labels = inputs, nothing ignored).
        collator = default_data_collator
        dataset = [{"input_ids": row, "labels": row} for row in tokens.train.tolist()]
    else:
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=pairing.task == "mlm",
                                                   mlm_probability=mlm_probability if pairing.task == "mlm" else None)
    applied = applied_learning_rates()
    trainer = Trainer(model=model, args=TrainingArguments(**arguments), train_dataset=dataset,
                      data_collator=collator, callbacks=[applied])
    trainer.remove_callback(PrinterCallback)  # its log dicts on stdout; the figures are printed below
    start = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - start
    trainer.save_model(str(folder / "export"))
    tokens.tokenizer.save_pretrained(folder / "export")
    shutil.rmtree(folder / "trainer", ignore_errors=True)
    logs = [r for r in trainer.state.log_history if "learning_rate" in r]
    result = {"side": "Trainer", "pairing": pairing.name, "seed": seed, "class": pairing.trainer_class,
              "export": str(folder / "export"), "key": key, "wall_s": round(wall, 1), "train_s": round(wall, 1),
              "steps": trainer.state.global_step, "tokens": int(trainer.state.num_input_tokens_seen),
              "tokens_per_step": arguments["per_device_train_batch_size"] * arguments["gradient_accumulation_steps"]
              * block * max(1, trainer.args.world_size), "total_steps": arguments["max_steps"],
              "train_blocks": len(dataset), "final_train_loss": logs[-1].get("loss") if logs else None,
              "mean_train_loss": output.training_loss, "lr_applied": applied.rates,
              "decay_check": decay_groups_check(trainer), "parameters": model.num_parameters(),
              "cached": False}
    result["scores"] = score(folder / "export", tokens)
    cached.write_text(json.dumps(result, indent=1))
    return result


def applied_learning_rates():
    """A Trainer callback that records the rate each optimizer step used (``rates[step]``), read between
    ``optimizer.step()`` and ``lr_scheduler.step()``. The Trainer's log shows the rate of the step just taken;
    hf_streamlm's history row of step N shows ``scheduler.get_last_lr()`` after that step: the rate of step N+1."""
    from transformers import TrainerCallback

    class AppliedLearningRate(TrainerCallback):
        def __init__(self) -> None:
            self.rates: dict[int, float] = {}

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
            self.rates[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    return AppliedLearningRate()


def decay_groups_check(trainer) -> dict:
    """Which parameters the Trainer decays, against hf_streamlm's rule (every tensor of 2+ dimensions decays;
    biases and norm weights do not): the names where the two rules disagree."""
    params = dict(trainer.model.named_parameters())  # a tied weight once, under its first name
    decayed = set(trainer.get_decay_parameter_names(trainer.model)) & set(params)
    by_dimension = {n for n, p in params.items() if p.ndim >= 2}
    return {"decayed": len(decayed), "not_decayed": len(params) - len(decayed),
            "only_trainer_decays": sorted(decayed - by_dimension),
            "only_hf_streamlm_decays": sorted(by_dimension - decayed)}


# --------------------------------------------------------------------------------------------------- reporting


METRICS = {  # key, label (the arrow: which way is better)
    "causal": [("nats_per_token", "held-out nats/token ↓"),
               ("nats_per_token_apart", "held-out nats/token, one document per sequence ↓")],
    "mlm": [("mask_loss", "loss at [MASK] ↓"), ("mask_acc", "accuracy at [MASK] ↑"), ("mask_top5", "top-5 at [MASK] ↑"),
            ("bert_loss", "loss, 80/10/10 ↓"), ("bert_acc", "accuracy, 80/10/10 ↑")],
}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(pairing: Pairing, runs: list[dict]) -> tuple[dict, str]:
    hf = sorted((r for r in runs if r["side"] == "hf_streamlm"), key=lambda r: r["seed"])
    tr = sorted((r for r in runs if r["side"] == "Trainer"), key=lambda r: r["seed"])
    digits = 4
    run = " ".join(f"`{o}`" for o in [f"recipe={pairing.recipe}", *hf[0]["overrides"]])
    heading = (f"**{pairing.name}**: hf_streamlm {run} vs Trainer + `{pairing.trainer_class}`, seeds "
               f"{', '.join(str(r['seed']) for r in hf)}, {hf[0]['total_steps']} steps x {hf[0]['tokens_per_step']:,} "
               "tokens" + (f" ({pairing.note})" if pairing.note else ""))
    lines = [heading, "",
             ("| metric | hf_streamlm | Trainer | hf_streamlm / Trainer | seed spread (hf_streamlm / Trainer) "
              "| unigram |"), "|---|---|---|---|---|---|"]
    summary = {}
    for key, label in METRICS[pairing.task]:
        a, b = [r["scores"][key] for r in hf], [r["scores"][key] for r in tr]
        (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
        uni = statistics.mean(r["unigram"][key] for r in hf)
        summary[key] = {"hf_streamlm": a, "trainer": b, "hf_mean": ma, "hf_std": sa, "trainer_mean": mb,
                        "trainer_std": sb, "ratio": ma / mb if mb else None, "hf_spread": max(a) - min(a),
                        "trainer_spread": max(b) - min(b), "unigram": uni}
        lines.append(f"| {label} | {ma:.{digits}f} ± {sa:.{digits}f} | {mb:.{digits}f} ± {sb:.{digits}f} | "
                     f"{ma / mb:.4f} | {max(a) - min(a):.{digits}f} / {max(b) - min(b):.{digits}f} | {uni:.{digits}f} |")
    ta, tb = [r["train_s"] for r in hf], [r["train_s"] for r in tr]
    lines.append(f"| training loop, s (hf_streamlm: from history.jsonl; Trainer: train(); a shared machine) | "
                 f"{statistics.mean(ta):.0f} | {statistics.mean(tb):.0f} | {statistics.mean(ta) / statistics.mean(tb):.2f} "
                 "| | |")
    return summary, "\n".join(lines)


def print_run(hf: dict, tr: dict) -> None:
    task_keys = [k for k, _ in METRICS["causal" if "nats_per_token" in hf["scores"] else "mlm"]]
    for r in (hf, tr):
        figures = ", ".join(f"{k} {r['scores'][k]:.4f}" for k in task_keys)
        cached = " (cached)" if r.get("cached") else ""
        print(f"  {r['side']:>11} seed {r['seed']}: {figures}; {r['steps']} steps, {r['tokens']:,} tokens "
              f"({r['tokens'] / max(1, r['steps']):,.0f}/step, {r['passes']:.2f} passes); training {r['train_s']:.0f} s, "
              f"wall {r['wall_s']:.0f} s, scoring {r['scores']['score_s']:.0f} s{cached}", flush=True)
    print(f"  {'unigram':>11}       : " + ", ".join(f"{k} {hf['unigram'][k]:.4f}" for k in task_keys))
    hl, tl = ({int(k): v for k, v in r["lr_applied"].items()} for r in (hf, tr))
    steps = [k for k in sorted(hl) if k in tl and (k - 1) in LR_CHECK_STEPS or k == max(hl)]
    print("  learning rate of step " + ", ".join(f"{k}: {hl[k]:.4e} / {tl[k]:.4e}" for k in steps)
          + " (hf_streamlm / Trainer)")
    check = tr["decay_check"]
    if check["only_trainer_decays"] or check["only_hf_streamlm_decays"]:
        print(f"  weight decay differs: only Trainer decays {check['only_trainer_decays']}, only hf_streamlm "
              f"{check['only_hf_streamlm_decays']}")
    else:
        print(f"  weight decay: the same parameters on both sides ({check['decayed']} tensors decayed, "
              f"{check['not_decayed']} not: biases and norms)")


def equal_tokens(hf: dict, tr: dict) -> list[str]:
    """What differs between the two sides' token budgets and schedules (an empty list when nothing)."""
    problems = []
    if hf["tokens_per_step"] != tr["tokens_per_step"]:
        problems.append(f"tokens per step {hf['tokens_per_step']} vs {tr['tokens_per_step']}")
    if hf["steps"] != tr["steps"]:
        problems.append(f"steps {hf['steps']} vs {tr['steps']}")
    if hf["tokens"] != hf["steps"] * hf["tokens_per_step"]:
        problems.append(f"hf_streamlm counted {hf['tokens']:,} tokens for {hf['steps']} steps")
    if tr["tokens"] != tr["steps"] * tr["tokens_per_step"]:
        problems.append(f"Trainer counted {tr['tokens']:,} tokens for {tr['steps']} steps")
    hl, tl = ({int(k): v for k, v in r["lr_applied"].items()} for r in (hf, tr))
    off = [s for s in hl if s in tl and not math.isclose(hl[s], tl[s], rel_tol=1e-6, abs_tol=1e-12)]
    if off:
        problems.append(f"learning rates differ at steps {off[:5]}")
    return problems


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="decoder,mlm",
                        help="comma-separated: decoder, mlm, mlm-modern (default decoder,mlm)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps on both sides (default: the recipe's total_steps), for smoke runs; the "
                             "recipe's warm-up stays (40 steps; --set scheduler.warmup_steps=N for fewer)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the hf_streamlm side, as on its command line (repeatable); the Trainer "
                             "side follows the optimizer, schedule, batch and shape it resolves to")
    parser.add_argument("--modern", action="store_true",
                        help="add the mlm-modern pairing: Trainer + ModernBertForMaskedLM at the same width, depth, "
                             "heads (against hf_streamlm model.architecture=modern when it has that key)")
    parser.add_argument("--reuse-trainer", action="store_true",
                        help="reuse the Trainer side's export and scores when all its inputs are unchanged")
    parser.add_argument("--text", type=Path, nargs="+", default=None,
                        help="documents instead of the Rust books: .jsonl (a 'text' field) or .txt files")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"work folder (default {DEFAULT_WORK})")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = parser.parse_args()
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.block_shuffle_size=512")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in (*PAIRINGS, "mlm-modern")]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(PAIRINGS)}, mlm-modern")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.work.resolve().is_relative_to(REPO):
        parser.error(f"--work {args.work} is inside the repository; use a folder outside it")
    args.work.mkdir(parents=True, exist_ok=True)

    pairings = [PAIRINGS[f] for f in families if f in PAIRINGS]
    if args.modern or "mlm-modern" in families:
        pairings.append(modern_pairing())
    corpus = build_corpus(args.text, args.work)
    print(f"corpus: {corpus['origin']}: {corpus['train_documents']:,} training documents "
          f"({corpus['train_chars'] / 1e6:.2f} M chars), {corpus['heldout_documents']:,} held out "
          f"({corpus['heldout_chars'] / 1e6:.2f} M chars); {Path(corpus['train']).parent}", flush=True)

    import transformers

    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of every from_pretrained
    runs: list[dict] = []
    tables, summaries = [], {}
    hf_done: dict[tuple, dict] = {}  # an hf_streamlm run shared by two pairings (mlm-modern without the key)
    for pairing in pairings:
        print(f"\n== {pairing.name}: hf_streamlm recipe={pairing.recipe} vs Trainer + {pairing.trainer_class}"
              + (f" ({pairing.note})" if pairing.note else ""), flush=True)
        pair_runs = []
        for seed in seeds:
            reuse = (pairing.recipe, pairing.overrides, seed)
            hf = hf_done.get(reuse) or hf_streamlm_run(pairing, seed, args, corpus, args.work)
            hf_done[reuse] = hf
            hf = {**hf, "pairing": pairing.name}
            block = hf["config"]["data"]["sequence_length"]
            tokens = Tokens.of(Path(hf["export"]), corpus, pairing.task, block)
            if "scores" not in hf:
                hf["scores"] = score(Path(hf["export"]), tokens)
                hf_done[reuse]["scores"] = hf["scores"]
            hf["unigram"] = tokens.unigram()
            hf["tokenizer"] = tokens.tokenizer_hash
            hf["heldout_blocks"] = len(tokens.heldout)
            tr = trainer_run(pairing, seed, hf, corpus, args, args.work)
            for r in (hf, tr):  # passes over the training tokens (the same count on both sides)
                r["passes"] = r["tokens"] / tokens.train.numel()
            print(f" seed {seed} ({len(tokens.heldout)} held-out blocks of {block}, "
                  f"tokenizer {tokens.tokenizer_hash}):")
            print_run(hf, tr)
            problems = equal_tokens(hf, tr)
            if problems:
                print("  WARNING, the two sides differ: " + "; ".join(problems), flush=True)
            pair_runs += [hf, tr]
        if len({r["tokenizer"] for r in pair_runs if r["side"] == "hf_streamlm"}) > 1:
            print("  note: the trained tokenizer differs between seeds; each pair is scored on its own tokens, "
                  "compare nats/token within a seed")
        summary, table = summarize(pairing, pair_runs)
        summaries[pairing.name] = summary
        tables.append(table)
        runs += pair_runs

    print("\n" + "\n\n".join(tables))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"corpus": corpus, "command": sys.argv, "summary": summaries,
                                         "runs": runs, "tables": tables}, indent=1, default=str))
        print(f"\nresults: {args.json}")


if __name__ == "__main__":
    main()
