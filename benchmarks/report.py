"""RESULTS.md and the plots, generated from results.json (``python benchmarks/report.py [results.json]``).

:func:`summarize` aggregates the cached runs of the current plan and checks the targets;
:func:`write` renders ``RESULTS.md`` and the PNGs next to the JSON.

Macro-F1 leads and accuracy stands beside it (on small imbalanced test sets accuracy mostly
measures the label prior; ``docs/benchmarks.md``). Every average carries a 95% percentile-bootstrap
interval over the test rows and seeds, and every difference between two methods a paired one
(:mod:`peft_talora.suite.intervals`). Runs cached before per-row predictions were stored get an
interval over seeds only (marked †), or none with one seed; the report says so. With ``--lr-grid`` the report
gives each method's learning rate chosen on validation per seed, and with validation curves whether each
method's curve had flattened by the end of the budget (``curves.png``).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from peft_talora.suite.intervals import (
    METRICS,
    TaskRuns,
    bootstrap_interval,
    has_rows,
    paired_difference,
    seed_interval,
)

PROMPT_BASELINES = ("pt", "mpt", "adaption-prompt")
SINGLE_TASK = ("pt", "adaption-prompt", "lora")
TARGET_K = "16"
LEAD = "macro_f1"  # the metric targets are judged by; accuracy is shown beside it
ONE_POINT_ROWS = 100  # test rows per task for one row to move accuracy by at most 1 point
SEEDS_ONLY = "†"
#: A validation curve has flattened when its last quarter of the steps lowered the loss by less than this share of
#: its whole drop: more steps of the same schedule would change little.
FLAT_SHARE = 0.02


# ----------------------------------------------------------------------------- aggregation
def stats(values: list[float]) -> Optional[dict]:
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def is_variant(key: str) -> bool:
    """Whether ``key`` names a TA-LoRA variant (``ta-lora/...``, as ``run.is_variant`` decides from
    ``methods.py``). Read from the name: the report runs on ``results.json`` alone, without torch."""
    return "/" in key


def _run(data: dict, key: str) -> Optional[dict]:
    run = data["runs"].get(key)
    if run is None or run.get("fingerprint") != data["plan"]["runs"].get(key) or "average" not in run:
        return None
    return run


def _shots(data: dict, key: str) -> list[str]:
    plan = data["plan"]
    return plan["shots"] if "/" not in key else plan["ablation_shots"]


def seed_records(data: dict, key: str, shot: Optional[str] = None) -> list[tuple[int, dict]]:
    """``[(seed, {task: evaluation record})]`` of method ``key``: unseen data, or the targets at ``shot``."""
    plan, out = data["plan"], []
    for s in plan["seeds"]:
        if shot is None:
            run = _run(data, f"{key}|seed{s}|unseen_data")
            records = dict(run["tasks"]) if run else {}
        else:
            records = {t: r["tasks"][t] for t in plan["targets"] if (r := _run(data, f"{key}|seed{s}|{t}|k={shot}"))}
        if records:
            out.append((s, records))
    return out


def zero_shot_records(data: dict) -> dict:
    """``{task: record}`` of the base model, zero-shot (one run: the base model does not depend on the seed)."""
    plan, out = data["plan"], {}
    for task in [*plan["tasks"], *plan["targets"]]:
        run = data["runs"].get(f"zero-shot|{task}")
        if run and run.get("fingerprint") == plan["runs"].get(f"zero-shot|{task}") and "tasks" in run:
            out[task] = run["tasks"][task]
    return out


def _common_tasks(per_seed: list[dict], wanted: list[str]) -> list[str]:
    return [t for t in wanted if per_seed and all(t in records for records in per_seed)]


def _task_mean(records: dict, tasks: list[str], metric: str) -> float:
    return statistics.fmean(records[t][metric] for t in tasks)


def _no_interval(estimate: float) -> dict:
    return {"estimate": estimate, "low": None, "high": None, "resampled": None}


def _has_tasks(records: dict, wanted: list[str]) -> bool:
    return all(t in records for t in wanted)


def _complete(per_seed: list[dict], wanted: list[str]) -> list[dict]:
    """The seeds that have every wanted task, if any (else all of them): a partial run averages the tasks all its
    seeds share, and a seed that lacks one task would silently drop that task from the average."""
    return [r for r in per_seed if _has_tasks(r, wanted)] or per_seed


def aggregate(per_seed: list[dict], wanted: list[str], planned_seeds: Optional[int] = None) -> Optional[dict]:
    """One method in one setting: for each metric the task average per seed (mean, std, min, max, values over
    seeds) and its interval: over test rows and seeds when every record has its rows, else over seeds only.
    ``of_tasks`` / ``of_seeds`` record the coverage asked for, so a partial average is marked as one."""
    per_seed = _complete(per_seed, wanted)
    tasks = _common_tasks(per_seed, wanted)
    if not tasks:
        return None
    rows = all(has_rows(r[t]) for r in per_seed for t in tasks)
    out = {
        "n": len(per_seed), "tasks": tasks, "rows": rows,
        "of_tasks": len(wanted), "of_seeds": planned_seeds or len(per_seed),
    }  # fmt: skip
    for metric in METRICS:
        entry = stats([_task_mean(r, tasks, metric) for r in per_seed])
        if rows:
            runs = [TaskRuns.from_records([r[t] for r in per_seed]) for t in tasks]
            interval = bootstrap_interval(runs, metric)
        else:
            interval = seed_interval(entry["values"])
        entry["interval"] = interval.as_dict() if interval else None
        out[metric] = entry
    return out


def compare(a: list[tuple[int, dict]], b: list[tuple[int, dict]], wanted: list[str]) -> Optional[dict]:
    """``a - b`` of the task averages, paired by seed and test row (same bootstrap draws for both);
    over seeds only where rows are missing, no interval with one seed."""
    a_by_seed, b_by_seed = dict(a), dict(b)
    seeds = [s for s, _ in a if s in b_by_seed]
    complete = [s for s in seeds if _has_tasks(a_by_seed[s], wanted) and _has_tasks(b_by_seed[s], wanted)]
    seeds = complete or seeds  # as in aggregate: never drop a task because one seed lacks it
    left, right = [a_by_seed[s] for s in seeds], [b_by_seed[s] for s in seeds]
    tasks = _common_tasks(left + right, wanted)
    if not seeds or not tasks:
        return None
    rows = all(has_rows(r[t]) for r in left + right for t in tasks)
    out = {"n": len(seeds), "tasks": tasks, "rows": rows}
    for metric in METRICS:
        if rows:
            runs = lambda side: [TaskRuns.from_records([r[t] for r in side]) for t in tasks]  # noqa: E731
            out[metric] = paired_difference(runs(left), runs(right), metric).as_dict()
        else:
            diffs = [_task_mean(x, tasks, metric) - _task_mean(y, tasks, metric) for x, y in zip(left, right)]
            interval = seed_interval(diffs)
            out[metric] = interval.as_dict() if interval else _no_interval(statistics.fmean(diffs))
    return out


def summarize(data: dict) -> dict:
    """Fill ``quality``, ``differences``, ``ablations``, ``zero_shot``, ``test_sets`` and ``targets`` of ``data``."""
    plan = data["plan"]
    tasks, targets = plan["tasks"], plan["targets"]
    zero = zero_shot_records(data)
    quality = {"unseen_data": {}, "unseen_data_per_task": {}, "unseen_tasks": {}, "unseen_tasks_per_target": {}}
    runs = {}  # (key, shot) -> [(seed, records)]
    n_seeds = len(plan["seeds"])
    for key in plan["methods"]:
        runs[key, None] = per_seed = seed_records(data, key)
        quality["unseen_data"][key] = aggregate([r for _, r in per_seed], tasks, n_seeds)
        quality["unseen_data_per_task"][key] = {t: aggregate([r for _, r in per_seed], [t], n_seeds) for t in tasks}
        quality["unseen_tasks"][key], quality["unseen_tasks_per_target"][key] = {}, {}
        for shot in _shots(data, key):
            runs[key, shot] = per_seed = seed_records(data, key, shot)
            quality["unseen_tasks"][key][shot] = aggregate([r for _, r in per_seed], targets, n_seeds)
            quality["unseen_tasks_per_target"][key][shot] = {
                t: aggregate([r for _, r in per_seed], [t], n_seeds) for t in targets
            }
    quality["zero_shot"] = {
        "unseen_data": aggregate([zero], tasks), "unseen_tasks": aggregate([zero], targets),
        "per_task": {t: aggregate([zero], [t]) for t in [*tasks, *targets]},
    }  # fmt: skip
    data["quality"] = quality
    data["zero_shot"] = {t: {m: r[m] for m in (*METRICS, "n")} for t, r in zero.items()}

    # TA-LoRA minus every other method (and the base model), paired by seed and test row
    ta = "ta-lora"
    differences = {"unseen_data": {}, "unseen_tasks": {}}
    if (ta, None) in runs:
        for key in [k for k in plan["methods"] if k != ta]:
            differences["unseen_data"][key] = compare(runs[ta, None], runs[key, None], tasks)
            differences["unseen_tasks"][key] = {
                s: compare(runs[ta, s], runs[key, s], targets) for s in _shots(data, key) if (ta, s) in runs
            }
        seeds = [s for s, _ in runs[ta, None]]
        differences["unseen_data"]["zero-shot"] = compare(runs[ta, None], [(s, zero) for s in seeds], tasks)
        differences["unseen_tasks"]["zero-shot"] = {
            s: compare(runs[ta, s], [(seed, zero) for seed, _ in runs[ta, s]], targets) for s in plan["shots"]
        }
    data["differences"] = differences
    data["ablations"] = {
        key: {
            "unseen_data": quality["unseen_data"][key],
            "delta_vs_ta_lora": compare(runs[key, None], runs[ta, None], tasks) if (ta, None) in runs else None,
            "unseen_tasks": quality["unseen_tasks"][key],
        }
        for key in plan["methods"]
        if is_variant(key)
    }
    data["test_sets"] = describe_rows(data, zero)
    data["lr_choice"] = lr_choices(data)
    data["curves"] = curves(data)
    data["targets"] = check_targets(data)
    return data


def _planned(data: dict, key: str) -> Optional[dict]:
    """The run ``key`` if it belongs to the current plan (its fingerprint) and did not fail."""
    run = data["runs"].get(key)
    if run is None or run.get("fingerprint") != data["plan"]["runs"].get(key) or "error" in run:
        return None
    return run


def _grid_losses(data: dict, key: str, grid: list, seeds: list) -> dict:
    """``{lr: validation loss}`` of the grid runs done, the mean over ``seeds`` (``None`` if one diverged)."""
    losses = {}
    for lr in grid:
        runs = [_planned(data, f"{key}|seed{seed}|lr={lr:g}") for seed in seeds]
        if None not in runs:
            values = [run.get("validation_loss") for run in runs]
            losses[f"{lr:g}"] = None if None in values else sum(values) / len(values)
    return losses


def lowest_loss(losses: dict) -> Optional[float]:
    """The learning rate of ``{lr: validation loss, None if diverged}`` with the lowest loss (ties: the first in
    the grid); ``None`` if every one diverged. How every grid of the benchmark chooses (``run.py`` and
    ``reuse.py`` call this one; it lives here because the report must not import torch)."""
    finite = {lr: loss for lr, loss in losses.items() if loss is not None}
    return min(finite, key=finite.get) if finite else None


def lr_choices(data: dict) -> dict:
    """``--lr-grid``: ``{method: {seed: {"losses": {lr: validation loss, None if diverged}, "chosen": lr, "edge":
    ..., "on_seeds": [...]}}}`` from the grid's runs; ``losses`` are the seed's own (empty for a seed that did not
    train the grid, ``--lr-grid-seeds``); ``chosen`` (the lowest mean loss over ``on_seeds``, the first on ties, as
    ``run.py`` chooses) once every learning rate of the grid is done, ``edge`` whether it is the grid's lowest or
    highest value."""
    plan, out = data["plan"], {}
    pooled = plan.get("lr_grid_seeds")
    for key, grid in (plan.get("lr_grid") or {}).items():
        for seed in plan["seeds"]:
            on = list(pooled) if pooled else [seed]
            losses = _grid_losses(data, key, grid, [seed]) if seed in on or not pooled else {}
            choice = _grid_losses(data, key, grid, on)
            chosen = lowest_loss(choice) if len(choice) == len(grid) else None
            edge = chosen is not None and len(grid) > 1 and chosen in (f"{min(grid):g}", f"{max(grid):g}")
            out.setdefault(key, {})[str(seed)] = {"losses": losses, "chosen": chosen, "edge": edge, "on_seeds": on}
    return out


def flatness(curve: list) -> dict:
    """Whether a validation curve ``[[step, loss], ...]`` (first point before training) has flattened: from its
    last point at or before 3/4 of the steps to the end the loss fell by less than ``FLAT_SHARE`` of its whole
    drop. ``status``: ``flattened``, ``still falling``, ``no drop`` (the loss did not fall) or ``too few points``."""
    steps, losses = [p[0] for p in curve], [p[1] for p in curve]
    late = [i for i, step in enumerate(steps) if 0 < step <= 0.75 * steps[-1]]
    if len(curve) < 3 or steps[0] != 0 or not late or None in losses:
        return {"status": "too few points"}
    drop, last = losses[0] - losses[-1], losses[late[-1]] - losses[-1]
    status = "no drop" if drop <= 0 else "flattened" if last < FLAT_SHARE * drop else "still falling"
    return {"status": status, "drop": drop, "last_quarter": last, "from_step": steps[late[-1]]}


def curves(data: dict) -> dict:
    """``{method: {seed: {"lr", "curve", "status", ...}}}``: the validation curve of each method and seed at its
    (chosen) learning rate, with :func:`flatness`."""
    plan, out = data["plan"], {}
    for key in plan["methods"]:
        for seed in plan["seeds"]:
            choice = (data.get("lr_choice") or {}).get(key, {}).get(str(seed))
            if choice is not None and choice["chosen"] in choice["losses"]:  # the seed trained the grid
                lr = choice["chosen"]
                curve = (_planned(data, f"{key}|seed{seed}|lr={lr}") or {}).get("curve")
            else:  # a fixed learning rate, or one chosen on other seeds (--lr-grid-seeds)
                train = (_run(data, f"{key}|seed{seed}|unseen_data") or {}).get("train") or {}
                lr, curve = train.get("lr"), train.get("curve")
            if curve:
                out.setdefault(key, {})[str(seed)] = {"lr": lr, "curve": curve, **flatness(curve)}
    return out


def describe_test_sets(tasks: list[str], per_task: int) -> dict:
    """Rows used, label counts and split size of each task's fixed test subset (reads the suite)."""
    import quality as Q  # noqa: N812  (benchmarks/quality.py: the subsets the benchmark evaluates on)

    from peft_talora.suite import get_task, load_task

    out = {}
    for task in tasks:
        rows, names = Q.test_rows(task, per_task), get_task(task).label_names
        counts = Counter(int(label) for label in rows["label"])
        out[task] = {
            "rows": len(rows),
            "split_rows": len(load_task(task)["test"]),
            "labels": {names[i]: counts.get(i, 0) for i in range(len(names))},
        }
    return out


