"""The package's own ``evaluate`` metrics load by path with the Hub and the network unreachable; the bootstrap
intervals of ``peft_talora.suite.intervals`` agree with exact binomial quantiles and with a plain-loop bootstrap."""

import socket
from math import comb

import evaluate
import huggingface_hub.constants
import numpy as np
import pytest

from peft_talora.metrics import load_metric, metric_path
from peft_talora.suite.intervals import (
    TaskRuns,
    bootstrap_interval,
    bootstrap_replicates,
    metric_values,
    paired_difference,
    seed_interval,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 (also in the constants read at import time) and no socket may connect."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_accuracy_loads_offline_and_computes():
    accuracy = load_metric("accuracy")
    assert isinstance(accuracy, evaluate.Metric) and accuracy.name == "accuracy"
    assert accuracy.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 1]) == {"accuracy": 0.5}
    assert accuracy.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 1], normalize=False) == {"accuracy": 2.0}
    weighted = accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0], sample_weight=[1, 1, 2])
    assert weighted["accuracy"] == pytest.approx(0.5)
    masked = accuracy.compute(predictions=[5, 7, 9], references=[5, -100, 8], ignore_index=-100)
    assert masked == {"accuracy": 0.5}
    # incremental use, as in an evaluation loop
    accuracy.add_batch(predictions=[1, 1], references=[1, 0])
    accuracy.add_batch(predictions=[2], references=[2])
    assert accuracy.compute()["accuracy"] == pytest.approx(2 / 3)
    assert evaluate.load(metric_path("accuracy")).compute(predictions=[3], references=[3]) == {"accuracy": 1.0}


def test_f1_averages_match_hand_computed_values():
    f1 = load_metric("f1")
    predictions, references = [0, 1, 2, 2, 0, 1], [0, 1, 1, 2, 2, 1]
    # class 0: tp 1, pred 2, true 1 -> 2/3; class 1: tp 2, pred 2, true 3 -> 4/5; class 2: tp 1, pred 2, true 2 -> 1/2
    per_class = [2 / 3, 4 / 5, 1 / 2]
    assert f1.compute(predictions=predictions, references=references, average=None)["f1"] == pytest.approx(per_class)
    macro = f1.compute(predictions=predictions, references=references, average="macro")["f1"]
    assert macro == pytest.approx(sum(per_class) / 3)
    assert f1.compute(predictions=predictions, references=references, average="micro")["f1"] == pytest.approx(4 / 6)
    weighted = (1 * 2 / 3 + 3 * 4 / 5 + 2 * 1 / 2) / 6
    assert f1.compute(predictions=predictions, references=references, average="weighted")["f1"] == pytest.approx(
        weighted
    )
    # binary: positive class 1 -> tp 1, pred 2, true 1
    assert f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])["f1"] == pytest.approx(2 / 3)
    assert f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0], pos_label=0)["f1"] == pytest.approx(0.8)
    # a label that never occurs scores 0 and drags the macro average down
    assert f1.compute(predictions=[0, 1], references=[0, 1], average="macro", labels=[0, 1, 2])["f1"] == pytest.approx(
        2 / 3
    )


def test_metric_errors():
    with pytest.raises(ValueError, match=r"average='binary' needs at most 2 classes, found 3"):
        load_metric("f1").compute(predictions=[0, 1, 2], references=[0, 1, 1])
    with pytest.raises(ValueError, match=r"average must be one of"):
        load_metric("f1").compute(predictions=[0], references=[0], average="samples")
    with pytest.raises(ValueError, match=r"sample_weight has 2 values for 3 examples"):
        load_metric("f1").compute(predictions=[0, 1, 1], references=[0, 1, 0], sample_weight=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"pos_label=1 is not one of the classes \[0, 2\]"):
        load_metric("f1").compute(predictions=[0, 2], references=[2, 0])  # sklearn refuses it too
    with pytest.raises(ValueError, match=r"Unknown metric 'bleu'; the package ships \['accuracy', 'f1'\]"):
        load_metric("bleu")


