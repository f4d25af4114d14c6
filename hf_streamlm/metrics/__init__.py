"""Evaluation metrics as ``evaluate`` modules shipped inside the package.

Each metric is a folder holding a script of the same name (``evaluate``'s module layout), loaded by
path: nothing is fetched from the Hub, so they work offline, and anyone can load them with
``evaluate.load`` directly::

    from hf_streamlm import metrics

    ppl = metrics.load("perplexity")          # = evaluate.load(str(metrics.path("perplexity")))
    ppl.add_batch(losses=[12.0], token_counts=[6])
    ppl.compute()                             # {'loss': 2.0, 'perplexity': 7.389..., 'tokens': 6}

- ``perplexity``: token-weighted mean loss and its exp, from per-token losses or per-batch
  (loss sum, token count) pairs.
- ``masked_accuracy``: accuracy over labelled positions, labels of -100 ignored.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRICS = ("perplexity", "masked_accuracy")


def path(name: str) -> Path:
    """The folder of metric ``name``, for ``evaluate.load(str(path(name)))``."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; hf_streamlm ships {', '.join(METRICS)}")
    return METRICS_DIR / name


def load(name: str, **kwargs):
    """``evaluate.load`` of the shipped metric ``name`` (keyword arguments go to ``evaluate.load``,
    e.g. ``keep_in_memory=True`` to keep the added batches off the disk)."""
    import evaluate

    return evaluate.load(str(path(name)), **kwargs)


__all__ = ["METRICS", "METRICS_DIR", "load", "path"]