def describe_rows(data: dict, zero: dict) -> dict:
    """Per task: rows used (from the stored description, else from the zero-shot records), split size and labels
    when known, and what one row is worth in accuracy points."""
    plan, known = data["plan"], data.get("test_sets") or {}
    out = {}
    for task in [*plan["tasks"], *plan["targets"]]:
        entry = dict(known.get(task) or {})
        if "rows" not in entry and task in zero:
            entry["rows"] = zero[task]["n"]
        if "rows" in entry:
            entry["row_points"] = 100 / entry["rows"]
        out[task] = entry
    return out


def _entry(data, setting, key, shot=None) -> Optional[dict]:
    entry = data["quality"][setting].get(key)
    if entry is not None and shot is not None:
        entry = entry.get(shot)
    return entry


def _mean(data, setting, key, shot=None, metric: str = LEAD) -> Optional[float]:
    entry = _entry(data, setting, key, shot)
    return None if entry is None else entry[metric]["mean"]


def _diff(data, setting, other, shot=None) -> Optional[dict]:
    entry = data["differences"][setting].get(other)
    if entry is not None and shot is not None:
        entry = entry.get(shot)
    return entry


def check_targets(data: dict) -> list[dict]:
    """Each target with its measured value and ``met`` (True / False / None when not measured), judged by the
    lead metric (macro-F1); ``resolved``: whether the difference's interval lies on one side of the threshold."""
    out = []

    def add(name, measured, text, met, note="", interval=None, threshold=None):
        resolved = None  # unknown: no interval
        if interval is not None and interval.get("low") is not None:
            resolved = threshold < interval["low"] or threshold > interval["high"]
            if resolved and interval.get("resampled") == "seeds":
                resolved = None  # outside a seeds-only interval says nothing about the test-row noise
        out.append(
            {
                "target": name,
                "measured": measured,
                "measured_text": text,
                "met": met,
                "note": note,
                "interval": interval,
                "threshold": threshold,
                "resolved": resolved,
            }
        )

    def coverage(diff, asked) -> str:
        """On how much of the plan a difference rests, where the run is partial (``asked``: its tasks)."""
        return fmt_coverage({**diff, "of_seeds": len(data["plan"]["seeds"]), "of_tasks": len(asked)})

    def measured(ta_value, other_value, other_name, diff, asked):
        lead, acc = diff[LEAD], diff["accuracy"]
        return (
            f"macro-F1 {100 * ta_value:.1f} vs {100 * other_value:.1f} ({other_name}): {fmt_diff(lead)}"
            f"{coverage(diff, asked)}; accuracy {fmt_diff(acc)}"
        )

    def partial(asked, *diffs) -> list[str]:
        return ["partial run"] if any(coverage(d, asked) for d in diffs) else []

    ta = _mean(data, "unseen_data", "ta-lora")
    baselines = {k: v for k in PROMPT_BASELINES if (v := _mean(data, "unseen_data", k)) is not None}
    name = "Unseen data: TA-LoRA average macro-F1 >= best of PT, MPT, AdaptionPrompt + 2 points"
    if ta is None or not baselines or _diff(data, "unseen_data", max(baselines, key=baselines.get)) is None:
        add(name, None, "not measured", None, "needs TA-LoRA and at least one of PT/MPT/AdaptionPrompt")
    else:
        best = max(baselines, key=baselines.get)
        diff = _diff(data, "unseen_data", best)
        add(
            name,
            100 * diff[LEAD]["estimate"],
            measured(ta, baselines[best], best, diff, data["plan"]["tasks"]),
            diff[LEAD]["estimate"] >= 0.02,
            "; ".join(
                ([] if len(baselines) == len(PROMPT_BASELINES) else [f"only {', '.join(baselines)} measured"])
                + partial(data["plan"]["tasks"], diff)
            ),
            diff[LEAD],
            0.02,
        )
    lora = _mean(data, "unseen_data", "lora")
    name = "Unseen data: TA-LoRA within 1 point of LoRA (macro-F1)"
    diff = _diff(data, "unseen_data", "lora")
    if ta is None or lora is None or diff is None:
        add(name, None, "not measured", None)
    else:
        add(
            name,
            100 * diff[LEAD]["estimate"],
            measured(ta, lora, "lora", diff, data["plan"]["tasks"]),
            diff[LEAD]["estimate"] >= -0.01,
            "; ".join(partial(data["plan"]["tasks"], diff)),
            interval=diff[LEAD],
            threshold=-0.01,
        )
    params = data.get("parameters", {})
    name = "At least 20x fewer per-task parameters than LoRA"
    if "ta-lora" in params and "lora" in params:
        ratio = params["lora"]["per_task"] / params["ta-lora"]["per_task"]
        add(
            name,
            ratio,
            f"{params['ta-lora']['per_task']:,} vs {params['lora']['per_task']:,}: {ratio:.1f}x fewer",
            ratio >= 20,
        )
    else:
        add(name, None, "not measured", None)
    name = f"Unseen tasks, k={TARGET_K}: TA-LoRA above PT and MPT (macro-F1)"
    ta_k = _mean(data, "unseen_tasks", "ta-lora", TARGET_K)
    others = {k: v for k in ("pt", "mpt") if (v := _mean(data, "unseen_tasks", k, TARGET_K)) is not None}
    diffs = {k: d for k in others if (d := _diff(data, "unseen_tasks", k, TARGET_K)) is not None}
    if ta_k is None or not diffs:
        add(name, None, "not measured", None, f"needs k={TARGET_K} in --shots")
    else:
        best = min(diffs, key=lambda k: diffs[k][LEAD]["estimate"])  # the peer TA-LoRA leads least
        text = "; ".join(measured(ta_k, others[k], k, diffs[k], data["plan"]["targets"]) for k in diffs)
        add(
            name,
            100 * diffs[best][LEAD]["estimate"],
            text,
            diffs[best][LEAD]["estimate"] > 0,
            "; ".join(
                ([] if len(diffs) == 2 else [f"only {', '.join(diffs)} measured"])
                + partial(data["plan"]["targets"], *diffs.values())
            ),
            diffs[best][LEAD],
            0.0,
        )
    speed = data.get("speed") or {}
    name = "Generation: TA-LoRA >= 0.97x the base model's tokens/s"
    ratio = ((speed.get("generation") or {}).get("ratios") or {}).get("ta-lora / base")
    add(name, ratio, "not measured" if ratio is None else f"{ratio:.3f}x", None if ratio is None else ratio >= 0.97)
    name = "A batch of 64 distinct tasks: <= 1.02x the step time of a one-task batch"
    ratio = next(iter(((speed.get("task_batch") or {}).get("ratios") or {}).values()), None)
    add(name, ratio, "not measured" if ratio is None else f"{ratio:.3f}x", None if ratio is None else ratio <= 1.02)
    return out


