"""Train a tokenizer from a text iterator, or load one, as a transformers fast tokenizer.

Kinds: ``wordpiece`` (BERT's special tokens), ``wordlevel`` (seed 003's word vocabulary),
``bpe`` (byte-level, ``<|endoftext|>`` and ``<|pad|>`` as in seed 004 for a decoder; RoBERTa's
``<s> <pad> </s> <mask>`` and ``<s> X </s>`` template for a masked LM). The result is a
``PreTrainedTokenizerFast`` whose folder ``AutoTokenizer.from_pretrained`` loads.

Training streams: only the word counts are held in memory (they grow with the distinct words, not
with the number of documents), and the same documents give byte-identical files in every process
(see :func:`train_tokenizer` for what that takes with WordPiece).

Documents: ``tokenizer.train_samples`` and ``data.max_samples`` both cap the documents a tokenizer
is trained on; when both are set the smaller one wins (:func:`tokenizer_doc_limit`), and the documents
are part of the capped pass training reads on any layout (the first few of each of its shards,
:func:`hf_streamlm.data.pipeline.iter_rows`), so the tokenizer never sees documents the model will not
be trained on.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import string
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
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
BPE_SPECIALS = {
    "eos_token": "<|endoftext|>",
    "bos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|pad|>",
}

ROBERTA_SPECIALS = {
    "bos_token": "<s>",
    "cls_token": "<s>",
    "pad_token": "<pad>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "mask_token": "<mask>",
}
"""Byte-level BPE for a masked LM, as RoBERTa has it (ids 0-3 in this order): ``<s>`` opens and ``</s>``
closes each document. No ``<unk>``: byte-level BPE spells every text with its 256 byte tokens."""

KNOWN_ROLES: dict[str, tuple[str, ...]] = {
    "<|endoftext|>": ("eos_token", "bos_token", "unk_token"),
    "<|pad|>": ("pad_token",),
    "[PAD]": ("pad_token",),
    "[UNK]": ("unk_token",),
    "[CLS]": ("cls_token",),
    "[SEP]": ("sep_token",),
    "[MASK]": ("mask_token",),
    "<s>": ("bos_token",),
    "</s>": ("eos_token",),
    "<pad>": ("pad_token",),
    "<unk>": ("unk_token",),
    "<mask>": ("mask_token",),
}
"""Roles of well-known special-token strings, given to tokenizers loaded from bare files (seed 004's
``tokenizer_json`` or ``vocab``/``merges`` plus ``special_tokens``) that carry no roles themselves."""

BATCH = 1000
"""Documents per list handed to the Rust trainer (one GIL round trip per batch, not per document)."""
READ_AHEAD = 8
"""Batches the stream-reading thread may be ahead of the trainer (bounds the documents in memory)."""

WORDPIECE_PREFIX = "##"
LOOKAHEAD_DOCS = 10_000
LOOKAHEAD_CHARS = 20_000_000
"""WordPiece: the first documents (at most this many, or this many characters) are read before training
starts, to register the continuation tokens (``##x``) of their characters up front (see _wordpiece_trainer)."""


def tokenizer_doc_limit(config: Config) -> int | None:
    """Documents the tokenizer is trained on: the smaller of ``tokenizer.train_samples`` and
    ``data.max_samples`` (either may be null: no cap from it)."""
    caps = [n for n in (config.tokenizer.train_samples, config.data.max_samples) if n is not None]
    return min(caps) if caps else None


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    """``texts`` as lists of ``BATCH`` documents."""
    it = iter(texts)
    while batch := list(itertools.islice(it, BATCH)):
        yield batch


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _read_ahead(batches: Iterable[list[str]], depth: int = READ_AHEAD) -> Iterator[list[str]]:
    """``batches``, read by a background thread at most ``depth`` batches ahead.

    The Rust trainer pulls its input (under the GIL) from whichever of its workers runs out, and the
    others soon wait for that one: read in that thread, the stream (Python: ``datasets``, filters) and
    the counting (Rust) took turns. Read here by a thread of its own, the stream is read while the
    trainer's workers count. Errors reach the trainer's call as they were raised.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Failure(err))

    thread = threading.Thread(target=produce, name="tokenizer-stream-reader", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()


class _Counted:
    """Iterate ``texts``, counting them."""

    def __init__(self, texts: Iterable[str]):
        self.texts = texts
        self.n = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.n += 1
            yield text


def _blank(kind: str, lowercase: bool, mlm: bool = False) -> tuple[Tokenizer, dict[str, str]]:
    """The untrained tokenizer of ``kind`` (model, normalizer, pre-tokenizer, decoder) and its specials
    (``mlm``: a masked LM's, which only changes byte-level BPE's: RoBERTa's instead of GPT-2's)."""
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok, ROBERTA_SPECIALS if mlm else BPE_SPECIALS
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=WORDPIECE_PREFIX))
        tok.decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX)
    elif kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    else:
        raise ConfigError(f"'tokenizer.kind' must be one of wordpiece, wordlevel, bpe; got {kind!r}")
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok, BERT_SPECIALS


def _special(token: str) -> AddedToken:
    """A special token as the trainer should add it. ``<mask>`` takes the space before it, as RoBERTa's does:
    in "a <mask> b" the model then fills in the word with its leading space ("Ġword"), the token it was
    trained to predict there, instead of seeing a stray "Ġ" before the mask."""
    return AddedToken(token, lstrip=token == "<mask>", rstrip=False, normalized=False, special=True)


def _continuation_chars(chars: Iterable[str], tok: Tokenizer) -> list[str]:
    """The characters that can stand after another inside a word once ``chars`` are normalized and
    pre-tokenized (a superset of those that do): each is probed inside a word."""
    found: set[str] = set()
    for c in chars:
        for probe in ("a" + c, "a" + c + "a"):
            text = tok.normalizer.normalize_str(probe) if tok.normalizer else probe
            for word, _ in tok.pre_tokenizer.pre_tokenize_str(text):
                found.update(word[1:])
    return sorted(found)


def _wordpiece_trainer(texts: Iterable[str], tok: Tokenizer, vocab_size: int, min_frequency: int):
    """The WordPiece trainer, with the ``##x`` tokens of likely characters registered up front.

    ``tokenizers``' WordPiece trainer numbers the ``##x`` tokens in the iteration order of a hash map
    seeded per process (and per map), then breaks ties between equally frequent merges by token id: the
    same documents gave a different vocabulary (ids, and at the size limit tokens) on every run.
    Registered up front, in sorted order, those ids are fixed: the ``##x`` of ASCII letters and digits
    and of every character of the first documents (``LOOKAHEAD_DOCS``, read before training starts).
    Characters first seen later get their ``##x`` ids sorted afterwards (:func:`_finish_wordpiece`);
    only ties between merges that differ in such a late character remain run-dependent.
    """
    it = iter(texts)
    head: list[str] = []
    chars = 0
    for text in it:
        head.append(text)
        chars += len(text)
        if len(head) >= LOOKAHEAD_DOCS or chars >= LOOKAHEAD_CHARS:
            break
    seen = set("".join(head)) | set(string.ascii_letters + string.digits)
    registered = [WORDPIECE_PREFIX + c for c in _continuation_chars(seen, tok)]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BERT_SPECIALS.values()) + registered,
        continuing_subword_prefix=WORDPIECE_PREFIX,
        show_progress=False,
    )
    return trainer, itertools.chain(head, it), set(registered)


def _finish_wordpiece(tok: Tokenizer, registered: set[str]) -> Tokenizer:
    """Registered ``##x`` tokens back to ordinary vocabulary (those of characters the documents never
    had are dropped), late ``##x`` tokens in sorted order, ids renumbered without gaps."""
    data = json.loads(tok.to_str())
    specials = set(BERT_SPECIALS.values())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in specials]
    vocab: dict[str, int] = data["model"]["vocab"]
    cut = len(WORDPIECE_PREFIX)
    for token in registered:
        if token[cut:] not in vocab:  # never seen: no merge used it
            del vocab[token]
    late = [t for t in vocab if len(t) == cut + 1 and t.startswith(WORDPIECE_PREFIX) and t not in registered]
    # Numbered consecutively after the alphabet; WordPiece keeps no merges that could refer to ids.
    for token, i in zip(sorted(late), sorted(vocab[t] for t in late)):
        vocab[token] = i
    data["model"]["vocab"] = {t: i for i, t in enumerate(sorted(vocab, key=vocab.__getitem__))}
    return Tokenizer.from_str(json.dumps(data))


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "wordpiece",
    vocab_size: int = 10000,
    min_frequency: int = 2,
    lowercase: bool = True,
    *,
    mlm: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a ``kind`` tokenizer on ``texts`` (streamed: only the counts are held in memory).

    The result depends on the documents and the settings, not on the process: the same documents in
    the same order give byte-identical saved files (for WordPiece, see :func:`_wordpiece_trainer`).
    ``texts`` is read by a background thread while the trainer counts (:func:`_read_ahead`).
    Progress is shown by whoever iterates ``texts``. ``mlm``: for a masked LM (byte-level BPE then
    gets RoBERTa's special tokens and ``<s> X </s>`` template; the other kinds have BERT's either way).
    """
    tok, specials = _blank(kind, lowercase, mlm)
    registered: set[str] = set()
    if kind == "bpe":
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[_special(t) for t in dict.fromkeys(specials.values())],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "wordpiece":
        trainer, texts, registered = _wordpiece_trainer(texts, tok, vocab_size, min_frequency)
    else:
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(specials.values()),
            show_progress=False,
        )
    tok.train_from_iterator(_read_ahead(_batches(texts)), trainer=trainer)
    if kind == "wordpiece":
        tok = _finish_wordpiece(tok, registered)
    roberta = kind == "bpe" and mlm
    if roberta:
        # RoBERTa's post-processor: <s> A </s> (pairs: <s> A </s></s> B </s>), offsets trimmed of the byte-level space.
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), add_prefix_space=False
        )
    elif kind != "bpe":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    # clean_up_tokenization_spaces=False, written to tokenizer_config.json: transformers' "clean up"
    # removes spaces before punctuation, which would break decode(encode(x)) == x for byte-level BPE.
    extra = {} if kind == "bpe" and not mlm else {"model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=1_000_000_000, clean_up_tokenization_spaces=False, **extra, **specials
    )


def _assign_roles(tok: PreTrainedTokenizerFast, tokens: Iterable[str]) -> None:
    """Give well-known special tokens (``<|endoftext|>``, ``[MASK]`` ...) their roles where unset."""
    for token in tokens:
        for role in KNOWN_ROLES.get(token, ()):
            if getattr(tok, role) is None:
                setattr(tok, role, token)


def _special_tokens(value: str | list[str]) -> list[str]:
    if isinstance(value, list):
        return [str(t) for t in value]
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"'tokenizer.special_tokens' {value!r} is neither a list nor a JSON file of a list")
    try:
        tokens = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"'tokenizer.special_tokens' {value!r} is not valid JSON: {err}") from err
    if isinstance(tokens, dict):  # special_tokens_map.json style: {"eos_token": "<|endoftext|>", ...}
        tokens = list(tokens.values())
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ConfigError(f"'tokenizer.special_tokens' {value!r} must hold a JSON list of strings")
    return tokens


def load_tokenizer(cfg: TokenizerConfig) -> PreTrainedTokenizerFast | None:
    """The tokenizer named by ``cfg`` (folder, Hub name, or seed-004 files), or None to train one."""
    bare = False  # loaded from files that carry no special-token roles
    if cfg.path:
        if not Path(cfg.path).is_dir():
            raise ConfigError(f"'tokenizer.path' {cfg.path!r} is not a folder with a saved tokenizer")
        tok = AutoTokenizer.from_pretrained(cfg.path)
    elif cfg.name:
        try:
            tok = AutoTokenizer.from_pretrained(cfg.name)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"'tokenizer.name' {cfg.name!r} could not be loaded: {first}") from err
    elif cfg.tokenizer_json:
        if not Path(cfg.tokenizer_json).is_file():
            raise ConfigError(f"'tokenizer.tokenizer_json' {cfg.tokenizer_json!r} does not exist")
        tok = PreTrainedTokenizerFast(tokenizer_file=cfg.tokenizer_json, clean_up_tokenization_spaces=False)
        bare = True
    elif cfg.vocab:
        for key in ("vocab", "merges"):
            if not Path(getattr(cfg, key) or "").is_file():
                raise ConfigError(f"'tokenizer.{key}' {getattr(cfg, key)!r} does not exist")
        bpe = Tokenizer(models.BPE.from_file(cfg.vocab, cfg.merges))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False)
        bare = True
    else:
        return None
    if cfg.special_tokens:
        specials = _special_tokens(cfg.special_tokens)
        tok.add_special_tokens({"additional_special_tokens": specials})
        _assign_roles(tok, specials)
    if bare:
        _assign_roles(tok, [t.content for _, t in sorted(tok.added_tokens_decoder.items()) if t.special])
    return tok


def build_tokenizer(config: Config, texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Load the configured tokenizer, or train one on ``texts`` (default: the training stream, with
    the same sources, mixture, filters and cap as training, unshuffled: :func:`hf_streamlm.data.iter_texts`).
    At most :func:`tokenizer_doc_limit` documents are used, from the stream or from ``texts``."""
    cfg = config.tokenizer
    tok = load_tokenizer(cfg)
    if tok is None:
        limit = tokenizer_doc_limit(config)
        if texts is None:
            from hf_streamlm.data import iter_texts

            texts = iter_texts(config, limit=limit)
        elif limit is not None:
            texts = itertools.islice(texts, limit)
        start, counted = time.perf_counter(), _Counted(texts)
        tok = train_tokenizer(counted, cfg.kind, cfg.vocab_size, cfg.min_frequency, cfg.lowercase,
                              mlm=config.model.type == "microbert")
        logger.info("trained a %s tokenizer of %d tokens on %d documents (cap: %s) in %.1f s",
                    cfg.kind, len(tok), counted.n, limit or "none", time.perf_counter() - start)
    mlm = config.model.type == "microbert"
    needed = ["mask_token", "cls_token", "sep_token", "pad_token"] if mlm else ["eos_token"]
    missing = [name for name in needed if getattr(tok, name) is None]
    if missing:
        raise ConfigError(f"the tokenizer has no {', '.join(missing)}, which model.type={config.model.type} needs")
    if tok.pad_token is None:  # decoders pad only the last partial block; reuse eos as GPT-2 users do
        tok.pad_token = tok.eos_token
    return tok
