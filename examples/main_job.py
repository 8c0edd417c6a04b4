"""Main job: TA-LoRA on the embedded SmolLM2-135M and the packaged 8 + 4 task suite.

1. zero-shot accuracy of the base model (source and target tasks);
2. shared warm-up (task part off), then multi-task training on the 8 source tasks with the stock
   ``Trainer`` (fast/slow learning rates, orthogonality penalty, periodic evaluation);
3. unseen data: accuracy on each source task's held-out test examples;
4. unseen tasks: each target task is added to the trained adapter (``add_tasks``, freeze mode)
   and trained on k examples per label;
5. a table on stdout, ``results.json``, ``results.png`` and the adapter in ``--output-dir``.

    python examples/main_job.py                 # defaults: under 30 minutes on 2 CPU cores
    python examples/main_job.py --steps 300 --train-per-task 256 --eval-per-task 200   # longer
    python examples/main_job.py --tasks sms_spam trec --targets pubmedqa                # partial
    python examples/main_job.py --tiny          # tiny random model, seconds (run by the tests)

Every phase stores its product in ``--output-dir``; interrupting and rerunning resumes (finished
phases are skipped, training continues from its last checkpoint). ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import datasets
import torch
from peft import PeftModel, get_peft_model
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import peft_talora  # noqa: F401  (registers TA-LoRA with PEFT)
from peft_talora import TALoraConfig
from peft_talora.data import k_shot, tokenize_for_causal_lm
from peft_talora.smollm2 import load_model
from peft_talora.suite import SOURCE_TASKS, TARGET_TASKS, evaluate_task, format_split, load_task, subsample
from peft_talora.training import build_trainer

SYSTEM_PROMPT = "You are a precise text classifier."  # short: every token costs time on a CPU


# ----------------------------------------------------------------------------- data
def training_rows(tasks, tokenizer, per_task: int, split: str, seed: int, max_text_tokens: int) -> datasets.Dataset:
    """Prompt/completion/task rows of ``per_task`` stratified examples of each task, shuffled together."""
    parts = []
    for name in tasks:
        rows = subsample(load_task(name)[split], per_task, seed=seed)
        parts.append(format_split(rows, tokenizer, max_text_tokens=max_text_tokens, system_prompt=SYSTEM_PROMPT))
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)


def evaluate(model, tokenizer, tasks, per_task: int, seed: int, max_text_tokens: int, route: bool) -> dict:
    """Rank-classification accuracy and macro-F1 per task on ``per_task`` held-out test examples."""
    results = {}
    for name in tasks:
        test = subsample(load_task(name)["test"], per_task, seed=seed)
        result = evaluate_task(
            model, tokenizer, test, task=name, task_id=name if route else None, batch_size=8,
            max_text_tokens=max_text_tokens, system_prompt=SYSTEM_PROMPT, progress=True,
        )
        results[name] = result.metrics()
        print(f"  {name:<18} accuracy {result.accuracy:.3f}  macro-F1 {result.macro_f1:.3f}")
    return results


# ----------------------------------------------------------------------------- training
def train_phase(model, tokenizer, train_rows, folder: Path, steps: int, args, eval_rows=None) -> None:
    """One ``Trainer`` run that checkpoints into ``folder`` and resumes from its last checkpoint."""
    train = tokenize_for_causal_lm(train_rows, tokenizer, task_names=model)
    evaluation = tokenize_for_causal_lm(eval_rows, tokenizer, task_names=model) if eval_rows is not None else None
    every = max(1, steps // 4)
    training_args = TrainingArguments(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=min(5, steps // 10),
        logging_steps=max(1, every // 2), save_steps=every, save_total_limit=1, seed=args.seed,
        eval_strategy="steps" if evaluation is not None else "no", eval_steps=max(1, steps // 2),
        report_to=[], use_cpu=True, dataloader_num_workers=0,
    )
    trainer = build_trainer(
        model, training_args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        task_sampling=args.task_sampling,
    )
    resume = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    trainer.train(resume_from_checkpoint=resume)


def talora_config(tasks, args) -> TALoraConfig:
    return TALoraConfig(task_type="CAUSAL_LM", task_names=list(tasks), num_virtual_tokens=args.virtual_tokens, r=args.rank)


# ----------------------------------------------------------------------------- report
def report(results: dict, out: Path) -> None:
    """Print the table and write ``results.json`` and ``results.png``."""
    rows = [("source (unseen data)", name, results["zero_shot"].get(name), results.get("unseen_data", {}).get(name))
            for name in results["source_tasks"]]
    rows += [(f"target (k={results['shots']})", name, results["zero_shot"].get(name), results.get("unseen_tasks", {}).get(name))
             for name in results["target_tasks"]]
    print(f"\n{'setting':<22}{'task':<20}{'base zero-shot':>16}{'TA-LoRA':>10}")
    for setting, name, base, tuned in rows:
        fmt = lambda r: f"{r['accuracy']:.3f}" if r else "-"  # noqa: E731
        print(f"{setting:<22}{name:<20}{fmt(base):>16}{fmt(tuned):>10}")
    for key, label in (("unseen_data", "source"), ("unseen_tasks", "target")):
        values = [r["accuracy"] for r in results.get(key, {}).values()]
        if values:
            results.setdefault("averages", {})[key] = sum(values) / len(values)
            print(f"average TA-LoRA accuracy, {label} tasks: {sum(values) / len(values):.3f}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(rows, out / "results.png")
    print(f"wrote {out / 'results.json'}, {out / 'results.png'}; adapter in {out / 'adapter'}")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for _, name, _, _ in rows]
    base = [r["accuracy"] if r else 0 for _, _, r, _ in rows]
    tuned = [r["accuracy"] if r else 0 for _, _, _, r in rows]
    x = torch.arange(len(names)).float()
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
    ax.bar(x - 0.2, base, width=0.4, label="base zero-shot")
    ax.bar(x + 0.2, tuned, width=0.4, label="TA-LoRA")
    ax.set_xticks(x.tolist(), names, rotation=45, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- the job
def run(args) -> dict:
    out = Path(args.output_dir)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "results.json"
    results = json.loads(state_file.read_text()) if state_file.exists() else {}
    results.update(source_tasks=list(args.tasks), target_tasks=list(args.targets), shots=args.shots, settings=vars(args))
    results.setdefault("zero_shot", {})

    def save():
        state_file.write_text(json.dumps(results, indent=2))

    start = time.time()
    print("loading the tasks (built once, then cached) and the model ...")
    for name in [*args.tasks, *args.targets]:
        load_task(name)
    base, tokenizer = load_model(tiny=args.tiny)
    mtl = dict(seed=args.seed, max_text_tokens=args.max_text_tokens)

    todo = [t for t in [*args.tasks, *args.targets] if t not in results["zero_shot"]]
    if todo:
        print("\n[1/4] zero-shot accuracy of the base model")
        results["zero_shot"].update(evaluate(base, tokenizer, todo, args.eval_per_task, route=False, **mtl))
        save()

    adapter = out / "adapter"
    if not (adapter / "adapter_model.safetensors").exists():
        model = get_peft_model(base, talora_config(args.tasks, args))
        model.print_trainable_parameters()
        warm = out / "adapter_warmup"
        if args.warmup_steps and not (warm / "adapter_model.safetensors").exists():
            print(f"\n[2/4] shared warm-up: {args.warmup_steps} steps, task part off")
            model.set_training_stage("shared_warmup")
            rows = training_rows(args.tasks, tokenizer, args.train_per_task, "train", **mtl)
            train_phase(model, tokenizer, rows, out / "checkpoints_warmup", args.warmup_steps, args)
            model.save_pretrained(warm)
        elif args.warmup_steps:
            model.load_adapter(warm, adapter_name="default", is_trainable=True)
        print(f"\n[2/4] multi-task training: {args.steps} steps on {len(args.tasks)} tasks")
        model.set_training_stage("multi_task")
        rows = training_rows(args.tasks, tokenizer, args.train_per_task, "train", **mtl)
        val = training_rows(args.tasks, tokenizer, max(2, args.eval_per_task // 8), "validation", **mtl)
        train_phase(model, tokenizer, rows, out / "checkpoints_multitask", args.steps, args, eval_rows=val)
        model.save_pretrained(adapter)
        base = model.base_model.unload()
        results.pop("unseen_data", None)
        save()

    if set(results.get("unseen_data", {})) != set(args.tasks):
        print("\n[3/4] unseen data: source-task test examples")
        model = PeftModel.from_pretrained(base, adapter)
        results["unseen_data"] = evaluate(model, tokenizer, args.tasks, args.eval_per_task, route=True, **mtl)
        base = model.base_model.unload()
        save()

    results.setdefault("unseen_tasks", {})
    for name in args.targets:
        if name in results["unseen_tasks"]:
            continue
        print(f"\n[4/4] unseen task {name}: k={args.shots} examples per label, new task factors only")
        model = PeftModel.from_pretrained(base, adapter)
        model.add_tasks([name])  # freeze mode: shared parts and source tasks stay bit-identical
        shots = k_shot(load_task(name)["train"], args.shots, seed=args.seed)
        rows = format_split(shots, tokenizer, task=name, max_text_tokens=args.max_text_tokens, system_prompt=SYSTEM_PROMPT)
        train_phase(model, tokenizer, rows, out / f"checkpoints_{name}", args.target_steps, args)
        model.save_pretrained(out / f"adapter_{name}", tasks=[name])
        results["unseen_tasks"].update(evaluate(model, tokenizer, [name], args.eval_per_task, route=True, **mtl))
        base = model.base_model.unload()
        save()

    results["elapsed_s"] = round(time.time() - start, 1)
    report(results, out)
    return results


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model and tiny budgets (smoke test)")
    parser.add_argument("--tasks", nargs="+", default=list(SOURCE_TASKS), help="source tasks")
    parser.add_argument("--targets", nargs="*", default=list(TARGET_TASKS), help="unseen target tasks")
    parser.add_argument("--train-per-task", type=int, default=48)
    parser.add_argument("--eval-per-task", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--target-steps", type=int, default=10)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--virtual-tokens", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-text-tokens", type=int, default=64)
    parser.add_argument("--task-sampling", default=None, choices=[None, "proportional", "temperature", "uncertainty"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs/main_job")
    parser.add_argument("--fresh", action="store_true", help="delete --output-dir first instead of resuming")
    args = parser.parse_args(argv)
    if args.tiny:
        tiny = dict(train_per_task=4, eval_per_task=4, warmup_steps=1, steps=2, target_steps=1, shots=1, batch_size=4)
        for key, value in tiny.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    return run(parse(argv))


if __name__ == "__main__":
    main()
