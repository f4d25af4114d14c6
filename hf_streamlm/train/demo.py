"""What a finished run prints about its export (``runtime.demo_sentences``): a masked LM's guesses for
masked words, a decoder's continuations. Both go through ``transformers.pipeline`` on the exported folder,
the way a user would call it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

MASK = re.compile(r"\[MASK(?:=([^\]]+))?\]")
"""``[MASK]`` (a word to guess) or ``[MASK=word]`` (the same, with the true word known, so the demo can
say where the model ranks it)."""


def parse_masked(sentence: str) -> tuple[str, str | None] | None:
    """``sentence`` with its mask written as ``[MASK]``, and the true word (None when not given); None when
    the sentence does not hold exactly one mask."""
    found = MASK.findall(sentence)
    if len(found) != 1:
        return None
    return MASK.sub("[MASK]", sentence), (found[0] or None)


def word_rank(fill, text: str, word: str) -> tuple[int, str] | None:
    """Rank (1 = the top guess) of ``word`` at the mask of ``text`` among the whole vocabulary, and the token
    it was looked up as; None when the word is not one token of the vocabulary (a single mask cannot hold it).
    Byte-level BPE predicts the word with its leading space (``Ġword``), WordPiece the bare word."""
    tokenizer, model = fill.tokenizer, fill.model
    # The mask takes the word's place with its leading space (RoBERTa's <mask> strips the space before it).
    pieces = tokenizer.tokenize((" " if text.split(tokenizer.mask_token)[0].strip() else "") + word)
    if len(pieces) != 1:
        return None
    target = tokenizer.convert_tokens_to_ids(pieces[0])
    inputs = tokenizer(text, return_tensors="pt", truncation=True)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    where = (inputs["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0]
    scores = logits[where]
    return int((scores > scores[target]).sum()) + 1, pieces[0]


def print_fill_mask(export_dir: Path, sentences: list[str], top_k: int = 5) -> None:
    """Top-``top_k`` predictions for masked sentences, as seed 003's MicroBERT prints them; for a sentence
    written with ``[MASK=word]``, also the true word (marked when among them) and its rank in the vocabulary."""
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(export_dir), tokenizer=str(export_dir), device="cpu")
    print("=== Testing MLM Model ===")
    for i, sentence in enumerate(sentences, 1):
        parsed = parse_masked(sentence)
        if parsed is None:  # the run is over and exported: say so, do not fail it
            print(f"{i}. skipped, needs exactly one [MASK] or [MASK=word]: {sentence!r}")
            continue
        masked, word = parsed
        text = masked.replace("[MASK]", fill.tokenizer.mask_token)
        print(f"{i}. Original: {masked}" + (f"   (true word: {word})" if word else ""))
        for pred in fill(text, top_k=top_k, tokenizer_kwargs={"truncation": True}):
            hit = "  <- true word" if word and pred["token_str"].strip() == word else ""
            print(f"     {pred['token_str']}: prob={pred['score']:.6f}{hit}")
        if word:
            ranked = word_rank(fill, text, word)
            if ranked is None:
                print(f"     true word {word!r}: not one token of the vocabulary, no rank")
            else:
                rank, token = ranked
                print(f"     true word {word!r}: rank {rank} of {len(fill.tokenizer)}")


def print_generation(export_dir: Path, prompts: list[str], max_new_tokens: int = 30) -> None:
    """Greedy continuations of a few prompts by the exported decoder."""
    from transformers import pipeline

    generate = pipeline("text-generation", model=str(export_dir), device="cpu")
    print("=== Testing the decoder ===")
    for i, prompt in enumerate(prompts, 1):
        out = generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=True)
        print(f"{i}. {out[0]['generated_text']!r}")


__all__ = ["parse_masked", "print_fill_mask", "print_generation", "word_rank"]