# ----------------------------------------------------------------------------- formatting
def _entries(quality: dict):
    """Every aggregate in ``quality`` (to tell whether all of them were resampled over rows)."""
    for setting in ("unseen_data", "unseen_tasks"):
        for value in quality.get(setting, {}).values():
            yield from (value.values() if setting == "unseen_tasks" and value else [value])


def fmt_interval(interval: Optional[dict], signed: bool = False) -> str:
    """``[low, high]`` in points, ``†`` when resampled over seeds only; empty when there is no interval."""
    if not interval or interval.get("low") is None:
        return ""
    sign = "+" if signed else ""
    mark = SEEDS_ONLY if interval.get("resampled") == "seeds" else ""
    return f" [{100 * interval['low']:{sign}.1f}, {100 * interval['high']:{sign}.1f}]{mark}"


def fmt_metric(entry: Optional[dict], metric: str = LEAD) -> str:
    """A method's average: ``mean [interval]`` in points."""
    if entry is None:
        return "-"
    return f"{100 * entry[metric]['mean']:.1f}{fmt_interval(entry[metric]['interval'])}{fmt_coverage(entry)}"


def fmt_coverage(entry: dict) -> str:
    """`` (2 of 3 seeds)`` / `` (3 of 4 tasks)`` where an average covers less than was asked for, else empty."""
    parts = [
        f"{have} of {asked} {what}"
        for have, asked, what in (
            (entry["n"], entry.get("of_seeds"), "seeds"),
            (len(entry["tasks"]), entry.get("of_tasks"), "tasks"),
        )
        if asked and have < asked
    ]
    return f" ({', '.join(parts)})" if parts else ""


