"""Which point of its training runs a few-shot method keeps, decided on validation rows alone, and replays of that choice.

A method trained on a new task's shots at a few learning rates, scored every few steps, must keep one
*point* (learning rate, step; step 0 is the method's start), and it has a few dozen labelled
validation rows to decide with. One of 40 rows moves macro-F1 by several points, so a rule can keep
noise. ``benchmarks/new_tasks.py`` scores every point on the validation *and* the test rows; this
module (numpy and the package's interval helpers, no model) states the rules and replays them on
random subsets of the validation rows. The test score of the kept point is read, never used to choose.

Rules (each sees only the points' validation predictions and label scores on the rows it is given):

- ``f1``: the highest validation macro-F1 (equal to 12 decimals counts as a tie); ties go to the
  earlier step, then the earlier learning rate. The benchmark's rule.
- ``loss``: the lowest mean negative log-likelihood of the gold label word (summed over its tokens,
  from the rank scores): an analogue of the decisive run's unseen-task rule, which keeps the
  learning rate of lowest Trainer validation loss (a per-token mean) at the last step.
- ``f1-resolved``: ``f1``'s point only where its gain over the start is resolved on those rows, i.e.
  the lower end of a two-sided 90% paired row-bootstrap interval (one-sided 95%) is above 0;
  otherwise the start. A method that starts at the base model then leaves it only on evidence.
- ``start``: step 0, never trained (for TA-LoRA's default start and for LoRA, the base model).

``ta-lora/closest`` trains at the learning rate ``ta-lora/shared`` kept on all the validation rows,
so its replays on fewer rows inherit that choice: leave it out of the replay's methods.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from peft_talora.suite.intervals import TaskRuns, bootstrap_interval, metric_values, paired_difference

RULES = ("f1", "loss", "f1-resolved", "start")
#: ``f1-resolved``: a gain counts when the lower end of this two-sided paired interval is above 0.
RESOLVED_CONFIDENCE = 0.90
RESOLVED_RESAMPLES = 400


@dataclass(frozen=True)
class Point:
    """One scored point of a method: ``lr`` is ``None`` for the start (step 0, shared by every learning rate)."""

    lr: Optional[float]
    step: int
    validation: Mapping  # metrics record with per-row predictions, references, num_labels and label scores
    test: Mapping  # metrics record with per-row predictions

    @property
    def label(self) -> str:
        return point_label(self.lr, self.step)


def point_label(lr: Optional[float], step: int) -> str:
    return "start (step 0)" if lr is None or step == 0 else f"lr {lr:g}, step {step}"


def points(entry: Mapping) -> list[Point]:
    """A method's points: the start, then each learning rate's steps, learning rates in grid order.

    Only the learning rates of the grid the run used (``entry["lrs"]``, where recorded) count: a
    record resumed under another grid keeps its other runs but does not choose among them.
    """
    start = entry["start"]
    out = [Point(None, 0, start["validation"], start["test"])]
    for lr in entry.get("lrs", list(entry["grid"])):
        run = entry["grid"][lr]
        for step, point in sorted(run["points"].items(), key=lambda item: int(item[0])):
            out.append(Point(float(lr), int(step), point["validation"], point["test"]))
    return out


def start_f1(entry: Mapping) -> float:
    """Validation macro-F1 of a method's start, from a record of either layout (``start``, or the older per-lr step 0)."""
    if "start" in entry:
        return entry["start"]["validation"]["macro_f1"]
    return next(iter(entry["grid"].values()))["validation"]["0"]["macro_f1"]