# ----------------------------------------------------------------------------- bootstrap intervals
def binomial_quantiles(n: int, p: float, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (1-c)/2 and (1+c)/2 quantiles of Binomial(n, p) / n, from the CDF summed by hand."""
    cdf, total = [], 0.0
    for j in range(n + 1):
        total += comb(n, j) * p**j * (1 - p) ** (n - j)
        cdf.append(total)
    low = next(j for j in range(n + 1) if cdf[j] >= (1 - confidence) / 2)
    high = next(j for j in range(n + 1) if cdf[j] >= (1 + confidence) / 2)
    return low / n, high / n


def test_vectorised_metrics_equal_the_metric_modules():
    rng = np.random.default_rng(3)
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")
    references = rng.integers(0, 4, size=(6, 25))
    references[0] = np.where(references[0] == 3, 0, references[0])  # a class absent from the references
    predictions = rng.integers(-1, 4, size=(6, 25))  # -1: generation matched no label
    predictions[1] = 2  # a constant predictor
    for metric in ("macro_f1", "accuracy"):
        batched = metric_values(predictions, references, 4, metric)
        for i in range(6):
            args = dict(predictions=predictions[i].tolist(), references=references[i].tolist())
            expected = (
                f1.compute(**args, labels=[0, 1, 2, 3], average="macro")["f1"]
                if metric == "macro_f1"
                else accuracy.compute(**args)["accuracy"]
            )
            assert batched[i] == pytest.approx(expected, abs=1e-12), (metric, i)


def test_accuracy_interval_of_one_run_is_the_exact_binomial_interval():
    # Resampling rows of a 0/1 "correct" vector with k ones out of n is Binomial(n, k/n)/n exactly;
    # with many resamples the percentile interval is the binomial quantiles (the CDF is far from 2.5%/97.5%
    # at the neighbouring atoms for these n, k, so the empirical quantiles land on the exact atoms).
    n, k = 40, 26
    references = np.zeros(n, dtype=int)
    predictions = np.where(np.arange(n) < k, 0, 1)
    interval = bootstrap_interval([TaskRuns(references, predictions, 2)], "accuracy", resamples=100_000)
    assert interval.estimate == k / n and interval.resampled == "rows"
    assert (interval.low, interval.high) == binomial_quantiles(n, k / n) == (20 / 40, 32 / 40)
    # a perfect classifier has a degenerate interval
    perfect = bootstrap_interval([TaskRuns(references, references, 2)], "macro_f1")
    assert (perfect.low, perfect.estimate, perfect.high) == (0.5, 0.5, 0.5)  # one class present of two: F1 0 + 1


def test_paired_difference_is_exact_where_the_methods_differ_on_a_few_rows():
    # A and B agree on every row except 6 that A gets right and B wrong: the paired difference of accuracies
    # is Binomial(40, 6/40)/40 exactly, far narrower than the two unpaired intervals would suggest.
    n, j = 40, 6
    rng = np.random.default_rng(0)
    references = rng.integers(0, 3, n)
    b = np.where(rng.random(n) < 0.5, references, (references + 1) % 3)
    wrong = np.flatnonzero(b != references)[:j]
    a = b.copy()
    a[wrong] = references[wrong]
    task_a, task_b = TaskRuns(references, a, 3), TaskRuns(references, b, 3)
    diff = paired_difference([task_a], [task_b], "accuracy", resamples=100_000)
    assert diff.estimate == pytest.approx(j / n)
    assert (diff.low, diff.high) == pytest.approx(binomial_quantiles(n, j / n))
    unpaired = [bootstrap_interval([t], "accuracy") for t in (task_a, task_b)]
    assert diff.high - diff.low < min(u.high - u.low for u in unpaired)
    same = paired_difference([task_a], [task_a], "macro_f1")
    assert (same.low, same.estimate, same.high) == (0.0, 0.0, 0.0)


def test_runs_are_resampled_too():
    # One test row, five runs: only the runs vary, and the mean of 5 draws from (1, 0, 1, 1, 0) is Binomial(5, .6)/5.
    task = TaskRuns([0], [[0], [1], [0], [0], [1]], 2)
    interval = bootstrap_interval([task], "accuracy", resamples=100_000)
    assert interval.resampled == "rows and seeds" and interval.estimate == pytest.approx(0.6)
    assert (interval.low, interval.high) == binomial_quantiles(5, 0.6) == (0.2, 1.0)
    # the seeds-only fallback: the mean of two values bootstraps to (a, mid, b) with weights 1/4, 1/2, 1/4
    fallback = seed_interval([0.5, 0.7])
    assert (fallback.low, fallback.estimate, fallback.high) == pytest.approx((0.5, 0.6, 0.7))
    assert fallback.resampled == "seeds" and seed_interval([0.5]) is None


def plain_macro_f1(predictions, references, num_labels):
    scores = []
    for c in range(num_labels):
        tp = sum(p == r == c for p, r in zip(predictions, references))
        denominator = sum(p == c for p in predictions) + sum(r == c for r in references)
        scores.append(2 * tp / denominator if denominator else 0.0)
    return sum(scores) / num_labels


def test_bootstrap_matches_a_plain_loop_over_the_documented_draws():
    # The module docstring's protocol written out with loops: draw the runs once per replicate, then each task's
    # rows; average the metric over drawn runs, then tasks. Two tasks of different sizes and label counts, 3 runs.
    rng = np.random.default_rng(7)
    tasks = [TaskRuns(rng.integers(0, 3, 11), rng.integers(-1, 3, (3, 11)), 3),
             TaskRuns(rng.integers(0, 2, 7), rng.integers(0, 2, (3, 7)), 2)]  # fmt: skip
    other = [TaskRuns(t.references, rng.integers(0, t.num_labels, t.predictions.shape), t.num_labels) for t in tasks]
    resamples, seed = 200, 11
    draws = np.random.default_rng(seed)
    run_draw = draws.integers(0, 3, size=(resamples, 3))
    row_draws = [draws.integers(0, t.rows, size=(resamples, t.rows)) for t in tasks]
    expected = np.zeros((2, resamples))
    for m, method in enumerate((tasks, other)):
        for b in range(resamples):
            per_task = []
            for task, rows in zip(method, row_draws):
                refs = [task.references[i] for i in rows[b]]
                per_run = [plain_macro_f1([task.predictions[r][i] for i in rows[b]], refs, task.num_labels)
                           for r in run_draw[b]]  # fmt: skip
                per_task.append(sum(per_run) / len(per_run))
            expected[m, b] = sum(per_task) / len(per_task)
    replicates = bootstrap_replicates([tasks, other], "macro_f1", resamples=resamples, seed=seed)
    np.testing.assert_allclose(replicates, expected, rtol=0, atol=1e-12)
    interval = bootstrap_interval(tasks, "macro_f1", resamples=resamples, seed=seed)
    assert (interval.low, interval.high) == pytest.approx(tuple(np.quantile(expected[0], [0.025, 0.975])), abs=1e-12)
    diff = paired_difference(tasks, other, "macro_f1", resamples=resamples, seed=seed)
    assert (diff.low, diff.high) == pytest.approx(
        tuple(np.quantile(expected[0] - expected[1], [0.025, 0.975])), abs=1e-12
    )
    assert interval == bootstrap_interval(tasks, "macro_f1", resamples=resamples, seed=seed)  # fixed seed


def test_interval_errors():
    task = TaskRuns([0, 1], [0, 1], 2)
    with pytest.raises(ValueError, match=r"predictions must be \(runs, 2\)"):
        TaskRuns([0, 1], [0, 1, 1], 2)
    with pytest.raises(ValueError, match="same test rows"):
        paired_difference([task], [TaskRuns([1, 0], [0, 1], 2)])
    with pytest.raises(ValueError, match="same number of runs"):
        paired_difference([task], [TaskRuns([0, 1], [[0, 1], [1, 1]], 2)])
    with pytest.raises(ValueError, match="metric must be one of"):
        bootstrap_interval([task], "f1")
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([task], confidence=95)
    with pytest.raises(ValueError, match="different test rows"):
        TaskRuns.from_records([{"references": [0], "predictions": [0], "num_labels": 2},
                               {"references": [1], "predictions": [0], "num_labels": 2}])  # fmt: skip
    with pytest.raises(ValueError, match="scored over 2 and 3 labels"):
        TaskRuns.from_records([{"references": [0], "predictions": [0], "num_labels": 2},
                               {"references": [0], "predictions": [0], "num_labels": 3}])  # fmt: skip
    with pytest.raises(ValueError, match="resamples must be at least 1, got 0"):
        seed_interval([0.1, 0.2], resamples=0)
    with pytest.raises(ValueError, match=r"predictions must be label ids in \[0, 2\), or -1 for none"):
        TaskRuns([0, 1, 1], [[0, 7, 1]], 2)
    assert TaskRuns([0, 1], [[-1, 1]], 2).runs == 1  # -1: no label predicted


def test_classification_metrics_refuse_ids_outside_the_labels():
    """An out-of-range reference would count as right for accuracy and vanish from macro-F1."""
    from peft_talora.suite.evaluation import classification_metrics

    assert classification_metrics([-1, 1, 0], [0, 1, 0], num_labels=2) == {
        "accuracy": 2 / 3,
        "macro_f1": pytest.approx(5 / 6),
    }  # (2/3 + 1) / 2
    with pytest.raises(ValueError, match=r"references hold \[2\], outside \[0, 2\)"):
        classification_metrics([2, 2, 0], [2, 2, 0], num_labels=2)
    with pytest.raises(ValueError, match=r"predictions hold \[7\], outside \[-1, 2\)"):
        classification_metrics([7, 1, 0], [0, 1, 0], num_labels=2)
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        classification_metrics([1, 0], [0, 1, 0], num_labels=2)