def fmt_cell(entry: Optional[dict]) -> str:
    """Macro-F1 [interval] / accuracy, in points."""
    if entry is None:
        return "-"
    return f"{fmt_metric(entry, LEAD)} / {100 * entry['accuracy']['mean']:.1f}"


def fmt_diff(interval: Optional[dict]) -> str:
    if not interval:
        return "-"
    return f"{100 * interval['estimate']:+.1f}{fmt_interval(interval, signed=True)}"


def label(data: dict, key: str) -> str:
    return data["methods"].get(key, {}).get("label", key)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _verdict(t: dict) -> str:
    text = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
    if t.get("resolved") is False:
        text += " (not resolved: the interval includes the threshold)"
    return text


def targets_text(data: dict) -> str:
    lines = ["Targets:"]
    for t in data.get("targets", []):
        lines.append(f"  {_verdict(t):<12} {t['target']}: {t['measured_text']}")
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _validation_budget(settings: dict) -> str:
    if not (settings.get("lr_grid") or settings.get("eval_every")):
        return ""
    every = settings.get("eval_every") or 0
    when = f"every {every} steps" if every else "after the last step"
    return f"; validation loss on {settings['val_per_task']} validation rows per source task {when}"


def _shard_lines(data: dict) -> list[str]:
    """The shard processes that produced the runs (``--shard``), with their commands and times."""
    lines = []
    for name, shard in sorted((data.get("shards") or {}).items()):
        took = f", took {shard['elapsed_s'] / 60:.1f} min" if "elapsed_s" in shard else ", not finished"
        lines.append(f"- **Shard {name}:** `{shard['command']}` (started {shard['started']}{took})")
    return lines


def _lr_text(lr) -> str:
    """``3e-3`` for 0.003 (a number or the string a grid's runs are keyed by)."""
    mantissa, exponent = f"{float(lr):e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _lr_cell(data: dict, key: str) -> str:
    """The protocol table's learning rate: the fixed one, or the grid and the choice per seed."""
    fixed = data["methods"][key].get("lr")
    if fixed is not None:
        return f"{fixed:g}"
    grid = (data["plan"].get("lr_grid") or {}).get(key, [])
    chosen = [c["chosen"] for c in (data.get("lr_choice") or {}).get(key, {}).values()]
    picks = ", ".join(_lr_text(c) if c else "-" for c in chosen)
    return f"grid {' / '.join(_lr_text(lr) for lr in grid)}; chosen per seed: {picks or '-'}"


def _seeds_text(seeds: list) -> str:
    return ", ".join(str(seed) for seed in seeds)


def _choice_rule(plan: dict) -> str:
    """How the learning rate was chosen: per seed, or once on ``--lr-grid-seeds`` for every seed."""
    pooled = plan.get("lr_grid_seeds")
    if not pooled:
        return "Per seed the one with the lowest validation loss after the last step was kept"
    return (
        f"Only seed {_seeds_text(pooled)} trained the whole grid; the learning rate with the lowest "
        f"{'mean ' if len(pooled) > 1 else ''}validation loss after the last step there was kept, and every seed "
        "trained at it"
    )


def _grids_text(data: dict, grids: dict) -> str:
    """``{method: [lr, ...]}`` as text: each distinct grid once, named by its methods unless the grids are simply
    one per family (``--method-lr-grid`` gave a method its own)."""
    by_grid, families = {}, {}
    for key, grid in grids.items():
        by_grid.setdefault(tuple(grid), []).append(key)
        families.setdefault(data["methods"].get(key, {}).get("family", key), set()).add(tuple(grid))
    per_family = all(len(g) == 1 for g in families.values()) and len(by_grid) == len(families)
    parts = []
    for grid, keys in sorted(by_grid.items()):
        values = " / ".join(_lr_text(lr) for lr in grid)
        parts.append(values if per_family else f"{', '.join(label(data, k) for k in keys)}: {values}")
    return "; ".join(parts)


def render_lr_choice(data: dict) -> list[str]:
    """``--lr-grid``: the learning rate chosen per method and seed, with every validation loss of the grid."""
    plan, choices = data["plan"], data.get("lr_choice") or {}
    if not plan.get("lr_grid"):
        return []
    settings, held = data["meta"]["settings"], plan.get("ablation_lr")
    grids = _grids_text(data, {k: g for k, g in plan["lr_grid"].items() if not (held and is_variant(k))})
    variants = (
        f" The TA-LoRA variants trained at TA-LoRA's chosen learning rate, {_lr_text(held)} (`--ablation-lr`), so "
        "each changes one thing (a learning-rate variant at its own value)."
        if held and any(is_variant(key) for key in plan["methods"])
        else ""
    )
    out = [
        "## Learning rates chosen on validation",
        "",
        f"Every method trained its multi-task adapter at each learning rate of its grid ({grids}), the same "
        f"number of values for every method.{variants} {_choice_rule(plan)} (Trainer's evaluation loss, "
        f"label tokens only, on {settings['val_per_task']} rows of each source task's validation split, the same "
        "rows for every method); unseen data and unseen tasks were evaluated with it only. Cells: **chosen** "
        "(validation loss of each learning rate). A choice at the edge of the grid (marked *edge*) may mean the "
        "best value lies outside it.",
        "",
    ]
    rows, edges, made, pending = [], [], 0, 0
    for key in plan["methods"]:
        cells = []
        for seed in plan["seeds"]:
            choice = choices.get(key, {}).get(str(seed))
            made += bool(choice and choice["chosen"])
            pending += bool(choice and choice["losses"] and not choice["chosen"])
            if choice and not choice["losses"] and choice["chosen"]:  # chosen on the grid seeds
                cells.append(f"**{_lr_text(choice['chosen'])}** (chosen on seed {_seeds_text(choice['on_seeds'])})")
                continue
            if not choice or not choice["losses"]:
                cells.append("-")
                continue
            losses = ", ".join(
                f"{_lr_text(lr)}: {'diverged' if v is None else f'{v:.3f}'}" for lr, v in choice["losses"].items()
            )
            head = f"**{_lr_text(choice['chosen'])}**" if choice["chosen"] else "not chosen yet"
            cells.append(f"{head}{' *edge*' if choice['edge'] else ''} ({losses})")
            if choice["edge"]:
                edges.append(f"{label(data, key)} (seed {seed}: {_lr_text(choice['chosen'])})")
        rows.append([label(data, key), *cells])
    out += table(["method", *[f"seed {s}" for s in plan["seeds"]]], rows) + [""]
    unfinished = f" ({pending} grid{'s' if pending > 1 else ''} not finished yet)" if pending else ""
    if edges:
        edge_text = "Chosen at an edge of the grid: " + "; ".join(edges) + f"{unfinished}."
    elif made:
        edge_text = f"No choice is at an edge{unfinished}."
    else:
        edge_text = "No learning rate is chosen yet (the grids are unfinished)."
    return out + [edge_text, ""]


def render_target_lr_choice(data: dict) -> list[str]:
    """``--target-lr-grid``: per method, unseen task and k the learning rate chosen on the task's validation rows,
    with the validation loss of every learning rate (from the unseen-task runs done)."""
    plan = data["plan"]
    if not plan.get("target_lr_grid"):
        return []
    settings, pooled = data["meta"]["settings"], plan.get("lr_grid_seeds")
    seeds = f"Only seed {_seeds_text(pooled)} trained these grids; every seed trained at its choice." if pooled else ""
    out = [
        "## Learning rates chosen for the unseen tasks",
        "",
        "Every method also trained each unseen task at every learning rate of its grid"
        + (f" ({_grids_text(data, plan['target_lr_grid'])})" if isinstance(plan["target_lr_grid"], dict) else "")
        + ", from its multi-task adapter, and kept the one with the lowest validation loss after the last step on "
        f"{settings['target_val_rows']} rows of the task's validation split (the same rows for every method). "
        f"{seeds} Cells: **chosen** (validation loss of each learning rate), *edge* where it is the grid's lowest "
        "or highest.",
        "",
    ]
    columns = [(t, s) for t in plan["targets"] for s in plan["shots"]]
    rows = []
    for key in plan["methods"]:
        cells = []
        for target, shot in columns:
            choice = next(
                (
                    run
                    for seed in plan["seeds"]
                    if (run := _planned(data, f"{key}|seed{seed}|{target}|k={shot}")) and "target_lr" in run
                ),
                None,
            )
            if choice is None:
                cells.append("-")
                continue
            grid = [float(lr) for lr in choice["target_lr_grid"]]
            edge = len(grid) > 1 and choice["target_lr"] in (min(grid), max(grid))
            losses = ", ".join(
                f"{_lr_text(lr)}: {'diverged' if v is None else f'{v:.3f}'}"
                for lr, v in choice["target_lr_grid"].items()
            )
            cells.append(f"**{_lr_text(choice['target_lr'])}**{' *edge*' if edge else ''} ({losses})")
        rows.append([label(data, key), *cells])
    header = ["method", *[f"{t}, k={s}" for t, s in columns]]
    return out + table(header, rows) + [""]