class Replay:
    """A method's points as arrays over the validation rows, for choosing on any subset of those rows.

    ``predictions`` ``(points, rows)``, ``nll`` ``(points, rows)`` (the gold label's negative
    log-likelihood), ``references`` ``(rows,)``, ``test_f1`` ``(points,)``.
    """

    def __init__(self, method_points: Sequence[Point]):
        self.points = list(method_points)
        first = self.points[0].validation
        self.references = np.asarray(first["references"], dtype=np.int64)
        self.num_labels = int(first["num_labels"])
        for point in self.points:
            if list(point.validation["references"]) != list(first["references"]):
                raise ValueError("Every point of a method must be scored on the same validation rows.")
        self.predictions = np.asarray([p.validation["predictions"] for p in self.points], dtype=np.int64)
        scores = np.asarray([p.validation["scores"] for p in self.points], dtype=float)  # (points, rows, labels)
        self.nll = -np.take_along_axis(scores, self.references[None, :, None], axis=2)[..., 0]
        self.test_f1 = np.asarray([p.test["macro_f1"] for p in self.points])
        # ties: the earlier step, then the earlier point (learning rate in grid order)
        self._preference = np.asarray(sorted(range(len(self.points)), key=lambda i: (self.points[i].step, i)))

    @property
    def rows(self) -> int:
        return len(self.references)

    def choose(self, rule: str, rows: np.ndarray) -> np.ndarray:
        """The index of the kept point for each subset of validation rows ``rows`` ``(subsets, n)``: ``(subsets,)``."""
        if rule not in RULES:
            raise ValueError(f"Unknown choice rule {rule!r}; the rules are {list(RULES)}.")
        rows = np.asarray(rows, dtype=np.int64)
        if rule == "start":
            return np.zeros(len(rows), dtype=np.int64)
        if rule == "loss":
            values = -self.nll[:, rows].mean(axis=2)  # (points, subsets): higher is better
        else:
            values = metric_values(self.predictions[:, rows], self.references[rows], self.num_labels, "macro_f1")
            values = np.round(values, 12)  # equal macro-F1 summed in another class order is a tie, not a win
        best = self._preference[np.argmax(values[self._preference], axis=0)]  # argmax keeps the first maximum
        if rule == "f1-resolved":
            for i, subset in enumerate(rows):
                if best[i] != 0 and not self._resolved_gain(best[i], subset):
                    best[i] = 0
        return best

    def _resolved_gain(self, point: int, subset: np.ndarray) -> bool:
        references = self.references[subset]
        gain = paired_difference(
            [TaskRuns(references, self.predictions[point, subset], self.num_labels)],
            [TaskRuns(references, self.predictions[0, subset], self.num_labels)],
            "macro_f1",
            resamples=RESOLVED_RESAMPLES,
            confidence=RESOLVED_CONFIDENCE,
        )
        return gain.low > 0


def task_seed(task: str) -> int:
    """A task's subset seed: stable across runs, task orders and partial reports."""
    return zlib.crc32(task.encode())


def subsets(rows: int, size: int, draws: int, seed: int = 0) -> np.ndarray:
    """``(draws, size)`` random subsets (without replacement) of ``range(rows)``; all rows once when ``size >= rows``."""
    if size >= rows:
        return np.arange(rows)[None, :]
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(rows, size=size, replace=False) for _ in range(draws)])


def choose(method_points: Sequence[Point], rule: str = "f1") -> Point:
    """The point ``rule`` keeps on all the validation rows."""
    return _kept(Replay(method_points), rule)


# ----------------------------------------------------------------------------- the study's report
def _finished(task: Mapping, methods: Sequence[str]) -> bool:
    return "base" in task and all("start" in task.get(m, {}) and "test" in task[m] for m in methods)


