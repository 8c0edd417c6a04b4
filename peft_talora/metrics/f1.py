"""F1 score as a local ``evaluate`` metric (no Hub): ``evaluate.load("<path>/f1.py")``.

Follows scikit-learn's ``f1_score`` for single-label classification: ``average`` is
``"binary"`` (default, class ``pos_label``), ``"macro"``, ``"micro"``, ``"weighted"`` or ``None``
(one score per label). A class with no predicted and no true examples scores 0, as in sklearn.
Self-contained on purpose: ``evaluate`` copies this file alone into its module cache.
"""

# The header repeats the other metric file's on purpose: each file must stand alone (see the docstring).
import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1: the harmonic mean of precision and recall, per class and averaged."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    labels (list of int): the classes to score (default: every class seen in predictions or references).
    pos_label (int): the positive class for average="binary" (default 1).
    average (str or None): "binary" (default), "macro", "micro", "weighted", or None for per-class scores.
    sample_weight (list of float): per-example weights.
Returns:
    f1 (float, or a list of floats when average is None)
Example:
    >>> metric = evaluate.load("peft_talora/metrics/f1.py")
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2], average="macro")
    {'f1': 0.7777777777777777}
"""

_AVERAGES = ("binary", "macro", "micro", "weighted", None)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        if average not in _AVERAGES:
            raise ValueError(f"average must be one of {list(_AVERAGES)}, got {average!r}.")
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        if weights.shape != references.shape:
            raise ValueError(
                f"sample_weight has {weights.size} values for {references.size} examples; give one weight per example."
            )
        present = np.union1d(predictions, references)
        if average == "binary":
            if len(present) > 2:
                raise ValueError(
                    f"average='binary' needs at most 2 classes, found {len(present)}: {present.tolist()}; "
                    "use average='macro', 'micro' or 'weighted'."
                )
            if len(present) == 2 and pos_label not in present:
                raise ValueError(
                    f"pos_label={pos_label!r} is not one of the classes {present.tolist()}; pass the positive class "
                    "as pos_label=..."
                )
            classes = np.asarray([pos_label])
        else:
            classes = np.asarray(labels) if labels is not None else present
        hit = predictions == references
        tp = np.array([np.sum(weights * (hit & (references == c))) for c in classes], dtype=float)
        pred = np.array([np.sum(weights * (predictions == c)) for c in classes], dtype=float)
        true = np.array([np.sum(weights * (references == c)) for c in classes], dtype=float)
        if average == "micro":
            denominator = pred.sum() + true.sum()
            return {"f1": float(2 * tp.sum() / denominator) if denominator else 0.0}
        denominator = pred + true
        scores = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        if average is None:
            return {"f1": scores.tolist()}
        if average == "weighted":
            return {"f1": float(np.sum(scores * true) / true.sum()) if true.sum() else 0.0}
        return {"f1": float(scores.mean())}
