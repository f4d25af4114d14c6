"""The streaming data pipeline: sources -> mixture -> shuffle -> tokenize -> pack -> collate."""

from hf_streamlm.data.collate import CausalCollator, MLMCollator
from hf_streamlm.data.pipeline import build_eval_blocks, build_train_blocks, iter_texts

__all__ = ["CausalCollator", "MLMCollator", "build_eval_blocks", "build_train_blocks", "iter_texts"]