def rules_report(
    results: Mapping, methods: Sequence[str], sizes: Sequence[int] = (16, 24, 40), draws: int = 200
) -> str:
    """Markdown: what each rule keeps and scores on test, on all validation rows and on random subsets of ``sizes`` rows.

    ``results`` maps task names to ``benchmarks/new_tasks.py`` records (every point scored on test);
    ``methods`` are the trained methods compared (the ``base`` entry is the reference). Tasks where a
    method has not finished are left out. Subsets are drawn once per task and shared by every method
    and rule (paired); a size at or above a task's validation rows uses all of them, once. Shares and
    means are taken per task first, then averaged over the tasks with equal weight.
    """
    if not methods:
        return "The choice-rule study needs at least one trained method (--methods)."
    tasks = [name for name, task in results.items() if _finished(task, methods)]
    if not tasks:
        return "No task has every method finished with every point scored on test (the choice-rule study needs both)."
    replays = {(t, m): Replay(points(results[t][m])) for t in tasks for m in methods}
    for t in tasks:
        if any(not np.array_equal(replays[(t, m)].references, replays[(t, methods[0])].references) for m in methods):
            raise ValueError(f"{t}: the methods were scored on different validation rows; they cannot be paired.")
    base_f1 = {t: results[t]["base"]["test"]["macro_f1"] for t in tasks}
    ours, peers = methods[0], list(methods[1:])
    lines = [
        f"Choice rules replayed on {len(tasks)} tasks ({', '.join(tasks)}); validation rows per task: "
        + ", ".join(f"{t} {replays[(t, ours)].rows}" for t in tasks)
        + ".",
        "",
        "**Kept on all validation rows**: mean test macro-F1 over the tasks [95% interval over test rows], the "
        f"paired differences of {ours}, and the tasks where the kept point is below the base model on test.",
        "",
        "| rule | "
        + " | ".join(methods)
        + " | "
        + " | ".join(f"{ours} - {p}" for p in ["base", *peers])
        + " | below base |",
        "|---|" + "---|" * (2 * len(methods) + 1),
    ]
    detail = ["", "Per task, the point each rule keeps (test macro-F1, point):", ""]
    detail += ["| task | rule | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for rule in RULES:
        kept = {(t, m): _kept(replays[(t, m)], rule) for t in tasks for m in methods}
        test_runs = {m: [TaskRuns.from_records([kept[(t, m)].test]) for t in tasks] for m in methods}
        base_runs = [TaskRuns.from_records([results[t]["base"]["test"]]) for t in tasks]
        cells = [_mean_interval(test_runs[m]) for m in methods]
        cells += [paired_difference(test_runs[ours], base_runs, "macro_f1").format(signed=True)]
        cells += [paired_difference(test_runs[ours], test_runs[p], "macro_f1").format(signed=True) for p in peers]
        below = {m: sum(kept[(t, m)].test["macro_f1"] < base_f1[t] for t in tasks) for m in methods}
        cells.append(", ".join(f"{m} {below[m]}" for m in methods))
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        for t in tasks:
            row = [f"{100 * kept[(t, m)].test['macro_f1']:.1f} ({kept[(t, m)].label})" for m in methods]
            detail.append(f"| {t} | {rule} | " + " | ".join(row) + " |")
    lines += detail
    lines += [
        "",
        f"**Fewer validation rows**: {draws} random subsets per task and size (a task with no more rows than "
        "that uses all of them, once); the kept point's test macro-F1, averaged over subsets then tasks, and (in "
        "brackets) the share of subsets whose kept point is below the base model on test, averaged over tasks.",
        "",
        "| rule | rows | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for rule in RULES:
        for size in [*sizes, None]:
            cells = []
            for m in methods:
                scores, below = [], []
                for t in tasks:
                    replay = replays[(t, m)]
                    rows = subsets(replay.rows, size or replay.rows, draws, seed=task_seed(t))
                    test = replay.test_f1[replay.choose(rule, rows)]
                    scores.append(test.mean())
                    below.append(np.mean(test < base_f1[t]))
                cells.append(f"{100 * np.mean(scores):.1f} ({100 * np.mean(below):.0f}%)")
            lines.append(f"| {rule} | {size or 'all'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _all(replay: Replay) -> np.ndarray:
    return np.arange(replay.rows)[None, :]


def _kept(replay: Replay, rule: str) -> Point:
    return replay.points[int(replay.choose(rule, _all(replay))[0])]


def _mean_interval(task_runs: Sequence[TaskRuns]) -> str:
    return bootstrap_interval(task_runs, "macro_f1").format()
