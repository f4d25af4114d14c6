"""Elastic resume of the training stream, in one process (the cheap layer under
``tests/test_elastic_resume.py``'s real launches): rank loaders of one layout are stepped in lock step
(as DDP does), their states handed to the loaders of another layout (``hf_streamlm.data.elastic``), and
the document trace of all readers together lists every document of each pass exactly once.

The shares are tiny on purpose: a reader's pass (a few documents) is far smaller than a tokenizing chunk
(256 documents), so at the stop each old reader holds many passes in flight -- the case where the old
readers' packing remainders must be merged by pass, not appended one after the other."""

from __future__ import annotations

import copy
import functools
from collections import Counter

import pytest

from hf_streamlm.config import load_config
from hf_streamlm.data.collate import make_collator
from hf_streamlm.data.documents import document_key
from hf_streamlm.data.elastic import origins
from hf_streamlm.data.pipeline import build_train_loader, reader_settings
from hf_streamlm.tokenizer import train_tokenizer
from tests.conftest import two_source_corpus

GLOBAL = 4  # sequences per optimizer step, on every layout (batch 1 x accumulation x ranks)
STOP = 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources of 4 jsonl shards: 32 and 16 short documents, each text distinct."""
    root = tmp_path_factory.mktemp("elastic-stream")
    docs = two_source_corpus(root, (8, 4))
    texts = docs[0] + docs[1]
    return root, docs, {"microbert": train_tokenizer(texts, "wordpiece", vocab_size=200, min_frequency=1),
                        "decoder": train_tokenizer(texts, "bpe", vocab_size=300, min_frequency=1)}


def config_for(root, family: str, workers: int):
    recipe = "quickstart" if family == "microbert" else "quickstart_decoder"
    sources = f"[{{path: json, data_files: '{root}/a-*.jsonl', weight: 2}}, " \
              f"{{path: json, data_files: '{root}/b-*.jsonl', weight: 1}}]"
    return load_config([f"recipe={recipe}", f"data.sources={sources}", f"data.num_workers={workers}",
                        "data.stopping_strategy=all_exhausted_without_replacement", "data.batch_size=1",
                        "data.sequence_length=32", "data.shuffle_buffer_size=8", "data.block_shuffle_size=4",
                        "data.eval_holdout=0",
                        "data.trace_documents=true"])


def loaders(root, tokenizer, family, processes, workers):
    config = config_for(root, family, workers)
    return [build_train_loader(config, tokenizer, functools.partial(make_collator, config, tokenizer), r, processes)
            for r in range(processes)]


def step(lds, its, steps: int, trace: list, first: int, batches: list | None = None) -> None:
    """``steps`` optimizer steps of every rank (``GLOBAL`` sequences in all); trace rows ``(step, entry)``."""
    accumulation = GLOBAL // len(lds)
    for s in range(first, first + steps):
        for ld, it in zip(lds, its):
            for _ in range(accumulation):
                batch = next(it)
                if batches is not None:
                    batches.append(batch["input_ids"].tolist())
            trace.extend((s, tuple(d)) for d in ld.take_documents())


def hand_over(states, root, family, tokenizer, before, after):
    """The loaders of layout ``after`` started from the ``before`` layout's rank ``states``."""
    old = config_for(root, family, before[1])
    settings = reader_settings(old, *before)
    new = loaders(root, tokenizer, family, *after)
    for rank, ld in enumerate(new):
        ld.load_elastic(origins(states, after[0], ld.num_workers, rank, settings), min(s["epoch"] for s in states))
    return new


def passes(trace) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for _, (source, key, epoch) in trace:
        out.setdefault(epoch, Counter())[(source, key)] += 1
    return out


