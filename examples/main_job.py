"""Main job: TA-LoRA on the embedded SmolLM2-135M and the packaged 8 + 4 task suite.

1. zero-shot macro-F1 and accuracy of the base model (source and target tasks);
2. shared warm-up (task part off), then multi-task training on the 8 source tasks with the stock
   ``Trainer`` (fast/slow learning rates, orthogonality penalty, periodic evaluation);
3. unseen data: each source task's held-out test examples;
4. unseen tasks: each target task is added to the trained adapter (``add_tasks``, freeze mode;
   it starts exactly at the base model) and trained on k examples per label, ending at its lowest
   loss on held-out validation rows among the start, the middle and the last step;
5. a peer trained the same way on each target (``--peers pt``: PEFT prompt tuning on the base
   model, same shots, steps, batch and early stopping as step 4, at its own learning rate);
6. a table on stdout, ``results.json``, ``results.png`` and the adapter in ``--output-dir``.

Macro-F1 leads and accuracy stands beside it: the test subsets are small and imbalanced while
the shots are balanced, so accuracy mostly measures the label prior (``docs/data.md``). Every
average carries a 95% percentile-bootstrap interval over the test rows, and TA-LoRA's
differences from the base model and the peer a paired one (``peft_talora.suite.intervals``).

    python examples/main_job.py                 # defaults: under 30 minutes on 2 CPU cores
    python examples/main_job.py --steps 300 --train-per-task 256 --eval-per-task 200   # longer
    python examples/main_job.py --tasks sms_spam trec --targets pubmedqa                # partial
    python examples/main_job.py --tiny          # tiny random model, seconds, in outputs/main_job_tiny (tests)

Every phase stores its product in ``--output-dir``; interrupting and rerunning resumes (finished
phases are skipped, training continues from its last checkpoint). ``--fresh`` starts over. A rerun
may add targets and peers; one with other settings is refused (its results would mix with the stored ones).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import datasets
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import peft_talora  # noqa: F401  (registers TA-LoRA with PEFT)
from peft_talora import TALoraConfig
from peft_talora.smollm2 import load_model
from peft_talora.suite import SOURCE_TASKS, TARGET_TASKS, evaluate_task, format_split, load_task, subsample
from peft_talora.suite.intervals import TaskRuns, bootstrap_interval, has_rows, paired_difference
from peft_talora.training import KeepBestCallback, build_trainer
from peft_talora.training.collator import MultiTaskDataCollator, k_shot, tokenize_for_causal_lm

SYSTEM_PROMPT = "You are a precise text classifier."  # short: every token costs time on a CPU
PT_INIT_TEXT = "Classify the text into one of the given labels."  # the benchmark's PT init text
METHODS = {"base": "base zero-shot", "ta-lora": "TA-LoRA", "pt": "PEFT prompt tuning", "lora": "PEFT LoRA"}
PEERS = ("pt", "lora")
SETTINGS = {"unseen_data": "source tasks (unseen data)", "unseen_tasks": "target tasks (unseen tasks)"}


# ----------------------------------------------------------------------------- data
def training_rows(tasks, tokenizer, per_task: int, split: str, seed: int, max_text_tokens: int) -> datasets.Dataset:
    """Prompt/completion/task rows of ``per_task`` stratified examples of each task, shuffled together."""
    parts = []
    for name in tasks:
        rows = subsample(load_task(name)[split], per_task, seed=seed)
        parts.append(format_split(rows, tokenizer, max_text_tokens=max_text_tokens, system_prompt=SYSTEM_PROMPT))
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)


def evaluate(model, tokenizer, tasks, per_task: int, seed: int, max_text_tokens: int, route: bool) -> dict:
    """Rank-classification macro-F1 and accuracy per task on ``per_task`` held-out test examples.

    Each record keeps the per-row predictions, so averages and differences get bootstrap intervals.
    """
    results = {}
    for name in tasks:
        test = subsample(load_task(name)["test"], per_task, seed=seed)
        result = evaluate_task(
            model,
            tokenizer,
            test,
            task=name,
            task_id=name if route else None,
            batch_size=8,
            max_text_tokens=max_text_tokens,
            system_prompt=SYSTEM_PROMPT,
            progress=True,
        )
        results[name] = result.metrics()
        print(f"  {name:<18} {result.summary()}")
    return results


# ----------------------------------------------------------------------------- training
def train_phase(
    model, tokenizer, train_rows, folder: Path, steps: int, args, eval_rows=None, route=True, lr=None, keep_best=False
):
    """One ``Trainer`` run that checkpoints into ``folder`` and resumes from its last checkpoint.

    ``route=False`` (a single-task peer such as prompt tuning): the rows' ``task_ids`` are dropped.
    ``keep_best=True`` (a few-shot stage, minutes): the loss on ``eval_rows`` is measured at the start and
    every ``steps // 2`` steps, and training ends at the best of those points (:class:`KeepBestCallback`),
    so it never ends worse on the held-out rows than where it started; no checkpoints (an interrupted
    stage is run again). Returns the callback (``best_step``, ``best_metric``) or ``None``.
    """
    names = model if route else sorted(set(train_rows["task_ids"]))
    train = tokenize_for_causal_lm(train_rows, tokenizer, task_names=names)
    evaluation = tokenize_for_causal_lm(eval_rows, tokenizer, task_names=names) if eval_rows is not None else None
    collator = None
    if not route:
        train = train.remove_columns("task_ids")
        evaluation = evaluation.remove_columns("task_ids") if evaluation is not None else None
        collator = MultiTaskDataCollator(tokenizer=tokenizer)
    every = max(1, steps // 4)
    keep = KeepBestCallback() if keep_best else None
    training_args = TrainingArguments(
        output_dir=str(folder),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr if lr is None else lr,
        warmup_steps=min(5, steps // 10),
        logging_steps=max(1, every // 2),
        save_strategy="no" if keep_best else "steps",
        save_steps=every,
        save_total_limit=1,
        seed=args.seed,
        eval_strategy="steps" if evaluation is not None else "no",
        eval_steps=max(1, steps // 2),
        eval_on_start=keep_best,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = build_trainer(
        model,
        training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=collator,
        task_sampling=args.task_sampling if route else None,
        callbacks=[keep] if keep else None,
    )
    resume = get_last_checkpoint(str(folder)) if folder.is_dir() and not keep_best else None
    trainer.train(resume_from_checkpoint=resume)
    return keep


def train_target(model, tokenizer, name: str, folder: Path, args, lr: float, route: bool):
    """A target stage (TA-LoRA's new task or a peer): ``--shots`` per label of the train split for
    ``--target-steps``, ending at the best loss on ``--target-val-rows`` rows of the validation split
    (disjoint from the shots and the test rows; 0 rows: no early stopping). Returns the callback or ``None``."""
    fmt = dict(task=name, max_text_tokens=args.max_text_tokens, system_prompt=SYSTEM_PROMPT)
    rows = format_split(k_shot(load_task(name)["train"], args.shots, seed=args.seed), tokenizer, **fmt)
    val = None
    if args.target_val_rows:
        val = format_split(
            subsample(load_task(name)["validation"], args.target_val_rows, seed=args.seed), tokenizer, **fmt
        )
    return train_phase(
        model, tokenizer, rows, folder, args.target_steps, args, val, route, lr, keep_best=val is not None
    )


def record_stopping(record: dict, keep: Optional[KeepBestCallback], steps: int) -> None:
    """Store and print where a target stage ended: the chosen step (0: its start), the held-out loss per step."""
    if keep is None:
        return
    curve = {str(step): loss for step, loss in keep.history.items()}
    record["stopping"] = {"steps": steps, "chosen_step": keep.best_step, "validation_loss": curve}
    print(f"  stopped at step {keep.best_step} of {steps} (validation loss {keep.best_metric:.4f})")


def talora_config(tasks, args) -> TALoraConfig:
    return TALoraConfig(
        task_type="CAUSAL_LM", task_names=list(tasks), num_virtual_tokens=args.virtual_tokens, r=args.rank
    )


def prompt_tuning_config(tokenizer, args) -> PromptTuningConfig:
    """PEFT prompt tuning with as many virtual tokens as TA-LoRA, initialised from a task-neutral text."""
    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=args.virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=PT_INIT_TEXT,
        tokenizer_name_or_path=tokenizer.name_or_path,
    )


def peer_config(peer: str, tokenizer, args):
    """A peer's PEFT config: prompt tuning (as above) or LoRA r=8 on q/v (PEFT's usual setting)."""
    if peer == "pt":
        return prompt_tuning_config(tokenizer, args)
    return LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])


def peer_lr(peer: str, args) -> float:
    return args.lora_lr if peer == "lora" else args.pt_lr


# ----------------------------------------------------------------------------- report
def method_records(results: dict, method: str, setting: str) -> dict:
    """``{task: evaluation record}`` of ``method`` (base, ta-lora, pt) in ``setting`` (unseen_data, unseen_tasks)."""
    tasks = results["source_tasks"] if setting == "unseen_data" else results["target_tasks"]
    if method == "base":
        found = results.get("zero_shot", {})
    elif method == "ta-lora":
        found = results.get(setting, {})
    else:
        found = results.get("peers", {}).get(method, {}) if setting == "unseen_tasks" else {}
    return {t: found[t] for t in tasks if t in found}


def average(records: dict) -> dict:
    """Macro-F1 and accuracy averaged over tasks, each with its bootstrap interval over the test rows.

    Records cached before per-row predictions were kept get the plain mean and no interval.
    """
    if not records:
        return {}
    rows = all(has_rows(r) for r in records.values())
    out = {"tasks": len(records)}
    for metric in ("macro_f1", "accuracy"):
        if rows:
            out[metric] = bootstrap_interval([TaskRuns.from_records([r]) for r in records.values()], metric).as_dict()
        else:
            values = [r[metric] for r in records.values()]
            out[metric] = {"estimate": sum(values) / len(values), "low": None, "high": None, "resampled": None}
    return out


def difference(a: dict, b: dict) -> dict:
    """``a - b`` over the tasks both have, with a paired bootstrap interval (same rows drawn for both)."""
    tasks = [t for t in a if t in b]
    if not tasks or not all(has_rows(a[t]) and has_rows(b[t]) for t in tasks):
        return {}
    runs = lambda records: [TaskRuns.from_records([records[t]]) for t in tasks]  # noqa: E731
    return {
        "tasks": len(tasks),
        **{m: paired_difference(runs(a), runs(b), m).as_dict() for m in ("macro_f1", "accuracy")},
    }


def summarize(results: dict) -> None:
    """Fill ``results["averages"]`` and ``results["differences"]`` (recomputed from the per-task records)."""
    averages, differences = {}, {}
    for setting in SETTINGS:
        records = {m: method_records(results, m, setting) for m in METHODS}
        averages[setting] = {m: average(r) for m, r in records.items() if r}
        differences[setting] = {
            f"ta-lora - {other}": d for other in ("base", *PEERS)
            if (d := difference(records["ta-lora"], records[other]))
        }  # fmt: skip
    results["averages"], results["differences"] = averages, differences


def fmt_interval(entry: dict, signed: bool = False) -> str:
    if not entry:
        return "-"
    sign = "+" if signed else ""
    text = f"{100 * entry['estimate']:{sign}.1f}"
    if entry.get("low") is not None:
        text += f" [{100 * entry['low']:{sign}.1f}, {100 * entry['high']:{sign}.1f}]"
    return text


def fmt_cell(record) -> str:
    """A task's cell: macro-F1 [interval] / accuracy, in points."""
    if not record:
        return "-"
    interval = record.get("macro_f1_interval")
    text = f"{100 * record['macro_f1']:.1f}"
    if interval:
        text += f" [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]"
    return text + f" / {100 * record['accuracy']:.1f}"


