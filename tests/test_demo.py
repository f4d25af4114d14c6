"""The end-of-run demo (hf_streamlm/train/demo.py) on real exports of tiny runs: a true word's rank agrees with
the stock fill-mask pipeline's own ordering, for WordPiece and for byte-level BPE (whose words carry their
leading space, ``Ġword``)."""

from __future__ import annotations

import pytest

from hf_streamlm.train.demo import parse_masked, print_fill_mask, word_rank


def test_parse_masked_reads_the_true_word():
    assert parse_masked("a [MASK=file] is reached.") == ("a [MASK] is reached.", "file")
    assert parse_masked("a [MASK] is reached.") == ("a [MASK] is reached.", None)
    assert parse_masked("no mask here") is None
    assert parse_masked("[MASK] and [MASK=two]") is None


@pytest.mark.parametrize("run", ["mlm_run", "mlm_bpe_run"])
def test_rank_of_the_true_word_is_the_pipelines_order(run, request, capsys):
    from transformers import pipeline

    export = request.getfixturevalue(run) / "export"
    fill = pipeline("fill-mask", model=str(export), device="cpu")
    text = f"return a copy of the {fill.tokenizer.mask_token} with trailing characters removed."
    # Whole words to rank: a BPE guess without its leading space ("fin") or a WordPiece "##" piece is the middle
    # of a word, which a user would not write as the true word.
    guesses = [g for g in fill(text, top_k=20) if g["token_str"].strip().isalpha()
               and fill.tokenizer.tokenize(" " + g["token_str"].strip()) == [fill.tokenizer.convert_ids_to_tokens(g["token"])]]
    assert len(guesses) >= 2, guesses
    top = fill(text, top_k=50)
    for guess in guesses[:3]:
        word = guess["token_str"].strip()
        rank, token = word_rank(fill, text, word)
        assert token == fill.tokenizer.convert_ids_to_tokens(guess["token"])
        # 1 + the number of tokens the pipeline put before it (ties aside, which random logits do not have)
        assert rank == 1 + [g["token"] for g in top].index(guess["token"]), word

    word = guesses[0]["token_str"].strip()
    rank, _ = word_rank(fill, text, word)
    print_fill_mask(export, [text.replace(fill.tokenizer.mask_token, f"[MASK={word}]"), "two [MASK] in [MASK] one"])
    out = capsys.readouterr().out
    assert f"(true word: {word})" in out and f"true word {word!r}: rank {rank} of {len(fill.tokenizer)}" in out
    assert ("<- true word" in out) == (rank <= 5)  # marked among the 5 printed guesses when it is one of them
    assert "2. skipped, needs exactly one [MASK] or [MASK=word]" in out