@pytest.mark.parametrize(
    ("family", "before", "after", "steps"),
    [
        ("decoder", (2, 0), (1, 0), 14),
        ("decoder", (4, 0), (1, 0), 14),  # one new reader merges four remainders
        ("microbert", (1, 0), (2, 0), 14),
        ("microbert", (1, 0), (4, 0), 14),  # one remainder split over four new readers
        ("decoder", (2, 0), (4, 0), 14),
        ("microbert", (2, 2), (1, 0), 14),  # DataLoader workers (forked here)
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_every_document_of_each_pass_once_after_a_layout_change(corpus, family, before, after, steps):
    root, docs, tokenizers = corpus
    tokenizer = tokenizers[family]
    want = Counter((s, f"{document_key(t):016x}") for s in (0, 1) for t in docs[s])
    old = loaders(root, tokenizer, family, *before)
    trace: list = []
    step(old, [iter(ld) for ld in old], STOP, trace, 1)
    states = [copy.deepcopy(ld.state_dict()) for ld in old]
    stopped = passes(trace)
    assert 0 < sum(stopped[0].values()) < sum(want.values())  # the stop is inside the first pass
    assert max(r for s in states for r in s["read_epochs"].values()) >= 2  # each reader holds several passes

    new = hand_over(states, root, family, tokenizer, before, after)
    step(new, [iter(ld) for ld in new], steps - STOP, trace, STOP + 1)
    got = passes(trace)
    assert got[0] == want, (f"pass 0: {len(want - got[0])} missing, "
                            f"{sum(n - 1 for n in got[0].values() if n > 1)} duplicated")
    assert got[1] == want  # the pass after it too (all of it taken over from the old readers' shares)
    assert all(n == 1 for c in got.values() for n in c.values())  # no pass lists a document twice
    # Passes stay in order across the readers: the first is trained whole before any reader starts the third.
    assert max(s for s, (_, _, e) in trace if e == 0) < min(s for s, (_, _, e) in trace if e == 2)


def test_a_same_layout_resume_after_a_layout_change_is_exact(corpus):
    """Until the new readers leave the passes they took over, their state is anchored in those passes (the old
    readers' positions); a same-layout resume in that window re-opens them there: the same batches, bit for bit."""
    root, docs, tokenizers = corpus
    tokenizer = tokenizers["decoder"]
    old = loaders(root, tokenizer, "decoder", 2, 0)
    step(old, [iter(ld) for ld in old], STOP, [], 1)
    states = [copy.deepcopy(ld.state_dict()) for ld in old]

    straight: list = []
    new = hand_over(states, root, "decoder", tokenizer, (2, 0), (1, 0))
    its = [iter(ld) for ld in new]
    step(new, its, 3, [], STOP + 1)
    middle = copy.deepcopy(new[0].state_dict())
    assert "prelude" in middle["workers"][0]["snapshot"]["anchor"][2]  # still inside the passes taken over
    step(new, its, 4, [], STOP + 4, straight)

    resumed: list = []
    again = loaders(root, tokenizer, "decoder", 1, 0)
    again[0].load_state_dict(middle)
    step(again, [iter(ld) for ld in again], 4, [], STOP + 4, resumed)
    assert resumed == straight


@pytest.mark.parametrize("override, key", [
    ("data.sequence_length=64", "data.sequence_length"),
    ("tokenizer.vocab_size=999", "tokenizer.vocab_size"),
    ("data.sources=[{path: other.jsonl, weight: 1.0}]", "data.sources[0].path"),
    ("data.sources=[{path: a.jsonl, pinned_revision: " + "b" * 40 + "}]", "data.sources[0].pinned_revision"),
])
def test_a_resume_that_changes_the_stream_is_refused_naming_the_key(override, key):
    """A changed source, sequence length or tokenizer is one line naming the key; a source whose pin is
    left unset (it reads the checkpoint's, ``data.revisions``) and a layout change are not changes."""
    from hf_streamlm.config import ConfigError
    from hf_streamlm.train.elastic import check_same_stream

    base = ["data.sources=[{path: a.jsonl}]", "data.sequence_length=32"]
    old = load_config(base).to_dict()
    old["data"]["sources"][0]["pinned_revision"] = "a" * 40
    check_same_stream(old, load_config(base + ["data.num_workers=3", "data.batch_size=7"]))
    with pytest.raises(ConfigError) as err:
        check_same_stream(old, load_config(base + [override]))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{key} differs from the checkpoint's")


def test_the_global_batch_is_kept_by_accumulation_or_the_resume_is_refused(tmp_path, reset_accelerate):
    """One process resuming a checkpoint of 2 (``data_state_*.pt`` per rank) at batch 4 x accumulation 1:
    batch 4 becomes accumulation 2 (8 sequences per step, as before); batch 3 cannot make 8 sequences and
    is one line; a DeepSpeed checkpoint (``pytorch_model/``, ZeRO shards per rank) on another process
    count is one line naming the process counts."""
    import torch
    import yaml
    from accelerate import Accelerator

    from hf_streamlm.config import ConfigError
    from hf_streamlm.train.elastic import keep_global_batch

    base = ["data.sources=[{path: a.jsonl}]", "data.sequence_length=32", "data.gradient_accumulation_steps=1"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(load_config([*base, "data.batch_size=4"]).to_dict()))
    for rank in range(2):
        torch.save({"num_workers": 0}, tmp_path / f"data_state_{rank}.pt")
    accelerator = Accelerator(cpu=True)
    kept = load_config([*base, "data.batch_size=4"])
    keep_global_batch(kept, accelerator, tmp_path)
    assert kept.data.gradient_accumulation_steps == 2 and accelerator.gradient_accumulation_steps == 2

    with pytest.raises(ConfigError) as err:
        keep_global_batch(load_config([*base, "data.batch_size=3"]), accelerator, tmp_path)
    assert "\n" not in str(err.value) and "holds 8 sequences" in str(err.value)

    (tmp_path / "pytorch_model").mkdir()
    with pytest.raises(ConfigError) as err:
        keep_global_batch(load_config([*base, "data.batch_size=4"]), accelerator, tmp_path)
    assert "\n" not in str(err.value) and "2 DeepSpeed process(es) and this run has 1" in str(err.value)
