"""RESULTS.md and the plots, generated from results.json (``python benchmarks/report.py [results.json]``).

:func:`summarize` aggregates the cached runs of the current plan (mean, sample std, min-max over
seeds) and checks the targets; :func:`write` renders ``RESULTS.md`` and the PNGs next to the JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Optional

PROMPT_BASELINES = ("pt", "mpt", "adaption-prompt")
SINGLE_TASK = ("pt", "adaption-prompt", "lora")
TARGET_K = "16"


# ----------------------------------------------------------------------------- aggregation
def stats(values: list[float]) -> Optional[dict]:
    if not values:
        return None
    return {
        "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values), "max": max(values), "n": len(values), "values": values,
    }


def _run(data: dict, key: str) -> Optional[dict]:
    run = data["runs"].get(key)
    if run is None or run.get("fingerprint") != data["plan"]["runs"].get(key) or "average" not in run:
        return None
    return run


def _shots(data: dict, key: str) -> list[str]:
    plan = data["plan"]
    return plan["shots"] if "/" not in key else plan["ablation_shots"]


def summarize(data: dict) -> dict:
    """Fill ``data["quality"]``, ``data["ablations"]``, ``data["zero_shot"]`` and ``data["targets"]``."""
    plan = data["plan"]
    seeds, targets = plan["seeds"], plan["targets"]
    quality = {"unseen_data": {}, "unseen_data_per_task": {}, "unseen_tasks": {}, "unseen_tasks_per_target": {}}
    for key in plan["methods"]:
        per_seed = [r for s in seeds if (r := _run(data, f"{key}|seed{s}|unseen_data"))]
        quality["unseen_data"][key] = stats([r["average"] for r in per_seed])
        quality["unseen_data_per_task"][key] = {
            task: stats([r["tasks"][task]["accuracy"] for r in per_seed if task in r["tasks"]]) for task in plan["tasks"]
        }
        quality["unseen_tasks"][key], quality["unseen_tasks_per_target"][key] = {}, {}
        for shot in _shots(data, key):
            seed_means = []
            for s in seeds:
                accs = [r["average"] for t in targets if (r := _run(data, f"{key}|seed{s}|{t}|k={shot}"))]
                if accs:
                    seed_means.append(statistics.fmean(accs))
            quality["unseen_tasks"][key][shot] = stats(seed_means)
            quality["unseen_tasks_per_target"][key][shot] = {
                t: stats([r["average"] for s in seeds if (r := _run(data, f"{key}|seed{s}|{t}|k={shot}"))])
                for t in targets
            }
    data["quality"] = quality
    zero = {}
    for task in [*plan["tasks"], *targets]:
        run = data["runs"].get(f"zero-shot|{task}")
        if run and run.get("fingerprint") == plan["runs"].get(f"zero-shot|{task}"):
            zero[task] = run["tasks"][task]["accuracy"]
    data["zero_shot"] = zero
    reference = (quality["unseen_data"].get("ta-lora") or {}).get("mean")
    data["ablations"] = {
        key: {
            "unseen_data": quality["unseen_data"][key],
            "delta_vs_ta_lora": None if reference is None or quality["unseen_data"][key] is None
            else quality["unseen_data"][key]["mean"] - reference,
            "unseen_tasks": quality["unseen_tasks"][key],
        }
        for key in plan["methods"] if "/" in key
    }
    data["targets"] = check_targets(data)
    return data


def _mean(data, setting, key, shot=None) -> Optional[float]:
    entry = data["quality"][setting].get(key)
    if entry is not None and shot is not None:
        entry = entry.get(shot)
    return None if entry is None else entry["mean"]


def check_targets(data: dict) -> list[dict]:
    """Each target with its measured value and ``met`` (True / False / None when not measured)."""
    out = []

    def add(name, measured, text, met, note=""):
        out.append({"target": name, "measured": measured, "measured_text": text, "met": met, "note": note})

    ta = _mean(data, "unseen_data", "ta-lora")
    baselines = {k: v for k in PROMPT_BASELINES if (v := _mean(data, "unseen_data", k)) is not None}
    name = "Unseen data: TA-LoRA average accuracy >= best of PT, MPT, AdaptionPrompt + 2 points"
    if ta is None or not baselines:
        add(name, None, "not measured", None, "needs TA-LoRA and at least one of PT/MPT/AdaptionPrompt")
    else:
        best = max(baselines, key=baselines.get)
        diff = 100 * (ta - baselines[best])
        add(name, diff, f"{100 * ta:.1f} vs {100 * baselines[best]:.1f} ({best}): {diff:+.1f} points", diff >= 2,
            "" if len(baselines) == len(PROMPT_BASELINES) else f"only {', '.join(baselines)} measured")
    lora = _mean(data, "unseen_data", "lora")
    name = "Unseen data: TA-LoRA within 1 point of LoRA"
    if ta is None or lora is None:
        add(name, None, "not measured", None)
    else:
        diff = 100 * (ta - lora)
        add(name, diff, f"{100 * ta:.1f} vs {100 * lora:.1f}: {diff:+.1f} points", diff >= -1)
    params = data.get("parameters", {})
    name = "At least 20x fewer per-task parameters than LoRA"
    if "ta-lora" in params and "lora" in params:
        ratio = params["lora"]["per_task"] / params["ta-lora"]["per_task"]
        add(name, ratio, f"{params['ta-lora']['per_task']:,} vs {params['lora']['per_task']:,}: {ratio:.1f}x fewer",
            ratio >= 20)
    else:
        add(name, None, "not measured", None)
    name = f"Unseen tasks, k={TARGET_K}: TA-LoRA above PT and MPT"
    ta_k = _mean(data, "unseen_tasks", "ta-lora", TARGET_K)
    others = {k: v for k in ("pt", "mpt") if (v := _mean(data, "unseen_tasks", k, TARGET_K)) is not None}
    if ta_k is None or not others:
        add(name, None, "not measured", None, f"needs k={TARGET_K} in --shots")
    else:
        diff = 100 * (ta_k - max(others.values()))
        text = f"{100 * ta_k:.1f} vs " + ", ".join(f"{k} {100 * v:.1f}" for k, v in others.items()) + f": {diff:+.1f} points"
        add(name, diff, text, diff > 0, "" if len(others) == 2 else f"only {', '.join(others)} measured")
    speed = data.get("speed") or {}
    name = "Generation: TA-LoRA >= 0.97x the base model's tokens/s"
    ratio = ((speed.get("generation") or {}).get("ratios") or {}).get("ta-lora / base")
    add(name, ratio, "not measured" if ratio is None else f"{ratio:.3f}x", None if ratio is None else ratio >= 0.97)
    name = "A batch of 64 distinct tasks: <= 1.02x the step time of a one-task batch"
    ratio = next(iter(((speed.get("task_batch") or {}).get("ratios") or {}).values()), None)
    add(name, ratio, "not measured" if ratio is None else f"{ratio:.3f}x", None if ratio is None else ratio <= 1.02)
    return out


# ----------------------------------------------------------------------------- formatting
def fmt_acc(entry: Optional[dict]) -> str:
    if entry is None:
        return "-"
    text = f"{100 * entry['mean']:.1f}"
    if entry["n"] > 1:
        text += f" ± {100 * entry['std']:.1f} ({100 * entry['min']:.1f}-{100 * entry['max']:.1f})"
    return text


def label(data: dict, key: str) -> str:
    return data["methods"].get(key, {}).get("label", key)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def targets_text(data: dict) -> str:
    lines = ["Targets:"]
    for t in data.get("targets", []):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"  {verdict:<12} {t['target']}: {t['measured_text']}")
    return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def render(data: dict, plots: list[str]) -> str:
    meta, plan, settings = data["meta"], data["plan"], data["meta"]["settings"]
    mach, vers = meta["machine"], meta["versions"]
    seeds = plan["seeds"]
    main = [k for k in plan["methods"] if "/" not in k]
    out = ["# Benchmark results", "",
           "Generated by `benchmarks/run.py` from `results.json`; regenerate instead of editing. "
           "What is compared and how: `docs/benchmarks.md` and the Protocol section below.", ""]
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
        f"task, texts cut to {settings['max_text_tokens']} tokens, `full` = at most {settings['full_cap'] or 'all'} rows",
        "",
    ]
    n_eval = settings["eval_per_task"]
    out += ["## Targets", "",
            f"Accuracy differences are in points (percent). With {n_eval} test examples per task one example moves a "
            f"task's accuracy by {100 / n_eval:.1f} points"
            + (" and with one seed there is no spread to judge noise by; treat small differences as noise."
               if len(seeds) == 1 else "; compare differences with the spreads in the tables below."), ""]
    rows = []
    for t in data.get("targets", []):
        verdict = {True: "**met**", False: "**missed**", None: "not measured"}[t["met"]]
        rows.append([t["target"], t["measured_text"], verdict + (f" ({t['note']})" if t["note"] else "")])
    out += table(["target", "measured", "result"], rows) + [""]
    missed = [t["target"] for t in data.get("targets", []) if t["met"] is False]
    out += [("Missed: " + "; ".join(missed) + ".") if missed else "No target was missed among those measured.", ""]

    # quality: unseen data
    q = data.get("quality", {})
    spread = "mean ± sample std (min-max) over seeds" if len(seeds) > 1 else "one seed"
    out += ["## Quality: unseen data", "",
            f"Rank-classification accuracy (%) on the source tasks' held-out test subsets after multi-task training; "
            f"{spread}. Same training rows, order and step count for every method.", ""]
    zero = data.get("zero_shot", {})
    header = ["method", "average", *plan["tasks"]]
    rows = []
    if zero:
        src = [zero[t] for t in plan["tasks"] if t in zero]
        rows.append(["Base model, zero-shot", f"{100 * sum(src) / len(src):.1f}" if src else "-",
                     *[f"{100 * zero[t]:.1f}" if t in zero else "-" for t in plan["tasks"]]])
    for key in main:
        per_task = q.get("unseen_data_per_task", {}).get(key, {})
        rows.append([label(data, key), fmt_acc(q["unseen_data"].get(key)), *[fmt_acc(per_task.get(t)) for t in plan["tasks"]]])
    out += table(header, rows) + [""]

    # quality: unseen tasks
    shots = plan["shots"]
    if plan["targets"] and shots:
        out += ["## Quality: unseen tasks", "",
                f"Accuracy (%) on the target tasks' test subsets after learning each target from k examples per label "
                f"(`full`: the training split, at most {settings['full_cap'] or 'all'} rows) for {settings['target_steps']} "
                f"steps, averaged over the target tasks; {spread}. Protocols per method: see Protocol.", ""]
        header = ["method", *[f"k={s}" if s != "full" else "full" for s in shots]]
        rows = []
        if zero:
            tgt = [zero[t] for t in plan["targets"] if t in zero]
            rows.append(["Base model, zero-shot", *([f"{100 * sum(tgt) / len(tgt):.1f}" if tgt else "-"] * len(shots))])
        for key in main:
            rows.append([label(data, key), *[fmt_acc(q["unseen_tasks"].get(key, {}).get(s)) for s in shots]])
        out += table(header, rows) + [""]
        if len(plan["targets"]) > 1:
            out += ["Per target task:", ""]
            header = ["method", *[f"{t} k={s}" for t in plan["targets"] for s in shots]]
            rows = [[label(data, key), *[fmt_acc(q["unseen_tasks_per_target"].get(key, {}).get(s, {}).get(t))
                                         for t in plan["targets"] for s in shots]] for key in main]
            out += table(header, rows) + [""]

    # ablations
    abl = data.get("ablations", {})
    if abl:
        out += ["## Ablations (TA-LoRA)", "",
                "Each variant changes one thing of TA-LoRA and keeps the data, order and step budget. "
                "Unseen-data average accuracy (%); delta vs full TA-LoRA in points.", ""]
        ab_shots = plan["ablation_shots"]
        header = ["variant", "unseen data", "delta vs TA-LoRA", *[f"unseen tasks k={s}" for s in ab_shots]]
        rows = []
        if "ta-lora" in q.get("unseen_data", {}):
            rows.append(["TA-LoRA (full method)", fmt_acc(q["unseen_data"]["ta-lora"]), "0.0",
                         *[fmt_acc(q["unseen_tasks"].get("ta-lora", {}).get(s)) for s in ab_shots]])
        for key, entry in abl.items():
            delta = entry["delta_vs_ta_lora"]
            rows.append([label(data, key), fmt_acc(entry["unseen_data"]), "-" if delta is None else f"{100 * delta:+.1f}",
                         *[fmt_acc(entry["unseen_tasks"].get(s)) for s in ab_shots]])
        out += table(header, rows) + [""]

    # parameters
    params = data.get("parameters", {})
    if params:
        out += ["## Trainable parameters", "",
                f"Counted from models built with {meta['model']}'s shapes and the benchmark's configs. **Per task**: how "
                "much the trainable count grows when one more task is configured; **shared**: the rest. Single-task "
                "methods (PT, AdaptionPrompt, LoRA) do not grow with tasks, so by convention all their parameters are per "
                "task (one adapter per task) and none are shared. **Per unseen task**: what trains for a new task under "
                "the method's unseen-task protocol.", ""]
        lora_pt = params.get("lora", {}).get("per_task")
        rows = []
        for key in [k for k in main if k in params]:
            p = params[key]
            rows.append([label(data, key), f"{p['per_task']:,}", f"{p['shared']:,}", f"{p['per_unseen_task']:,}",
                         f"{p['total']:,}", f"{lora_pt / p['per_task']:.1f}x" if lora_pt else "-"])
        out += table(["method", "per task", "shared", "per unseen task",
                      f"total ({len(plan['tasks'])} source tasks)", "LoRA per task / this"], rows) + [""]

    # speed
    speed = data.get("speed")
    out += ["## Speed and memory", ""]
    if not speed:
        out += ["Not measured (`--skip-speed` and no earlier measurement).", ""]
    else:
        ts, gen, tb = speed["train_step"], speed["generation"], speed["task_batch"]
        out += [f"Ratios of variants measured side by side, interleaved, median of {speed['repeats']} repeats after a "
                f"warm-up (measured {speed['date']}). Lower is better for time and memory, higher for tokens/s.", ""]
        rows = [
            [f"training step, batch {ts['batch_shape']} (TA-LoRA mixed-task)", "TA-LoRA / LoRA",
             f"{ts['ratios']['ta-lora / lora']:.3f}x", f"{ts['median_s']['ta-lora']:.2f} s vs {ts['median_s']['lora']:.2f} s"],
            ["", "TA-LoRA / AdaptionPrompt", f"{ts['ratios']['ta-lora / adaption-prompt']:.3f}x",
             f"{ts['median_s']['ta-lora']:.2f} s vs {ts['median_s']['adaption-prompt']:.2f} s"],
            [f"generation, batch {gen['batch_size']}, {gen['new_tokens']} new tokens (greedy)", "TA-LoRA / base tokens/s",
             f"{gen['ratios']['ta-lora / base']:.3f}x",
             f"{gen['median_tokens_per_s']['ta-lora']:.1f} vs {gen['median_tokens_per_s']['base']:.1f} tokens/s"],
            ["", "AdaptionPrompt / base tokens/s", f"{gen['ratios']['adaption-prompt / base']:.3f}x",
             f"{gen['median_tokens_per_s']['adaption-prompt']:.1f} tokens/s"],
        ]
        if "mtl-lora / lora" in ts["ratios"]:  # measured since MTL-LoRA joined the speed runs
            rows.insert(2, ["", "MTL-LoRA / LoRA (MTL-LoRA mixed-task)", f"{ts['ratios']['mtl-lora / lora']:.3f}x",
                            f"{ts['median_s']['mtl-lora']:.2f} s vs {ts['median_s']['lora']:.2f} s"])
            rows.append(["", "MTL-LoRA / base tokens/s", f"{gen['ratios']['mtl-lora / base']:.3f}x",
                         f"{gen['median_tokens_per_s']['mtl-lora']:.1f} tokens/s"])
        many = next(iter(tb["ratios"]))
        rows.append([f"TA-LoRA training step, batch {tb['batch_shape']}, {tb['num_tasks']} tasks configured", many,
                     f"{tb['ratios'][many]:.3f}x", " vs ".join(f"{v:.2f} s" for v in tb["median_s"].values())])
        rows += [
            [f"training memory, batch {ts['batch_shape']}", "TA-LoRA / LoRA", f"{ts['memory_ratios']['ta-lora / lora']:.3f}x",
             " vs ".join(_gib(ts["memory"][k]["total_bytes"]) for k in ("ta-lora", "lora"))],
            ["", "TA-LoRA / AdaptionPrompt", f"{ts['memory_ratios']['ta-lora / adaption-prompt']:.3f}x",
             " vs ".join(_gib(ts["memory"][k]["total_bytes"]) for k in ("ta-lora", "adaption-prompt"))],
            *([["", "MTL-LoRA / LoRA", f"{ts['memory_ratios']['mtl-lora / lora']:.3f}x",
                " vs ".join(_gib(ts["memory"][k]["total_bytes"]) for k in ("mtl-lora", "lora"))]]
              if "mtl-lora / lora" in ts["memory_ratios"] else []),
            [f"training memory, batch {tb['batch_shape']}", many, f"{tb['memory_ratios'][many]:.3f}x",
             " vs ".join(_gib(v["total_bytes"]) for v in tb["memory"].values())],
        ]
        out += table(["measurement", "ratio", "value", "medians / sizes"], rows) + [""]
        out += ["Memory is what a training step holds beyond the frozen base weights: the bytes of the tensors autograd "
                "saves for backward during one training forward (found with `torch.autograd.graph.saved_tensors_hooks`, "
                "each storage counted once, parameter storages excluded), plus parameters, gradients and the two AdamW "
                "moments of the trainable weights. It is an exact count of those tensors, not a process peak "
                "(`ru_maxrss` is process-wide and never goes down, so it cannot compare variants in one process); "
                "transient buffers freed within the forward are not in it."
                + (" On the GPU the CUDA peak over a step is in `results.json`." if "cuda_device" in mach else ""), ""]

    # protocol
    out += ["## Protocol", "",
            "- **Data.** Each source task contributes the same stratified training examples (per seed); the mixture is "
            "shuffled with the seed and cut to exactly steps x batch rows; Trainer's sequential sampler feeds every method "
            "the same batch at every step. Unseen-task rows (k per label, or `full`) are streamed the same way. Test "
            "subsets are fixed (seed 0) for all methods and seeds.",
            "- **Training.** `peft_talora.training.build_trainer` (a stock `Trainer`) for every method: AdamW, linear "
            "decay, no weight decay, the same batch size and steps; TA-LoRA gets its fast/slow parameter groups "
            "(fast = 4x, `fast_lr_ratio`), other methods Trainer's own AdamW. TA-LoRA's shared warm-up "
            "(`set_training_stage('shared_warmup')`) uses the first warm-up steps of the same budget, then "
            "`multi_task` the rest (each phase its own linear schedule).",
            "- **Evaluation.** `peft_talora.suite.evaluate_task` (rank classification over the label words, the same "
            "prompts as training); `task_id` is passed only to methods that route tasks (TA-LoRA and MTL-LoRA by name, "
            "MPT and Poly by id), never to the others.",
            "- **Learning rates** (not tuned per method; prompt methods at the main job's 1e-2, LoRA-style methods "
            "at PEFT's usual 1e-3; `--lr` overrides):", ""]
    out += table(["method", "learning rate", "task routing", "unseen-task protocol"],
                 [[label(data, k), f"{data['methods'][k]['lr']:g}", data["methods"][k]["routes"] or "none",
                   data["methods"][k]["unseen_tasks"]] for k in main]) + [""]
    notes = list(data.get("notes", []))
    for key, run in sorted(data["runs"].items()):
        if key in plan["runs"] and run.get("fingerprint") == plan["runs"][key]:
            if "error" in run:
                notes.append(f"`{key}` failed: {run['error']}")
            elif "skipped" in run:
                notes.append(f"`{key}` skipped: {run['skipped']}")
    missing = [k for k in plan["runs"] if k not in data["runs"]
               or data["runs"][k].get("fingerprint") != plan["runs"][k]]
    if missing:
        notes.append(f"{len(missing)} planned runs have no result yet (e.g. `{missing[0]}`); rerun the command to finish.")
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots
def plot(data: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    plan, q = data["plan"], data.get("quality", {})
    main = [k for k in plan["methods"] if "/" not in k]
    names = [label(data, k) for k in main]

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    means = [100 * (q["unseen_data"].get(k) or {}).get("mean", 0) for k in main]
    errs = [100 * ((q["unseen_data"].get(k) or {}).get("std") or 0) for k in main]
    axes[0].bar(range(len(main)), means, yerr=errs, capsize=3, color="tab:blue")
    axes[0].set_xticks(range(len(main)), names, rotation=30, ha="right")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_title("unseen data (source tasks)")
    zero = data.get("zero_shot", {})
    src = [zero[t] for t in plan["tasks"] if t in zero]
    if src:
        axes[0].axhline(100 * sum(src) / len(src), color="gray", linestyle="--", label="base zero-shot")
        axes[0].legend()
    shots = plan["shots"]
    for key, name in zip(main, names):
        ys = [(q["unseen_tasks"].get(key, {}).get(s) or {}).get("mean") for s in shots]
        xs = [i for i, y in enumerate(ys) if y is not None]
        if xs:
            axes[1].plot(xs, [100 * ys[i] for i in xs], marker="o", label=name)
    axes[1].set_xticks(range(len(shots)), [f"k={s}" if s != "full" else "full" for s in shots])
    axes[1].set_ylabel("accuracy (%)")
    axes[1].set_title("unseen tasks (average over targets)")
    if any(axes[1].get_lines()):
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "quality.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    abl = data.get("ablations", {})
    if abl:
        keys = ["ta-lora", *abl] if "ta-lora" in q.get("unseen_data", {}) else list(abl)
        fig, ax = plt.subplots(figsize=(8, 4))
        vals = [100 * (q["unseen_data"].get(k) or {}).get("mean", 0) for k in keys]
        errs = [100 * ((q["unseen_data"].get(k) or {}).get("std") or 0) for k in keys]
        ax.barh(range(len(keys)), vals, xerr=errs, capsize=3, color="tab:green")
        ax.set_yticks(range(len(keys)), [label(data, k) for k in keys], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("unseen-data accuracy (%)")
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
    return paths


def write(data: dict, out: Path) -> list[Path]:
    out = Path(out)
    plots = plot(data, out)
    path = out / "RESULTS.md"
    path.write_text(render(data, [str(p) for p in plots]))
    return [path, *plots]


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results.json"
    loaded = json.loads(source.read_text())
    summarize(loaded)
    for written in write(loaded, source.parent):
        print(f"wrote {written}")
