"""Percentile-bootstrap intervals for macro-F1 and accuracy: over test rows, and over seeds where several exist.

What is resampled
-----------------
A result is one or more *runs* (training seeds) of one method, each evaluated on the same fixed
test rows of every task (:class:`TaskRuns`: the references of the rows and one prediction vector
per run). One bootstrap replicate draws, with replacement and from ``numpy.random.default_rng(seed)``
in this order:

1. the runs: ``S`` indices out of the ``S`` runs, one draw shared by every task (a run trained one
   model on all tasks); skipped when there is one run (no random numbers are used);
2. for each task in turn, its test rows: ``n`` indices out of its ``n`` rows, the same draw for
   every drawn run.

The metric is recomputed on the drawn rows of each drawn run (macro-F1 over the task's
``num_labels`` classes, or accuracy; a ``-1`` prediction, "no label matched", is wrong), averaged
over the drawn runs, then over the tasks with equal weight. The interval is the
``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of :data:`DEFAULT_RESAMPLES`
replicates (numpy's linear interpolation); the estimate is the same average on the rows and runs as
observed. The seed is fixed (:data:`DEFAULT_SEED`), so the same predictions give the same interval.

:func:`paired_difference` compares two methods on the same tasks and rows with the *same* draws
for both (paired over test rows and, by position, over runs: run ``i`` of each method saw the
same training data), so what the two methods share (hard rows, the data of a seed) cancels. A
difference whose interval excludes 0 is resolved at that confidence; one whose interval straddles
0 is not.

:func:`seed_interval` is the fallback where per-row predictions were not stored: a percentile
bootstrap of the mean of per-run values (seeds only). It ignores the test-row noise, so it is
narrower than a row interval would be, and with one run there is no interval at all.

With small test sets a class with few rows can be absent from a replicate; its F1 then counts 0
(the convention of the point estimate, which averages over all of the task's labels, as scikit-learn
does with ``labels=``), which widens macro-F1 intervals of imbalanced tasks. With at least 10 test rows
per label (every built-in task) a replicate misses a label with probability about e^-10; on smaller
test sets the lower end of the interval is pulled down by replicates that miss one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

METRICS = ("macro_f1", "accuracy")
DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0
_CHUNK_ELEMENTS = 1 << 22  # gathered prediction entries per block of replicates (memory bound)


@dataclass(frozen=True)
class TaskRuns:
    """One task's test rows: ``references`` ``(n,)`` and ``predictions`` ``(runs, n)``, label ids (``-1``: none)."""

    references: np.ndarray
    predictions: np.ndarray
    num_labels: int

    def __post_init__(self):
        references = np.asarray(self.references, dtype=np.int64).reshape(-1)
        predictions = np.asarray(self.predictions, dtype=np.int64)
        if predictions.ndim == 1:
            predictions = predictions[None, :]
        if predictions.ndim != 2 or predictions.shape[1] != len(references):
            raise ValueError(
                f"predictions must be (runs, {len(references)}) for {len(references)} references, "
                f"got shape {tuple(predictions.shape)}."
            )
        if len(references) == 0 or predictions.shape[0] == 0:
            raise ValueError("A task needs at least one test row and one run.")
        if int(self.num_labels) < 1 or references.min() < 0 or references.max() >= int(self.num_labels):
            raise ValueError(f"references must be label ids in [0, {self.num_labels}).")
        if predictions.min() < -1 or predictions.max() >= int(self.num_labels):
            raise ValueError(f"predictions must be label ids in [0, {self.num_labels}), or -1 for none.")
        object.__setattr__(self, "references", references)
        object.__setattr__(self, "predictions", predictions)
        object.__setattr__(self, "num_labels", int(self.num_labels))

    @property
    def rows(self) -> int:
        return len(self.references)

    @property
    def runs(self) -> int:
        return self.predictions.shape[0]

    @classmethod
    def from_records(cls, records: Sequence[Mapping]) -> "TaskRuns":
        """From one evaluation record per run (``predictions``, ``references``, ``num_labels``, as
        :meth:`~peft_talora.suite.EvalResult.metrics` writes them); all runs must share the rows."""
        if not records:
            raise ValueError("No records.")
        first = records[0]
        for record in records[1:]:
            if list(record["references"]) != list(first["references"]):
                raise ValueError("The runs were evaluated on different test rows; they cannot be paired.")
            if record["num_labels"] != first["num_labels"]:
                raise ValueError(
                    f"The runs were scored over {first['num_labels']} and {record['num_labels']} labels; records of "
                    "one task's evaluation share its label count."
                )
        return cls(first["references"], [record["predictions"] for record in records], first["num_labels"])


def has_rows(record: Optional[Mapping]) -> bool:
    """Whether an evaluation record stores its per-row predictions (records cached before they did do not)."""
    return bool(record) and all(key in record for key in ("predictions", "references", "num_labels"))


