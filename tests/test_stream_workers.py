"""DataLoader workers at the edges (issue #13): a worker with an empty share does not stall the loader,
a rank with nothing to read is one line before training, and workers neither hang with
TOKENIZERS_PARALLELISM=true nor fail under the spawn / forkserver start methods."""

from __future__ import annotations

import functools
import itertools
import json

import pytest
import torch

from hf_streamlm.config import ConfigError, load_config
from hf_streamlm.data.pipeline import buffer_per_worker, build_train_loader
from hf_streamlm.tokenizer import train_tokenizer
from hf_streamlm.data.collate import make_collator

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def write_shards(root, empty=()):
    """Four shards of 80 documents; the shards in ``empty`` hold only whitespace (skipped, counted)."""
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(4):
        with (root / f"part-{shard}.jsonl").open("w") as f:
            for i in range(80):
                words = " ".join(WORDS[(shard + i + j) % len(WORDS)] for j in range(5 + i % 30))
                f.write(json.dumps({"text": "   " if shard in empty else f"s{shard}d{i} {words}"}) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([" ".join(WORDS)] * 20, "bpe", vocab_size=300, min_frequency=1)


def config_for(root, workers, *extra):
    return load_config([
        "recipe=quickstart_decoder", f"data.sources=[{{path: json, data_files: '{root}/part-*.jsonl'}}]",
        f"data.num_workers={workers}", "data.batch_size=4", "data.sequence_length=32", "data.shuffle_buffer_size=64",
        "data.eval_holdout=0", *extra])


def take(config, tokenizer, n, rank=0, world=1):
    loader = build_train_loader(config, tokenizer, functools.partial(make_collator, config, tokenizer), rank, world)
    return list(itertools.islice(iter(loader), n))


@pytest.mark.timeout(120)
def test_a_worker_with_an_empty_share_does_not_stall_the_loader(tmp_path, tokenizer, caplog):
    # 4 shards over 2 workers: worker 1 reads shards 1 and 3, both only whitespace.
    config = config_for(write_shards(tmp_path / "data", empty=(1, 3)), 2)
    with caplog.at_level("WARNING"):
        batches = take(config, tokenizer, 40)  # more than a pass of worker 0: it cycles on alone
    assert len(batches) == 40
    assert [m for m in caplog.messages if "worker 1 has no documents" in m]


@pytest.mark.timeout(120)
def test_a_rank_with_nothing_to_read_is_one_line_naming_the_source(tmp_path, tokenizer):
    root = write_shards(tmp_path / "data", empty=(0, 1, 2, 3))
    with pytest.raises(ConfigError, match=r"rank 0 has no documents to train on: 'json:.*part-\*\.jsonl'"):
        take(config_for(root, 2), tokenizer, 1)
    with pytest.raises(ConfigError, match=r"data.max_samples=3 is fewer than the 4 readers of 'json:"):
        take(config_for(write_shards(tmp_path / "full"), 2, "data.max_samples=3"), tokenizer, 1, rank=0, world=2)


def test_buffer_counts_per_rank_and_is_clamped_to_the_share(tmp_path, caplog):
    config = config_for(tmp_path, 2, "data.shuffle_buffer_size=65536")
    assert buffer_per_worker(config, world_size=8, workers=8) == 8192  # runpod_1b: 65,536 per rank over 8 workers
    capped = config_for(tmp_path, 2, "data.shuffle_buffer_size=65536", "data.max_samples=1000000")
    with caplog.at_level("WARNING"):
        assert buffer_per_worker(capped, world_size=8, workers=8) == 8192  # share 15,625: no clamp
        assert buffer_per_worker(capped, world_size=8, workers=2) == 32768  # share 62,500: no clamp
        assert buffer_per_worker(capped, world_size=32, workers=2) == 15625  # share of 1M over 64 readers
    assert len([m for m in caplog.messages if "clamped to 15625" in m]) == 1


@pytest.mark.timeout(90)
def test_workers_do_not_hang_when_tokenizers_parallelism_is_on(tmp_path, tokenizer, monkeypatch):
    """This process uses the tokenizer's Rust thread pool, then forks two workers with
    TOKENIZERS_PARALLELISM=true (which turns off the library's own fork guard): they must still
    tokenize (before the fix both blocked in encode_batch forever)."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setenv("RAYON_NUM_THREADS", "2")
    tokenizer.backend_tokenizer.encode_batch([" ".join(WORDS) * 20] * 200)  # the pool is up in this process
    batches = take(config_for(write_shards(tmp_path / "data"), 2), tokenizer, 6)
    assert len(batches) == 6


def test_the_stream_pickles(tmp_path, tokenizer):
    """What spawn / forkserver send to each worker: no lambdas anywhere in the datasets chain."""
    import pickle

    config = config_for(write_shards(tmp_path / "data"), 2, "data.eval_holdout=0.1", "data.min_words=2")
    loader = build_train_loader(config, tokenizer, functools.partial(make_collator, config, tokenizer))
    stream = pickle.loads(pickle.dumps(loader.stream))
    assert stream.make_pipeline(0).next_batch()["input_ids"].shape == (4, 32)


@pytest.mark.timeout(240)
def test_forkserver_workers_give_the_same_batches(tmp_path, tokenizer):
    """Workers started by forkserver (Python 3.14's Linux default; it pickles the stream as spawn does,
    see test_the_stream_pickles, but starts faster) give exactly the batches forked ones do."""
    root = write_shards(tmp_path / "data")
    forked = take(config_for(root, 2), tokenizer, 6)
    batches = take(config_for(root, 2, "data.worker_start_method=forkserver"), tokenizer, 6)
    assert len(batches) == 6 and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for a, b in zip(forked, batches) for k in a)


def test_the_in_process_stream_starts_beside_a_hub_filesystem_made_in_another_thread(tmp_path, tokenizer):
    """huggingface_hub keeps its `HfFileSystem` instances in one process-wide cache, which every `datasets`
    stream references, and fsspec keys them by the thread that made them. An instance made in another thread (an
    upload, a reader thread) is re-created under a new key by a deep copy of the stream from this thread: copied
    with the stream, the cache changed size under the copy ("dictionary changed size during iteration") at the
    first batch of a `data.num_workers=0` run. The stream now shares the cache."""
    import threading

    from huggingface_hub import HfFileSystem

    made = []
    thread = threading.Thread(target=lambda: made.append(HfFileSystem(endpoint="http://127.0.0.1:9", token=False)))
    thread.start()
    thread.join()
    try:
        assert made[0] in HfFileSystem._cache.values()
        batches = take(config_for(write_shards(tmp_path / "data"), 0), tokenizer, 3)
        assert len(batches) == 3 and made[0] in HfFileSystem._cache.values()
    finally:
        HfFileSystem.clear_instance_cache()