def report(results: dict, out: Path) -> None:
    """Print the table and write ``results.json`` and ``results.png``."""
    summarize(results)
    methods = [m for m in METHODS if any(method_records(results, m, s) for s in SETTINGS)]
    print(
        "\nMacro-F1 [95% bootstrap interval over the test rows] / accuracy, in points (%). Macro-F1 leads: "
        "accuracy on these small imbalanced test sets mostly measures the label prior."
    )
    sizes = sorted({r["n"] for s in SETTINGS for m in methods for r in method_records(results, m, s).values()})
    if sizes:
        print(
            "test rows per task: "
            + ", ".join(str(n) for n in sizes)
            + f" (one row = {', '.join(f'{100 / n:.1f}' for n in sizes)} accuracy points)"
        )
    width = 26
    print(f"\n{'setting':<22}{'task':<18}" + "".join(f"{METHODS[m]:>{width}}" for m in methods))
    for setting, label in (("unseen_data", "source (unseen data)"), ("unseen_tasks", f"target (k={results['shots']})")):
        records = {m: method_records(results, m, setting) for m in methods}
        tasks = results["source_tasks"] if setting == "unseen_data" else results["target_tasks"]
        for name in tasks:
            print(f"{label:<22}{name:<18}" + "".join(f"{fmt_cell(records[m].get(name)):>{width}}" for m in methods))
    for setting, label in SETTINGS.items():
        averages = results["averages"].get(setting, {})
        if not averages:
            continue
        print(f"\naverage over the {label}, macro-F1 and accuracy [95% interval]:")
        for method, entry in averages.items():
            print(
                f"  {METHODS[method]:<30} macro-F1 {fmt_interval(entry['macro_f1']):<22}"
                f" accuracy {fmt_interval(entry['accuracy'])}"
            )
        for name, entry in results["differences"].get(setting, {}).items():
            other = METHODS[name.split(" - ")[1]]
            print(
                f"  {'TA-LoRA - ' + other:<30} macro-F1 {fmt_interval(entry['macro_f1'], True):<22}"
                f" accuracy {fmt_interval(entry['accuracy'], True)}  (paired)"
            )
        if any(e["macro_f1"].get("low") is None for e in averages.values()):
            print("  (no interval where cached results lack per-row predictions: rerun with --fresh)")
    stops = {}
    for method in methods:
        records = method_records(results, method, "unseen_tasks")
        if records and all("stopping" in r for r in records.values()):
            stops[method] = ", ".join(f"{t} {r['stopping']['chosen_step']}" for t, r in records.items())
    if stops:
        steps = results["settings"]["target_steps"]
        print(
            f"\nstep each target stage ended at (lowest validation loss at 0, {steps // 2} and {steps}; 0 = its start):"
        )
        for method, chosen in stops.items():
            print(f"  {METHODS[method]:<30} {chosen}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, methods, out / "results.png")
    print(f"wrote {out / 'results.json'}, {out / 'results.png'}; adapter in {out / 'adapter'}")


def _errors(values, intervals):
    """matplotlib's asymmetric ``yerr`` from intervals (0 where there is none)."""
    below = [v - lo if lo is not None else 0 for v, (lo, _) in zip(values, intervals)]
    above = [hi - v if hi is not None else 0 for v, (_, hi) in zip(values, intervals)]
    return [below, above]


def plot(results: dict, methods: list, path: Path) -> None:
    """Macro-F1 (left) and accuracy (right) per task and on average, bars with 95% bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(n, "unseen_data") for n in results["source_tasks"]] + [
        (n, "unseen_tasks") for n in results["target_tasks"]
    ]
    groups += [(f"average {s.split()[0]}", setting) for setting, s in SETTINGS.items()]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, len(groups) * 1.3), 4.5), sharey=True)
    bar = 0.8 / len(methods)
    for ax, metric, title in zip(axes, ("macro_f1", "accuracy"), ("macro-F1 (lead metric)", "accuracy (beside it)")):
        for i, method in enumerate(methods):
            x, values, intervals = [], [], []
            for g, (name, setting) in enumerate(groups):
                if name.startswith("average "):
                    entry = results["averages"].get(setting, {}).get(method, {}).get(metric)
                    value = entry and entry["estimate"]
                    low, high = (entry["low"], entry["high"]) if entry else (None, None)
                else:
                    record = method_records(results, method, setting).get(name)
                    value = record and record[metric]
                    low, high = (record or {}).get(f"{metric}_interval") or (None, None)
                if value is None:  # e.g. the peer on source tasks: no bar
                    continue
                x.append(g + (i - (len(methods) - 1) / 2) * bar)
                values.append(100 * value)
                intervals.append((None if low is None else 100 * low, None if high is None else 100 * high))
            ax.bar(x, values, width=bar, label=METHODS[method], yerr=_errors(values, intervals), capsize=2)
        ax.set_xticks(range(len(groups)), [name for name, _ in groups], rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("points (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Bars: 95% percentile-bootstrap intervals over the test rows", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- the job
#: Flags a rerun may change and still resume: where to write, and which targets and peers to add (each is stored
#: under its own name). Every other flag shapes results already stored.
RESUMABLE_CHANGES = ("output_dir", "fresh", "targets", "peers")


def check_resumable(stored: Optional[dict], now: dict, out: Path) -> None:
    """Refuse to resume ``out`` with flags that would mix its stored results with other settings' (a ``--tiny`` run's
    numbers as SmolLM2's, a 2-task adapter evaluated on 8 tasks). Flags an older version did not store pass."""
    if not stored:
        return
    changed = sorted(k for k in now if k in stored and k not in RESUMABLE_CHANGES and stored[k] != now[k])
    if changed:
        listed = ", ".join(f"--{k.replace('_', '-')} {stored[k]!r} -> {now[k]!r}" for k in changed)
        raise SystemExit(
            f"{out} holds results made with other settings ({listed}); rerunning would mix them. Pass --fresh to "
            "start over there, or another --output-dir."
        )


def run(args) -> dict:
    out = Path(args.output_dir)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "results.json"
    results = json.loads(state_file.read_text()) if state_file.exists() else {}
    check_resumable(results.get("settings"), vars(args), out)
    results.update(
        source_tasks=list(args.tasks), target_tasks=list(args.targets), shots=args.shots, settings=vars(args)
    )
    results.setdefault("zero_shot", {})

    def save():
        state_file.write_text(json.dumps(results, indent=2))

    start = time.time()
    print("loading the tasks (built once, then cached) and the model ...")
    for name in [*args.tasks, *args.targets]:
        load_task(name)
    base, tokenizer = load_model(tiny=args.tiny)
    mtl = dict(seed=args.seed, max_text_tokens=args.max_text_tokens)

    # a record cached before per-row predictions were kept is evaluated again (no training, seconds per task)
    todo = [t for t in [*args.tasks, *args.targets] if not has_rows(results["zero_shot"].get(t))]
    if todo:
        print("\n[1/5] zero-shot macro-F1 and accuracy of the base model")
        results["zero_shot"].update(evaluate(base, tokenizer, todo, args.eval_per_task, route=False, **mtl))
        save()

    adapter = out / "adapter"
    if not (adapter / "adapter_model.safetensors").exists():
        model = get_peft_model(base, talora_config(args.tasks, args))
        model.print_trainable_parameters()
        warm = out / "adapter_warmup"
        if args.warmup_steps and not (warm / "adapter_model.safetensors").exists():
            print(f"\n[2/5] shared warm-up: {args.warmup_steps} steps, task part off")
            model.set_training_stage("shared_warmup")
            rows = training_rows(args.tasks, tokenizer, args.train_per_task, "train", **mtl)
            train_phase(model, tokenizer, rows, out / "checkpoints_warmup", args.warmup_steps, args)
            model.save_pretrained(warm)
        elif args.warmup_steps:
            model.load_adapter(warm, adapter_name="default", is_trainable=True)
        print(f"\n[2/5] multi-task training: {args.steps} steps on {len(args.tasks)} tasks")
        model.set_training_stage("multi_task")
        rows = training_rows(args.tasks, tokenizer, args.train_per_task, "train", **mtl)
        val = training_rows(args.tasks, tokenizer, max(2, args.eval_per_task // 8), "validation", **mtl)
        train_phase(model, tokenizer, rows, out / "checkpoints_multitask", args.steps, args, eval_rows=val)
        model.save_pretrained(adapter)
        base = model.base_model.unload()
        results.pop("unseen_data", None)
        save()

    unseen = results.get("unseen_data", {})
    if set(unseen) != set(args.tasks) or not all(has_rows(r) for r in unseen.values()):
        print("\n[3/5] unseen data: source-task test examples")
        model = PeftModel.from_pretrained(base, adapter)
        results["unseen_data"] = evaluate(model, tokenizer, args.tasks, args.eval_per_task, route=True, **mtl)
        base = model.base_model.unload()
        save()

    results.setdefault("unseen_tasks", {})
    for name in args.targets:
        if name in results["unseen_tasks"]:
            continue
        print(f"\n[4/5] unseen task {name}: k={args.shots} examples per label, new task factors only")
        model = PeftModel.from_pretrained(base, adapter)
        torch.manual_seed(args.seed)  # the new task's random u: the same in a fresh and in a resumed run
        model.add_tasks(
            [name]
        )  # freeze mode: shared parts and source tasks stay bit-identical; starts at the base model
        keep = train_target(model, tokenizer, name, out / f"checkpoints_{name}", args, args.target_lr, route=True)
        model.save_pretrained(out / f"adapter_{name}", tasks=[name])
        results["unseen_tasks"].update(evaluate(model, tokenizer, [name], args.eval_per_task, route=True, **mtl))
        record_stopping(results["unseen_tasks"][name], keep, args.target_steps)
        base = model.base_model.unload()
        save()

    for peer in args.peers:  # the same shots, steps, batch and early stopping as TA-LoRA's new task, on the base model
        done = results.setdefault("peers", {}).setdefault(peer, {})
        for name in args.targets:
            if name in done:
                continue
            print(
                f"\n[5/5] peer {METHODS[peer]} on {name}: k={args.shots} examples per label, {args.target_steps} steps"
            )
            torch.manual_seed(args.seed)
            model = get_peft_model(base, peer_config(peer, tokenizer, args))
            folder = out / f"checkpoints_{peer}_{name}"
            keep = train_target(model, tokenizer, name, folder, args, peer_lr(peer, args), route=False)
            done.update(evaluate(model, tokenizer, [name], args.eval_per_task, route=False, **mtl))
            record_stopping(done[name], keep, args.target_steps)
            base = model.unload() if peer == "lora" else model.get_base_model()
            save()

    results["elapsed_s"] = round(time.time() - start, 1)
    report(results, out)
    return results


def parse(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )  # no abbreviations: --tiny must see every flag given by its name
    parser.add_argument("--tiny", action="store_true", help="tiny random model and tiny budgets (smoke test)")
    parser.add_argument("--tasks", nargs="+", default=list(SOURCE_TASKS), help="source tasks")
    parser.add_argument("--targets", nargs="*", default=list(TARGET_TASKS), help="unseen target tasks")
    parser.add_argument(
        "--peers",
        nargs="*",
        default=["pt"],
        choices=list(PEERS),
        help="peers trained on each target like TA-LoRA's new task (pt: PEFT prompt tuning, lora: PEFT LoRA r=8 "
        "on q/v at --lora-lr; '--peers' alone: none)",
    )
    parser.add_argument("--train-per-task", type=int, default=48)
    parser.add_argument("--eval-per-task", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--target-steps", type=int, default=16, help="training steps per target task (and peer)")
    parser.add_argument(
        "--target-val-rows",
        type=int,
        default=24,
        help="held-out rows of each target's validation split: every target stage (TA-LoRA and the peers) ends at "
        "its lowest validation loss among its start, the middle and the last step (0: no early stopping)",
    )
    parser.add_argument(
        "--target-lr", type=float, default=3e-2, help="learning rate of TA-LoRA's new tasks (they start at c = 0)"
    )
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--pt-lr", type=float, default=1e-2, help="the prompt-tuning peer's learning rate")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="the LoRA peer's learning rate")
    parser.add_argument("--virtual-tokens", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-text-tokens", type=int, default=64)
    parser.add_argument("--task-sampling", default=None, choices=[None, "proportional", "temperature", "uncertainty"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="default: outputs/main_job (--tiny: outputs/main_job_tiny)")
    parser.add_argument("--fresh", action="store_true", help="delete --output-dir first instead of resuming")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = "outputs/main_job_tiny" if args.tiny else "outputs/main_job"
    overlap = sorted(set(args.tasks) & set(args.targets))
    if overlap:
        parser.error(f"{overlap} are both source tasks and targets; a target is a task the adapter has not seen.")
    if args.tiny:
        tiny = dict(
            train_per_task=4,
            eval_per_task=4,
            warmup_steps=1,
            steps=2,
            target_steps=2,
            shots=1,
            batch_size=4,
            target_val_rows=4,
        )
        given = sys.argv[1:] if argv is None else list(argv)
        for key, value in tiny.items():  # flags given on the command line keep their value
            flags = next(a.option_strings for a in parser._actions if a.dest == key)
            if not any(arg == flag or arg.startswith(flag + "=") for arg in given for flag in flags):
                setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    return run(parse(argv))


if __name__ == "__main__":
    main()