def render_curves(data: dict) -> list[str]:
    """The validation-loss curves: per method and seed, whether the curve had flattened; the others named."""
    plan, curves_ = data["plan"], data.get("curves") or {}
    out = ["## Validation-loss curves", ""]
    if not curves_:
        return out + ["Not recorded (run with `--lr-grid` or `--eval-every N`).", ""]
    every = data["meta"]["settings"].get("eval_every") or 0
    out += [
        f"The validation loss (as above) before training and every {f'{every} steps' if every > 1 else 'step'} "
        "of multi-task training, at "
        "each method's (chosen) learning rate (`curves.png`; TA-LoRA's points during its shared warm-up are of "
        f"the shared prompt alone). A curve has **flattened** when its last quarter of the steps (from its "
        f"last point at or before 3/4 of the budget to the end) lowered the loss by less than {FLAT_SHARE:.0%} "
        "of its whole drop (first point to last): more steps would change little. *Still falling*: more steps "
        "would help; *no drop*: the loss never fell below its start. Cells: start → end loss, the last quarter's "
        "share of the drop.",
        "",
    ]
    rows, named = [], []
    for key in plan["methods"]:
        cells, other = [], []
        for seed in plan["seeds"]:
            entry = curves_.get(key, {}).get(str(seed))
            if entry is None:
                cells.append("-")
                continue
            (_, start), (_, end) = entry["curve"][0], entry["curve"][-1]
            share = f", {entry['last_quarter'] / entry['drop']:.1%}" if entry.get("drop", 0) > 0 else ""
            cells.append(f"{start:.3f} → {end:.3f}{share}: {entry['status']}")
            if entry["status"] != "flattened":
                other.append(f"seed {seed} {entry['status']}")
        if other:
            named.append(f"{label(data, key)} ({', '.join(other)})")
        rows.append([label(data, key), *cells])
    out += table(["method", *[f"seed {s}" for s in plan["seeds"]]], rows) + [""]
    if named:
        out += [f"**Not flattened:** {'; '.join(named)}. More steps may change these methods' results.", ""]
    else:
        out += ["Every recorded curve flattened.", ""]
    return out


