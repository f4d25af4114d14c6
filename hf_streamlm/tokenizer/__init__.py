"""Tokenizers: trained from the same stream as the model, or loaded (folder, Hub name, seed-004 files)."""

from hf_streamlm.tokenizer.train import build_tokenizer, load_tokenizer, train_tokenizer

__all__ = ["build_tokenizer", "load_tokenizer", "train_tokenizer"]
