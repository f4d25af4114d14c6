"""Accuracy over the labelled positions of a masked (or causal) LM batch, -100 ignored.

An ``evaluate`` metric module shipped inside hf_streamlm and loaded by path, so it needs no network:
``evaluate.load("<site-packages>/hf_streamlm/metrics/masked_accuracy")`` or
``hf_streamlm.metrics.load("masked_accuracy")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Share of labelled tokens whose predicted id (the argmax of the logits) equals the label.

Positions whose reference is `ignore_index` (-100, the label transformers' losses ignore: tokens
MicroBERT did not mask, padding) are not counted, so whole label rows can be passed as they are.
The result is weighted by tokens over all batches added.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or `list` of `list` of `int`): predicted token ids, one per position
        or one row per sequence.
    references (same shape as `predictions`): label ids; `ignore_index` marks positions not scored.
    ignore_index (`int`, *optional*, default -100): the reference value to skip.
Returns:
    accuracy (`float`): correct / scored positions.
    tokens (`int`): positions scored.
Examples:
    >>> acc = evaluate.load("hf_streamlm/metrics/masked_accuracy")
    >>> acc.compute(predictions=[[5, 7, 9], [1, 2, 3]], references=[[5, -100, 8], [-100, 2, -100]])
    {'accuracy': 0.6666666666666666, 'tokens': 3}
"""

_CITATION = """
@inproceedings{devlin2019bert,
  title={{BERT}: Pre-training of Deep Bidirectional Transformers for Language Understanding},
  author={Devlin, Jacob and Chang, Ming-Wei and Lee, Kenton and Toutanova, Kristina},
  booktitle={NAACL-HLT}, pages={4171--4186}, year={2019}
}
"""


def _flat(rows) -> np.ndarray:
    """One int64 array from flat ids or from rows of ids (rows may differ in length)."""
    if len(rows) and isinstance(rows[0], (list, tuple, np.ndarray)):
        return np.concatenate([np.asarray(r, dtype=np.int64).ravel() for r in rows])
    return np.asarray(rows, dtype=np.int64).ravel()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MaskedAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Rows of ids first: a scalar fails it with a TypeError and falls through to flat ids,
            # whereas a row tried as a scalar may raise an error `evaluate` does not catch.
            features=[
                datasets.Features(
                    {"predictions": datasets.List(datasets.Value("int64")),
                     "references": datasets.List(datasets.Value("int64"))}
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
        )

    def _compute(self, predictions, references, ignore_index: int = -100):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} prediction rows but {len(references)} reference rows")
        predictions, references = _flat(predictions), _flat(references)
        if predictions.shape != references.shape:
            raise ValueError(f"{predictions.size} predictions but {references.size} references")
        scored = references != ignore_index
        tokens = int(scored.sum())
        if tokens == 0:
            raise ValueError(f"no positions to score: every reference is {ignore_index}")
        correct = int((predictions[scored] == references[scored]).sum())
        return {"accuracy": correct / tokens, "tokens": tokens}