def render(data: dict, plots: list[str]) -> str:
    meta, plan, settings = data["meta"], data["plan"], data["meta"]["settings"]
    mach, vers = meta["machine"], meta["versions"]
    seeds = plan["seeds"]
    main = [k for k in plan["methods"] if "/" not in k]
    out = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/run.py` from `results.json`; regenerate instead of editing. "
        "What is compared and how: `docs/benchmarks.md` and the Protocol section below.",
        "",
    ]
    out += [
        f"- **Command:** `{meta['command']}`",
        f"- **Date (UTC):** {meta['date']}"
        + (f"; this invocation took {meta['elapsed_s'] / 60:.1f} min" if "elapsed_s" in meta else "")
        + " (cached results of earlier invocations with the same budget are reused)",
        f"- **Machine:** {mach['cpu_count']} CPUs ({mach['usable_cpus']} usable, torch threads {mach['torch_threads']}), "
        f"{mach['processor']}, {mach['platform']}, Python {mach['python']}"
        + (f", load average {mach['load_average']} when written" if "load_average" in mach else "")
        + (f", GPU {mach['cuda_device']}" if "cuda_device" in mach else ", no GPU"),
        "- **Packages:** " + ", ".join(f"{k} {v}" for k, v in vers.items() if v),
        f"- **Model:** {meta['model']}; **source tasks:** {', '.join(plan['tasks'])}; "
        f"**target tasks:** {', '.join(plan['targets']) or '-'}; **seeds:** {' '.join(map(str, seeds))}",
        f"- **Budget:** {settings['steps']} multi-task steps of batch {settings['batch_size']} per method "
        f"(TA-LoRA: {settings['warmup_steps']} of them shared warm-up), {settings['train_per_task']} training examples per "
        f"source task, {settings['target_steps']} steps per unseen task and k, {settings['eval_per_task']} test examples per "
        f"task, texts cut to {settings['max_text_tokens']} tokens, `full` = at most {settings['full_cap'] or 'all'} rows"
        + _validation_budget(settings),
        *_shard_lines(data),
        "",
    ]
    n_eval = settings["eval_per_task"]
    q = data.get("quality", {})
    rows_stored = all(e["rows"] for e in _entries(q) if e)
    out += [
        "## How to read the numbers",
        "",
        "**Macro-F1 leads, accuracy stands beside it.** The test subsets are small and imbalanced while the "
        "training shots are balanced, so accuracy mostly measures the label prior: always answering the majority "
        "label scores its share in accuracy but only about 1/(number of labels) of that share's F1 in macro-F1. "
        "All values are points (percent). "
        "**Intervals** `[low, high]` are 95% percentile-bootstrap intervals (2,000 resamples, fixed seed) over "
        "the test rows and, with several seeds, over the seeds (`peft_talora.suite.intervals`); a difference "
        "between two methods is bootstrapped paired (the same rows and seeds drawn for both), so it is narrower "
        "than the two methods' own intervals suggest. A difference whose interval includes the threshold is not "
        "resolved by this run.",
        "",
    ]
    if not rows_stored:
        out += [
            f"{SEEDS_ONLY} **Interval over seeds only.** These results were cached before the benchmark stored "
            "per-row predictions, so the test rows cannot be resampled: the interval spans the seeds' spread only "
            "and understates the uncertainty (one test row is worth "
            f"{100 / n_eval:.1f} accuracy points here), and with one seed there is no interval at all. A rerun "
            "(`--fresh`) stores the rows and gives intervals over rows and seeds.",
            "",
        ]

    out += [
        "## Targets",
        "",
        "Judged by macro-F1 on the point estimate; the measured column gives the paired difference with its "
        "interval, and accuracy's beside it.",
        "",
    ]
    rows = []
    for t in data.get("targets", []):
        verdict = {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]
        if t.get("resolved") is False:
            verdict += ", not resolved (the interval includes the threshold)"
        elif t.get("resolved"):
            verdict += ", resolved (the interval excludes the threshold)"
        elif (t.get("interval") or {}).get("resampled") == "seeds":
            verdict += f", resolution unknown (interval over seeds only{SEEDS_ONLY})"
        rows.append([t["target"], t["measured_text"], verdict + (f" ({t['note']})" if t["note"] else "")])
    out += table(["target", "measured", "result"], rows) + [""]
    missed = [t["target"] for t in data.get("targets", []) if t["met"] is False]
    out += [("Missed: " + "; ".join(missed) + ".") if missed else "No target was missed among those measured.", ""]

    # test sets
    sets = data.get("test_sets", {})
    if sets:
        out += [
            "## Test sets",
            "",
            f"The fixed test subset of each task (the same for every method and seed). One row moves a task's "
            f"accuracy by 100 / rows points (macro-F1 by more when the row is of a rare label); the target is at "
            f"most 1 point, i.e. at least {ONE_POINT_ROWS} rows, where the task's test split has them "
            f"(`--eval-per-task {ONE_POINT_ROWS}` or more).",
            "",
        ]
        rows = []
        for task, entry in sets.items():
            role = "source" if task in plan["tasks"] else "target"
            n, split = entry.get("rows"), entry.get("split_rows")
            if n is None:
                rows.append([task, role, "-", "-", "-", "-", "-"])
                continue
            if n >= ONE_POINT_ROWS:
                ok = "yes"
            elif split is not None and split <= n:
                ok = f"no: the split has only {split} rows"
            else:
                ok = f"no: raise --eval-per-task to {ONE_POINT_ROWS}"
            labels = " / ".join(f"{c} {w}" for w, c in entry["labels"].items()) if entry.get("labels") else "-"
            rows.append(
                [task, role, str(n), labels, f"{entry['row_points']:.1f}", ok, "-" if split is None else str(split)]
            )
        out += table(
            [
                "task",
                "role",
                "rows used",
                "labels of the rows used",
                "one row = (accuracy points)",
                "<= 1 point per row",
                "rows in the test split",
            ],
            rows,
        ) + [""]

    # quality: unseen data
    over = "over test rows and seeds" if len(seeds) > 1 else "over test rows"
    out += [
        "## Quality: unseen data",
        "",
        f"Rank classification on the source tasks' held-out test subsets after multi-task training: macro-F1 "
        f"[95% interval {over}] and accuracy, averaged over the tasks and over {len(seeds)} seed(s); per task: "
        "macro-F1 [interval] / accuracy. The last column is TA-LoRA minus the method, paired. Same training rows, "
        "order and step count for every method.",
        "",
    ]
    zero_q = q.get("zero_shot", {})
    header = ["method", "macro-F1", "accuracy", "TA-LoRA - this (macro-F1)", *plan["tasks"]]
    rows = []
    if zero_q.get("unseen_data"):
        rows.append(
            [
                "Base model, zero-shot",
                fmt_metric(zero_q["unseen_data"]),
                fmt_metric(zero_q["unseen_data"], "accuracy"),
                fmt_diff((_diff(data, "unseen_data", "zero-shot") or {}).get(LEAD)),
                *[fmt_cell(zero_q["per_task"].get(t)) for t in plan["tasks"]],
            ]
        )
    for key in main:
        entry, per_task = q["unseen_data"].get(key), q.get("unseen_data_per_task", {}).get(key, {})
        diff = "" if key == "ta-lora" else fmt_diff((_diff(data, "unseen_data", key) or {}).get(LEAD))
        rows.append(
            [
                label(data, key),
                fmt_metric(entry),
                fmt_metric(entry, "accuracy"),
                diff,
                *[fmt_cell(per_task.get(t)) for t in plan["tasks"]],
            ]
        )
    out += table(header, rows) + [""]

    # quality: unseen tasks
    shots = plan["shots"]
    if plan["targets"] and shots:
        out += [
            "## Quality: unseen tasks",
            "",
            f"The target tasks' test subsets after learning each target from k examples per label (`full`: the "
            f"training split, at most {settings['full_cap'] or 'all'} rows) for {settings['target_steps']} steps: "
            f"macro-F1 [95% interval {over}] / accuracy, averaged over the target tasks. Protocols per method: "
            "see Protocol.",
            "",
        ]
        header = ["method", *[f"k={s}" if s != "full" else "full" for s in shots]]
        rows = []
        if zero_q.get("unseen_tasks"):
            rows.append(["Base model, zero-shot", *([fmt_cell(zero_q["unseen_tasks"])] * len(shots))])
        for key in main:
            rows.append([label(data, key), *[fmt_cell(q["unseen_tasks"].get(key, {}).get(s)) for s in shots]])
        out += table(header, rows) + [""]
        out += ["TA-LoRA minus each method, macro-F1, paired:", ""]
        others = [k for k in main if k != "ta-lora"]
        rows = [
            [
                "Base model, zero-shot",
                *[fmt_diff(((_diff(data, "unseen_tasks", "zero-shot") or {}).get(s) or {}).get(LEAD)) for s in shots],
            ]
        ]
        rows += [
            [
                label(data, k),
                *[fmt_diff(((_diff(data, "unseen_tasks", k) or {}).get(s) or {}).get(LEAD)) for s in shots],
            ]
            for k in others
        ]
        out += table(["TA-LoRA minus", *header[1:]], rows) + [""]
        if len(plan["targets"]) > 1:
            out += ["Per target task (macro-F1 [interval] / accuracy):", ""]
            header = ["method", *[f"{t} k={s}" for t in plan["targets"] for s in shots]]
            rows = [
                [
                    label(data, key),
                    *[
                        fmt_cell(q["unseen_tasks_per_target"].get(key, {}).get(s, {}).get(t))
                        for t in plan["targets"]
                        for s in shots
                    ],
                ]
                for key in main
            ]
            out += table(header, rows) + [""]

    # ablations
    abl = data.get("ablations", {})
    if abl:
        out += [
            "## Ablations (TA-LoRA)",
            "",
            "Each variant changes one thing of TA-LoRA and keeps the data, order and step budget. Unseen-data "
            "average macro-F1 and accuracy [95% intervals]; the variant minus full TA-LoRA, paired.",
            "",
        ]
        ab_shots = plan["ablation_shots"]
        header = [
            "variant",
            "macro-F1",
            "accuracy",
            "variant - TA-LoRA (macro-F1)",
            "variant - TA-LoRA (accuracy)",
            *[f"unseen tasks k={s}" for s in ab_shots],
        ]
        rows = []
        if "ta-lora" in q.get("unseen_data", {}):
            ta_entry = q["unseen_data"]["ta-lora"]
            rows.append(
                [
                    "TA-LoRA (full method)",
                    fmt_metric(ta_entry),
                    fmt_metric(ta_entry, "accuracy"),
                    "0.0",
                    "0.0",
                    *[fmt_cell(q["unseen_tasks"].get("ta-lora", {}).get(s)) for s in ab_shots],
                ]
            )
        for key, entry in abl.items():
            delta = entry["delta_vs_ta_lora"] or {}
            paired = delta.get("n", len(plan["seeds"]))  # a partial run pairs the seeds both have; none: no note
            on = f" (on {paired} of {len(plan['seeds'])} seeds)" if paired < len(plan["seeds"]) else ""
            rows.append(
                [
                    label(data, key),
                    fmt_metric(entry["unseen_data"]),
                    fmt_metric(entry["unseen_data"], "accuracy"),
                    fmt_diff(delta.get(LEAD)) + on,
                    fmt_diff(delta.get("accuracy")) + on,
                    *[fmt_cell(entry["unseen_tasks"].get(s)) for s in ab_shots],
                ]
            )
        out += table(header, rows) + [""]

    out += render_lr_choice(data) + render_target_lr_choice(data) + render_curves(data)

    # parameters
    params = data.get("parameters", {})
    if params:
        out += [
            "## Trainable parameters",
            "",
            f"Counted from models built with {meta['model']}'s shapes and the benchmark's configs. **Per task**: how "
            "much the trainable count grows when one more task is configured; **shared**: the rest. Single-task "
            "methods (PT, AdaptionPrompt, LoRA) do not grow with tasks, so by convention all their parameters are per "
            "task (one adapter per task) and none are shared. **Per unseen task**: what trains for a new task under "
            "the method's unseen-task protocol.",
            "",
        ]
        lora_pt = params.get("lora", {}).get("per_task")
        rows = []
        for key in [k for k in main if k in params]:
            p = params[key]
            rows.append(
                [
                    label(data, key),
                    f"{p['per_task']:,}",
                    f"{p['shared']:,}",
                    f"{p['per_unseen_task']:,}",
                    f"{p['total']:,}",
                    f"{lora_pt / p['per_task']:.1f}x" if lora_pt else "-",
                ]
            )
        out += table(
            [
                "method",
                "per task",
                "shared",
                "per unseen task",
                f"total ({len(plan['tasks'])} source tasks)",
                "LoRA per task / this",
            ],
            rows,
        ) + [""]

    # speed
    speed = data.get("speed")
    out += ["## Speed and memory", ""]
    if not speed:
        out += ["Not measured (`--skip-speed` and no earlier measurement).", ""]
    else:
        ts, gen, tb = speed["train_step"], speed["generation"], speed["task_batch"]
        out += [
            f"Ratios of variants measured side by side, interleaved, median of {speed['repeats']} repeats after a "
            f"warm-up (measured {speed['date']}). Lower is better for time and memory, higher for tokens/s.",
            "",
        ]
        rows = [
            [
                f"training step, batch {ts['batch_shape']} (TA-LoRA mixed-task)",
                "TA-LoRA / LoRA",
                f"{ts['ratios']['ta-lora / lora']:.3f}x",
                f"{ts['median_s']['ta-lora']:.2f} s vs {ts['median_s']['lora']:.2f} s",
            ],
            [
                "",
                "TA-LoRA / AdaptionPrompt",
                f"{ts['ratios']['ta-lora / adaption-prompt']:.3f}x",
                f"{ts['median_s']['ta-lora']:.2f} s vs {ts['median_s']['adaption-prompt']:.2f} s",
            ],
            [
                f"generation, batch {gen['batch_size']}, {gen['new_tokens']} new tokens (greedy)",
                "TA-LoRA / base tokens/s",
                f"{gen['ratios']['ta-lora / base']:.3f}x",
                f"{gen['median_tokens_per_s']['ta-lora']:.1f} vs {gen['median_tokens_per_s']['base']:.1f} tokens/s",
            ],
            [
                "",
                "AdaptionPrompt / base tokens/s",
                f"{gen['ratios']['adaption-prompt / base']:.3f}x",
                f"{gen['median_tokens_per_s']['adaption-prompt']:.1f} tokens/s",
            ],
        ]
        if "mtl-lora / lora" in ts["ratios"]:  # measured since MTL-LoRA joined the speed runs
            rows.insert(
                2,
                [
                    "",
                    "MTL-LoRA / LoRA (MTL-LoRA mixed-task)",
                    f"{ts['ratios']['mtl-lora / lora']:.3f}x",
                    f"{ts['median_s']['mtl-lora']:.2f} s vs {ts['median_s']['lora']:.2f} s",
                ],
            )
            rows.append(
                [
                    "",
                    "MTL-LoRA / base tokens/s",
                    f"{gen['ratios']['mtl-lora / base']:.3f}x",
                    f"{gen['median_tokens_per_s']['mtl-lora']:.1f} tokens/s",
                ]
            )
        label_logits = "ta-lora label logits / ta-lora"
        if label_logits in ts["ratios"]:  # measured since MultiTaskTrainer keeps the label positions' logits only
            rows.insert(
                2,
                [
                    "",
                    "TA-LoRA, logits at label positions only / every position",
                    f"{ts['ratios'][label_logits]:.3f}x",
                    f"{ts['median_s']['ta-lora label logits']:.2f} s vs {ts['median_s']['ta-lora']:.2f} s",
                ],
            )
        many = next(iter(tb["ratios"]))
        rows.append(
            [
                f"TA-LoRA training step, batch {tb['batch_shape']}, {tb['num_tasks']} tasks configured",
                many,
                f"{tb['ratios'][many]:.3f}x",
                " vs ".join(f"{v:.2f} s" for v in tb["median_s"].values()),
            ]
        )
        rows += [
            [
                f"training memory, batch {ts['batch_shape']}",
                "TA-LoRA / LoRA",
                f"{ts['memory_ratios']['ta-lora / lora']:.3f}x",
                " vs ".join(_gib(ts["memory"][k]["total_bytes"]) for k in ("ta-lora", "lora")),
            ],
            [
                "",
                "TA-LoRA / AdaptionPrompt",
                f"{ts['memory_ratios']['ta-lora / adaption-prompt']:.3f}x",
                " vs ".join(_gib(ts["memory"][k]["total_bytes"]) for k in ("ta-lora", "adaption-prompt")),
            ],
            *(
                [
                    [
                        "",
                        "MTL-LoRA / LoRA",
                        f"{ts['memory_ratios']['mtl-lora / lora']:.3f}x",
                        " vs ".join(_gib(ts["memory"][k]["total_bytes"]) for k in ("mtl-lora", "lora")),
                    ]
                ]
                if "mtl-lora / lora" in ts["memory_ratios"]
                else []
            ),
            *(
                [
                    [
                        "",
                        "TA-LoRA, logits at label positions only / every position",
                        f"{ts['memory_ratios'][label_logits]:.3f}x",
                        " vs ".join(_gib(ts["memory"][k]["total_bytes"]) for k in ("ta-lora label logits", "ta-lora")),
                    ]
                ]
                if label_logits in ts["memory_ratios"]
                else []
            ),
            [
                f"training memory, batch {tb['batch_shape']}",
                many,
                f"{tb['memory_ratios'][many]:.3f}x",
                " vs ".join(_gib(v["total_bytes"]) for v in tb["memory"].values()),
            ],
        ]
        out += table(["measurement", "ratio", "value", "medians / sizes"], rows) + [""]
        out += [
            "Memory is what a training step holds beyond the frozen base weights: the bytes of the tensors autograd "
            "saves for backward during one training forward (found with `torch.autograd.graph.saved_tensors_hooks`, "
            "each storage counted once, parameter storages excluded), plus parameters, gradients and the two AdamW "
            "moments of the trainable weights. It is an exact count of those tensors, not a process peak "
            "(`ru_maxrss` is process-wide and never goes down, so it cannot compare variants in one process); "
            "transient buffers freed within the forward are not in it."
            + (" On the GPU the CUDA peak over a step is in `results.json`." if "cuda_device" in mach else ""),
            "",
        ]

    # protocol
    out += [
        "## Protocol",
        "",
        "- **Data.** Each source task contributes the same stratified training examples (per seed); the mixture is "
        "shuffled with the seed and cut to exactly steps x batch rows; Trainer's sequential sampler feeds every method "
        "the same batch at every step. Unseen-task rows (k per label, or `full`) are streamed the same way. Test "
        "subsets are fixed (seed 0) for all methods and seeds.",
        "- **Training.** `peft_talora.training.trainer.build_trainer` (a stock `Trainer`) for every method: AdamW, linear "
        "decay, no weight decay, the same batch size and steps; TA-LoRA gets its fast/slow parameter groups "
        "(fast = 4x, `fast_lr_ratio`), other methods Trainer's own AdamW. TA-LoRA's shared warm-up "
        "(`set_training_stage('shared_warmup')`) uses the first warm-up steps of the same budget, then "
        "`multi_task` the rest (each phase its own linear schedule).",
        "- **Evaluation.** `peft_talora.suite.evaluate_task` (rank classification over the label words, the same "
        "prompts as training); `task_id` is passed only to methods that route tasks (TA-LoRA and MTL-LoRA by name, "
        "MPT and Poly by id), never to the others. Every run stores each test row's prediction in `results.json`, "
        "from which the report computes macro-F1, accuracy and their bootstrap intervals.",
        (
            "- **Learning rates** chosen per method and seed on the validation loss from a grid of the same size "
            "for every method (section *Learning rates chosen on validation*); unseen tasks are trained at the "
            "chosen one:"
            if plan.get("lr_grid")
            else "- **Learning rates** (not tuned per method; prompt methods at the main job's 1e-2, LoRA-style "
            "methods at PEFT's usual 1e-3; `--lr` overrides; `--lr-grid` chooses them on validation):"
        ),
        "",
    ]
    out += table(
        ["method", "learning rate", "task routing", "unseen-task protocol"],
        [
            [
                label(data, k),
                _lr_cell(data, k),
                data["methods"][k]["routes"] or "none",
                data["methods"][k]["unseen_tasks"],
            ]
            for k in main
        ],
    ) + [""]
    notes = list(data.get("notes", []))
    for key, run in sorted(data["runs"].items()):
        if key in plan["runs"] and run.get("fingerprint") == plan["runs"][key]:
            if "error" in run:
                notes.append(f"`{key}` failed: {run['error']}")
            elif "skipped" in run:
                notes.append(f"`{key}` skipped: {run['skipped']}")
    missing = [
        k for k in plan["runs"] if k not in data["runs"] or data["runs"][k].get("fingerprint") != plan["runs"][k]
    ]
    if missing:
        notes.append(
            f"{len(missing)} planned runs have no result yet (e.g. `{missing[0]}`); rerun the command to finish."
        )
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots
def _value_and_error(entry: Optional[dict], metric: str) -> tuple[float, float, float]:
    """Mean (points) and the distances to the interval's ends (0 when there is none), for error bars."""
    if entry is None:
        return float("nan"), 0.0, 0.0
    mean, interval = 100 * entry[metric]["mean"], entry[metric]["interval"]
    if not interval or interval.get("low") is None:
        return mean, 0.0, 0.0
    return mean, max(0.0, mean - 100 * interval["low"]), max(0.0, 100 * interval["high"] - mean)


def plot(data: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    plan, q = data["plan"], data.get("quality", {})
    main = [k for k in plan["methods"] if "/" not in k]
    names = [label(data, k) for k in main]
    note = "error bars: 95% bootstrap intervals" + (
        "" if all(e["rows"] for e in _entries(q) if e) else " (over seeds only for runs without stored rows)"
    )

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    x = list(range(len(main)))
    for offset, metric, color, name in (
        (-0.2, LEAD, "tab:blue", "macro-F1"),
        (0.2, "accuracy", "tab:gray", "accuracy"),
    ):
        points = [_value_and_error(q["unseen_data"].get(k), metric) for k in main]
        axes[0].bar(
            [i + offset for i in x],
            [p[0] for p in points],
            width=0.4,
            color=color,
            label=name,
            yerr=[[p[1] for p in points], [p[2] for p in points]],
            capsize=3,
        )
    axes[0].set_xticks(x, names, rotation=30, ha="right")
    axes[0].set_ylabel("points (%)")
    axes[0].set_title("unseen data (source tasks): macro-F1 leads", fontsize=10)
    zero = q.get("zero_shot", {}).get("unseen_data")
    if zero:
        axes[0].axhline(
            100 * zero[LEAD]["mean"], color="tab:blue", linestyle="--", linewidth=1, label="base zero-shot macro-F1"
        )
    axes[0].set_ylim(0, 100)
    axes[0].legend(fontsize=7, ncol=3, loc="upper center")
    shots = plan["shots"]
    for j, (key, name) in enumerate(zip(main, names)):
        points = [_value_and_error((q["unseen_tasks"].get(key) or {}).get(s), LEAD) for s in shots]
        xs = [i + (j - len(main) / 2) * 0.04 for i, p in enumerate(points) if p[0] == p[0]]
        kept = [p for p in points if p[0] == p[0]]
        if kept:
            axes[1].errorbar(
                xs,
                [p[0] for p in kept],
                yerr=[[p[1] for p in kept], [p[2] for p in kept]],
                marker="o",
                capsize=2,
                label=name,
            )
    zero = q.get("zero_shot", {}).get("unseen_tasks")
    if zero:
        axes[1].axhline(100 * zero[LEAD]["mean"], color="gray", linestyle="--", linewidth=1, label="base zero-shot")
    axes[1].set_xticks(range(len(shots)), [f"k={s}" if s != "full" else "full" for s in shots])
    axes[1].set_ylabel("macro-F1 (points)")
    axes[1].set_title("unseen tasks (average over targets)", fontsize=10)
    axes[1].set_ylim(0, 100)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7, ncol=3, loc="upper center")
    fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    paths.append(out / "quality.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    abl = data.get("ablations", {})
    if abl:
        keys = ["ta-lora", *abl] if "ta-lora" in q.get("unseen_data", {}) else list(abl)
        fig, ax = plt.subplots(figsize=(8, 4))
        points = [_value_and_error(q["unseen_data"].get(k), LEAD) for k in keys]
        ax.barh(
            range(len(keys)),
            [p[0] for p in points],
            xerr=[[p[1] for p in points], [p[2] for p in points]],
            capsize=3,
            color="tab:green",
        )
        ax.set_yticks(range(len(keys)), [label(data, k) for k in keys], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("unseen-data macro-F1 (points); " + note, fontsize=8)
        ax.set_title("TA-LoRA ablations")
        fig.tight_layout()
        paths.append(out / "ablations.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    speed = data.get("speed")
    if speed:
        items = [
            ("train step\nTA-LoRA / LoRA", speed["train_step"]["ratios"]["ta-lora / lora"], None),
            ("train step\nTA-LoRA / AdaptionPrompt", speed["train_step"]["ratios"]["ta-lora / adaption-prompt"], None),
            ("generation tokens/s\nTA-LoRA / base", speed["generation"]["ratios"]["ta-lora / base"], 0.97),
            ("train step\n64 tasks / 1 task", next(iter(speed["task_batch"]["ratios"].values())), 1.02),
            ("train memory\nTA-LoRA / LoRA", speed["train_step"]["memory_ratios"]["ta-lora / lora"], None),
        ]
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.bar(range(len(items)), [v for _, v, _ in items], color="tab:orange")
        for i, (_, v, target) in enumerate(items):
            ax.text(i, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
            if target is not None:
                ax.hlines(target, i - 0.4, i + 0.4, colors="red", linestyles="--")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(items)), [n for n, _, _ in items], fontsize=8)
        ax.set_ylabel("ratio (red: target)")
        ax.set_title("speed and memory ratios, measured side by side")
        fig.tight_layout()
        paths.append(out / "speed.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    if data.get("curves"):
        paths.append(plot_curves(data, out / "curves.png"))
    return paths


def plot_curves(data: dict, path: Path) -> Path:
    """``curves.png``: validation loss vs step, one panel per seed, one line per method at its (chosen) learning
    rate; ablations dashed."""
    import matplotlib.pyplot as plt

    seeds = data["plan"]["seeds"]
    fig, axes = plt.subplots(1, len(seeds), figsize=(5.5 * len(seeds), 4.2), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab20").colors
    for ax, seed in zip(axes[0], seeds):
        for i, key in enumerate(data["plan"]["methods"]):
            entry = data["curves"].get(key, {}).get(str(seed))
            if entry is None:
                continue
            steps, losses = zip(*entry["curve"])
            lr = f", lr {_lr_text(entry['lr'])}" if entry.get("lr") is not None else ""
            ax.plot(
                steps,
                losses,
                marker=".",
                linestyle="--" if is_variant(key) else "-",
                color=colors[i % len(colors)],
                label=f"{label(data, key)}{lr}{'' if entry['status'] == 'flattened' else ' (' + entry['status'] + ')'}",
            )
        ax.set_title(f"seed {seed}", fontsize=10)
        ax.set_xlabel("multi-task training step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper right")  # per panel: the learning rate and status differ by seed
    axes[0][0].set_ylabel("validation loss (label tokens)")
    fig.suptitle(f"validation loss; flattened = last quarter < {FLAT_SHARE:.0%} of the drop", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(data: dict, out: Path) -> list[Path]:
    out = Path(out)
    plots = plot(data, out)
    path = out / "RESULTS.md"
    path.write_text(render(data, [str(p) for p in plots]))
    return [path, *plots]


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results.json"
    loaded = json.loads(source.read_text())
    if not all("split_rows" in entry for entry in (loaded.get("test_sets") or {None: {}}).values()):
        plan = loaded["plan"]  # results written before the test sets were described: read them from the suite
        loaded["test_sets"] = describe_test_sets(
            [*plan["tasks"], *plan["targets"]], loaded["meta"]["settings"]["eval_per_task"]
        )
    summarize(loaded)
    for written in write(loaded, source.parent):
        print(f"wrote {written}")