@dataclass(frozen=True)
class Interval:
    """An estimate and its percentile-bootstrap interval (fractions, not percent)."""

    estimate: float
    low: float
    high: float
    confidence: float
    resamples: int
    resampled: str  # "rows", "rows and seeds", "seeds"

    def as_dict(self) -> dict:
        return {
            "estimate": self.estimate, "low": self.low, "high": self.high, "confidence": self.confidence,
            "resamples": self.resamples, "resampled": self.resampled,
        }  # fmt: skip

    def format(self, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
        """``"33.1 [21.0, 45.2]"`` (``scale=100``: points), ``signed`` puts a ``+`` on positive values."""
        sign = "+" if signed else ""
        return (
            f"{scale * self.estimate:{sign}.{digits}f} "
            f"[{scale * self.low:{sign}.{digits}f}, {scale * self.high:{sign}.{digits}f}]"
        )

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval (the comparison with ``value`` is resolved)."""
        return value < self.low or value > self.high


# ----------------------------------------------------------------------------- metrics, vectorised
def metric_values(predictions: np.ndarray, references: np.ndarray, num_labels: int, metric: str) -> np.ndarray:
    """``metric`` over the last axis of broadcastable ``predictions``/``references`` arrays of label ids.

    Macro-F1 averages the F1 of classes ``0 .. num_labels - 1`` (a class neither true nor predicted
    scores 0); accuracy counts a ``-1`` prediction as wrong. Same values as
    :func:`peft_talora.suite.classification_metrics`.
    """
    predictions, references = np.asarray(predictions), np.asarray(references)
    if metric == "accuracy":
        return (predictions == references).mean(axis=-1)
    if metric != "macro_f1":
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}.")
    hit = predictions == references
    total = 0.0
    for c in range(num_labels):
        predicted, true = predictions == c, references == c
        tp = (hit & true).sum(axis=-1)
        denominator = predicted.sum(axis=-1) + true.sum(axis=-1)
        total = total + np.divide(2.0 * tp, denominator, out=np.zeros(np.shape(tp)), where=denominator > 0)
    return total / num_labels


# ----------------------------------------------------------------------------- the bootstrap
def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}.")


def _check_aligned(methods: Sequence[Sequence[TaskRuns]]) -> tuple[int, int]:
    tasks, runs = len(methods[0]), methods[0][0].runs if methods[0] else 0
    if tasks == 0:
        raise ValueError("No tasks.")
    for method in methods:
        if len(method) != tasks:
            raise ValueError("Every method needs the same tasks.")
        for task, reference in zip(method, methods[0]):
            if task.runs != runs:
                raise ValueError(f"Every task and method needs the same number of runs ({runs}), got {task.runs}.")
            if not np.array_equal(task.references, reference.references) or task.num_labels != reference.num_labels:
                raise ValueError("Methods compared must be evaluated on the same test rows of the same tasks.")
    return tasks, runs


def _estimate(tasks: Sequence[TaskRuns], metric: str) -> float:
    values = [metric_values(t.predictions, t.references, t.num_labels, metric).mean() for t in tasks]
    return float(np.mean(values))


def bootstrap_replicates(
    methods: Sequence[Sequence[TaskRuns]],
    metric: str = "macro_f1",
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> np.ndarray:
    """``(methods, resamples)`` replicates of each method's task-averaged ``metric``, all under the same draws.

    The draws are those of the module docstring; ``methods[m][t]`` is method ``m`` on task ``t``.
    """
    _check_metric(metric)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}.")
    n_tasks, n_runs = _check_aligned(methods)
    rng = np.random.default_rng(seed)
    run_draw = rng.integers(0, n_runs, size=(resamples, n_runs)) if n_runs > 1 else np.zeros((resamples, 1), int)
    out = np.zeros((len(methods), resamples))
    for t in range(n_tasks):
        reference = methods[0][t]
        rows = rng.integers(0, reference.rows, size=(resamples, reference.rows))
        block = max(1, _CHUNK_ELEMENTS // (run_draw.shape[1] * reference.rows))
        for start in range(0, resamples, block):
            r_rows, r_runs = rows[start : start + block], run_draw[start : start + block]
            drawn_refs = reference.references[r_rows][:, None, :]  # (b, 1, n)
            for m, method in enumerate(methods):
                drawn = method[t].predictions[r_runs[:, :, None], r_rows[:, None, :]]  # (b, runs, n)
                values = metric_values(drawn, drawn_refs, reference.num_labels, metric)  # (b, runs)
                out[m, start : start + block] += values.mean(axis=1)
    return out / n_tasks


def _interval(estimate: float, replicates: np.ndarray, confidence: float, resampled: str) -> Interval:
    low, high = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(estimate), float(low), float(high), confidence, len(replicates), resampled)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")


def _resampled(runs: int) -> str:
    return "rows and seeds" if runs > 1 else "rows"


def bootstrap_interval(
    tasks: Sequence[TaskRuns],
    metric: str = "macro_f1",
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> Interval:
    """The task-averaged ``metric`` of one method and its percentile-bootstrap interval (rows, and runs if several)."""
    _check_confidence(confidence)
    tasks = list(tasks)
    replicates = bootstrap_replicates([tasks], metric, resamples=resamples, seed=seed)[0]
    return _interval(_estimate(tasks, metric), replicates, confidence, _resampled(tasks[0].runs))


# Same keyword arguments and checks as bootstrap_interval on purpose: the two are called side by side.
def paired_difference(
    a: Sequence[TaskRuns],
    b: Sequence[TaskRuns],
    metric: str = "macro_f1",
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> Interval:
    """``a - b`` of the task-averaged ``metric``, with a paired bootstrap interval (same draws for both)."""
    _check_confidence(confidence)
    a, b = list(a), list(b)
    replicates = bootstrap_replicates([a, b], metric, resamples=resamples, seed=seed)
    estimate = _estimate(a, metric) - _estimate(b, metric)
    return _interval(estimate, replicates[0] - replicates[1], confidence, _resampled(a[0].runs))


def seed_interval(
    values: Sequence[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> Optional[Interval]:
    """The mean of per-run ``values`` with a percentile bootstrap over runs only; ``None`` for fewer than 2 runs.

    For results without per-row predictions. Paired differences: pass the per-run differences.
    """
    _check_confidence(confidence)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}.")
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    return _interval(float(values.mean()), values[draws].mean(axis=1), confidence, "seeds")


__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "METRICS",
    "Interval",
    "TaskRuns",
    "bootstrap_interval",
    "bootstrap_replicates",
    "has_rows",
    "metric_values",
    "paired_difference",
    "seed_interval",
]
