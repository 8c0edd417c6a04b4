"""A saved adapter gains a new task from k examples per label; the old tasks do not change.

    python examples/add_task_few_shot.py --adapter outputs/main_job/adapter --task pubmedqa --shots 16
    python examples/add_task_few_shot.py --tiny     # makes a tiny two-task adapter first, seconds

``add_tasks`` gives the new task its own factors and (freeze mode) trains only those, so every
earlier task's outputs stay bit-identical. The new task starts at the base model (gate scale
``c = 0``) and training ends at its lowest loss on held-out validation rows among the start and
every ``--steps // 2`` steps (``KeepBestCallback``), so it never ends worse there than the base
model. The result is saved twice: the grown adapter and a standalone export of the new task
alone (loads with plain ``PeftModel.from_pretrained`` and needs no ``task_ids``).
"""

import argparse
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import TrainingArguments

import peft_talora  # noqa: F401
from peft_talora import TALoraConfig
from peft_talora.smollm2 import load_model
from peft_talora.suite import evaluate_task, format_split, load_task, subsample
from peft_talora.training import KeepBestCallback, build_trainer
from peft_talora.training.collator import k_shot, tokenize_for_causal_lm


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", help="a saved TA-LoRA adapter (default with --tiny: a fresh tiny one)")
    parser.add_argument("--task", default="pubmedqa")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-2, help="a new task starts at c = 0 and wants a large step")
    parser.add_argument("--val-rows", type=int, default=24, help="held-out rows (validation split) for early stopping")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--output-dir", default="outputs/add_task_few_shot")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)

    base, tokenizer = load_model(tiny=args.tiny)
    if args.adapter is None:
        if not args.tiny:
            parser.error("--adapter is required (or use --tiny)")
        seed_adapter = get_peft_model(base, TALoraConfig(task_type="CAUSAL_LM", task_names=["sms_spam", "trec"]))
        seed_adapter.save_pretrained(out / "seed_adapter")
        base = seed_adapter.base_model.unload()
        args.adapter = out / "seed_adapter"

    model = PeftModel.from_pretrained(base, args.adapter)
    old_tasks = list(model.peft_config["default"].task_names)
    probe = tokenizer(["Is this a question?"], return_tensors="pt")
    with torch.no_grad():
        before = model(**probe, task_ids=old_tasks[:1]).logits

    model.add_tasks([args.task])  # freeze mode: only the new task's factors train
    k = 1 if args.tiny else args.shots
    shots = k_shot(load_task(args.task)["train"], k, seed=0)
    rows = format_split(shots, tokenizer, task=args.task, max_text_tokens=64)
    held_out = subsample(load_task(args.task)["validation"], 4 if args.tiny else args.val_rows, seed=0)
    held_out = format_split(held_out, tokenizer, task=args.task, max_text_tokens=64)
    steps = 2 if args.tiny else args.steps
    keep = KeepBestCallback()
    trainer = build_trainer(
        model,
        TrainingArguments(
            output_dir=str(out / "run"),
            max_steps=steps,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=8,
            learning_rate=args.lr,
            eval_strategy="steps",
            eval_steps=max(1, steps // 2),
            eval_on_start=True,  # the start (the base model) is a candidate too
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            logging_steps=5,
        ),
        train_dataset=tokenize_for_causal_lm(rows, tokenizer, task_names=model),
        eval_dataset=tokenize_for_causal_lm(held_out, tokenizer, task_names=model),
        processing_class=tokenizer,
        callbacks=[keep],
    )
    trainer.train()
    print(f"ended at step {keep.best_step} of {steps}; held-out loss by step {keep.history}")

    with torch.no_grad():
        assert torch.equal(model(**probe, task_ids=old_tasks[:1]).logits, before), "an old task changed"
    test = subsample(load_task(args.task)["test"], 4 if args.tiny else 100)
    result = evaluate_task(model, tokenizer, test, task=args.task, task_id=args.task, max_text_tokens=64)
    print(f"{args.task} (k={k}): {result.summary()}; old tasks {old_tasks} unchanged")
    model.save_pretrained(out / "adapter")  # all tasks
    model.save_pretrained(out / args.task, tasks=[args.task])  # the new task alone
    return result


if __name__ == "__main__":
    main()
