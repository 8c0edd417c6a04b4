"""Accuracy as a local ``evaluate`` metric (no Hub): ``evaluate.load("<path>/accuracy.py")``.

Self-contained on purpose: ``evaluate`` copies this file alone into its module cache.
"""

# The header repeats the other metric file's on purpose: each file must stand alone (see the docstring).
import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their references (optionally weighted)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): return the fraction (default) or the count of correct predictions.
    sample_weight (list of float): per-example weights (default: all 1).
    ignore_index (int): references equal to this value are skipped (e.g. -100 for padded tokens); default None.
Returns:
    accuracy (float)
Example:
    >>> metric = evaluate.load("peft_talora/metrics/accuracy.py")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None, ignore_index=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if len(weights) != len(references):
            raise ValueError(f"sample_weight has {len(weights)} entries for {len(references)} references.")
        if ignore_index is not None:
            keep = references != ignore_index
            predictions, references, weights = predictions[keep], references[keep], weights[keep]
        correct = float(np.sum(weights * (predictions == references)))
        if not normalize:
            return {"accuracy": correct}
        total = float(np.sum(weights))
        return {"accuracy": correct / total if total else 0.0}
