"""Train a tokenizer from a text iterator, or load one, as a transformers fast tokenizer.

Kinds: ``wordpiece`` (BERT's special tokens), ``wordlevel`` (seed 003's word vocabulary),
``bpe`` (byte-level, ``<|endoftext|>`` and ``<|pad|>`` as in seed 004). The result is a
``PreTrainedTokenizerFast`` whose folder ``AutoTokenizer.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hf_streamlm.config import Config, ConfigError, TokenizerConfig

logger = logging.getLogger(__name__)

BERT_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
BPE_SPECIALS = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|pad|>"}


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "wordpiece",
    vocab_size: int = 10000,
    min_frequency: int = 2,
    lowercase: bool = True,
    length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a ``kind`` tokenizer on ``texts`` (streamed: only the counts are held in memory)."""
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = BPE_SPECIALS
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(dict.fromkeys(specials.values())),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        specials = BERT_SPECIALS
        if kind == "wordpiece":
            tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
            tok.decoder = decoders.WordPiece(prefix="##")
            trainer_cls = trainers.WordPieceTrainer
        elif kind == "wordlevel":
            tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
            trainer_cls = trainers.WordLevelTrainer
        else:
            raise ConfigError(f"'tokenizer.kind' must be one of wordpiece, wordlevel, bpe; got {kind!r}")
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainer_cls(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(specials.values()),
            show_progress=False,
        )
    tok.train_from_iterator(_batches(texts), trainer=trainer, length=length)
    if kind != "bpe":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1_000_000_000, **specials)


def load_tokenizer(cfg: TokenizerConfig) -> PreTrainedTokenizerFast | None:
    """The tokenizer named by ``cfg`` (folder, Hub name, or seed-004 files), or None to train one."""
    if cfg.path:
        if not Path(cfg.path).is_dir():
            raise ConfigError(f"'tokenizer.path' {cfg.path!r} is not a folder with a saved tokenizer")
        tok = AutoTokenizer.from_pretrained(cfg.path)
    elif cfg.name:
        tok = AutoTokenizer.from_pretrained(cfg.name)
    elif cfg.tokenizer_json:
        if not Path(cfg.tokenizer_json).is_file():
            raise ConfigError(f"'tokenizer.tokenizer_json' {cfg.tokenizer_json!r} does not exist")
        tok = PreTrainedTokenizerFast(tokenizer_file=cfg.tokenizer_json)
    elif cfg.vocab:
        bpe = Tokenizer(models.BPE.from_file(cfg.vocab, cfg.merges))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    else:
        return None
    if cfg.special_tokens:
        specials = cfg.special_tokens
        if isinstance(specials, str):
            specials = json.loads(Path(specials).read_text())
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    return tok


def build_tokenizer(config: Config, texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Load the configured tokenizer, or train one on ``texts`` (default: the training stream)."""
    cfg = config.tokenizer
    tok = load_tokenizer(cfg)
    if tok is None:
        if texts is None:
            from hf_streamlm.data import iter_texts

            texts = iter_texts(config, limit=cfg.train_samples)
        kind = cfg.kind
        logger.info("training a %s tokenizer (vocab %d) on %s documents of the stream",
                    kind, cfg.vocab_size, cfg.train_samples or "all")
        tok = train_tokenizer(texts, kind, cfg.vocab_size, cfg.min_frequency, cfg.lowercase)
    mlm = config.model.type == "microbert"
    needed = ["mask_token", "cls_token", "sep_token", "pad_token"] if mlm else ["eos_token"]
    missing = [name for name in needed if getattr(tok, name) is None]
    if missing:
        raise ConfigError(f"the tokenizer has no {', '.join(missing)}, which model.type={config.model.type} needs")
    if tok.pad_token is None:  # decoders pad only the last partial block; reuse eos as GPT-2 users do
        tok.pad_token = tok.eos_token
    return tok
