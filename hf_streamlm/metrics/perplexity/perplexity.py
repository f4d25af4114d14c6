"""Perplexity from a language model's token losses, exact over any number of batches.

An ``evaluate`` metric module shipped inside hf_streamlm and loaded by path, so it needs no network:
``evaluate.load("<site-packages>/hf_streamlm/metrics/perplexity")`` or ``hf_streamlm.metrics.load("perplexity")``.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """
Perplexity of a language model on held-out text: exp of the mean cross-entropy per predicted token.

The mean is weighted by tokens, not by batches: each row added is a loss summed over `token_counts`
tokens (one token when `token_counts` is left out), and the result is sum(losses) / sum(token_counts).
Batches of different sizes (a causal LM's padding, MicroBERT's random 15% of masked positions)
therefore give the same figure as scoring every token at once. The sum is exact (math.fsum), so
the order and grouping of the batches does not change the result.
"""

_KWARGS_DESCRIPTION = """
Args:
    losses (`list` of `float`): per-token losses (natural log), or per-batch loss sums when
        `token_counts` is given.
    token_counts (`list` of `int`, *optional*): how many tokens each entry of `losses` sums;
        one each when omitted.
Returns:
    loss (`float`): mean loss per token.
    perplexity (`float`): exp(loss); `inf` when that overflows a float.
    tokens (`int`): tokens scored.
Examples:
    >>> ppl = evaluate.load("hf_streamlm/metrics/perplexity")
    >>> ppl.add_batch(losses=[2.0, 1.0, 3.0])                        # three per-token losses
    >>> ppl.add_batch(losses=[12.0], token_counts=[6])               # a batch: 6 tokens, loss sum 12
    >>> ppl.compute()
    {'loss': 2.0, 'perplexity': 7.38905609893065, 'tokens': 9}
"""

_CITATION = """
@article{jelinek1977perplexity,
  title={Perplexity -- a measure of the difficulty of speech recognition tasks},
  author={Jelinek, Fred and Mercer, Robert L. and Bahl, Lalit R. and Baker, James K.},
  journal={The Journal of the Acoustical Society of America},
  volume={62}, number={S1}, pages={S63}, year={1977}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"losses": datasets.Value("float64"), "token_counts": datasets.Value("int64")}
            ),
        )

    # `evaluate` asks for every feature in every call; per-token losses need no counts, so they
    # default to one token per entry here. (The docstrings are required: `evaluate` appends the
    # inputs description to them.)
    def add_batch(self, *, losses=None, token_counts=None, **kwargs):
        """Add a batch of per-token losses, or of loss sums with their `token_counts`."""
        if token_counts is None and losses is not None:
            token_counts = [1] * len(losses)
        super().add_batch(losses=losses, token_counts=token_counts, **kwargs)

    def add(self, *, losses=None, token_counts=None, **kwargs):
        """Add one per-token loss, or one loss sum with its `token_counts`."""
        if token_counts is None and losses is not None:
            token_counts = 1
        super().add(losses=losses, token_counts=token_counts, **kwargs)

    def _compute(self, losses, token_counts):
        if any(n < 0 for n in token_counts):
            raise ValueError("token_counts must be >= 0")
        tokens = int(sum(token_counts))
        if tokens == 0:
            raise ValueError("no tokens to score: token_counts sum to 0")
        loss = math.fsum(losses) / tokens
        try:
            perplexity = math.exp(loss)
        except OverflowError:
            perplexity = math.inf
        return {"loss": loss, "perplexity": perplexity, "tokens": tokens}
