"""Data streams, training and evaluation shared by every method of the quality benchmark.

Every method sees the same rows in the same order: a seeded, shuffled stream of formatted
examples is cut to exactly ``steps * batch_size`` rows and trained with Trainer's sequential
sampler (``train_sampling_strategy="sequential"``), so step ``i`` of every method gets the same
batch. TA-LoRA's shared warm-up consumes the first ``warmup_steps`` batches of that stream and
multi-task training the rest: its total step budget is the same as everyone else's.
Evaluation is :func:`peft_talora.suite.evaluate_task` (rank classification) on fixed test
subsets, identical for every method and seed.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import datasets
import torch
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback

from peft_talora.suite import evaluate_task, format_split, get_task, load_task, subsample
from peft_talora.training import build_trainer
from peft_talora.training.collator import MultiTaskDataCollator, k_shot, tokenize_for_causal_lm

SYSTEM_PROMPT = "You are a precise text classifier."  # short, as in examples/main_job.py
EVAL_BATCH_SIZE = 8
TEST_SEED = 0  # the test subsets are the same for every seed and method


# ----------------------------------------------------------------------------- data
def format_rows(rows: datasets.Dataset, tokenizer, max_text_tokens: int, task: Optional[str] = None):
    return format_split(rows, tokenizer, task=task, max_text_tokens=max_text_tokens, system_prompt=SYSTEM_PROMPT)


def stream(rows: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:
    """Exactly ``n`` rows: ``rows`` shuffled with ``seed``, reshuffled for every further pass."""
    passes, parts = math.ceil(n / len(rows)), []
    for i in range(passes):
        parts.append(rows.shuffle(seed=seed + i))
    return datasets.concatenate_datasets(parts).select(range(n))


def source_stream(tasks, tokenizer, per_task: int, seed: int, n: int, max_text_tokens: int) -> datasets.Dataset:
    """``n`` formatted training rows from ``per_task`` stratified examples of every source task, mixed."""
    parts = [
        format_rows(subsample(load_task(t)["train"], per_task, seed=seed), tokenizer, max_text_tokens) for t in tasks
    ]
    return stream(datasets.concatenate_datasets(parts), n, seed)


def target_pool(target: str, shot, seed: int, full_cap: Optional[int]) -> datasets.Dataset:
    """The target task's training data: ``k`` examples per label, or ``"full"`` (capped at ``full_cap`` rows)."""
    train = load_task(target)["train"]
    if shot == "full":
        return subsample(train, full_cap, seed=seed) if full_cap else train
    return k_shot(train, int(shot), seed=seed)


def test_rows(task: str, per_task: int) -> datasets.Dataset:
    return subsample(load_task(task)["test"], per_task, seed=TEST_SEED)


def eval_passes(task: str, tokenizer) -> int:
    """Forward passes per example in rank classification: one, plus one per multi-token label word."""
    from peft_talora.suite import PromptFormatter

    formatter = PromptFormatter(tokenizer, system_prompt=SYSTEM_PROMPT)
    choices = formatter.completions(get_task(task))
    lengths = [len(ids) for ids in tokenizer(choices, add_special_tokens=False)["input_ids"]]
    return 1 + sum(n > 1 for n in lengths)


# ----------------------------------------------------------------------------- training
def train(
    model,
    rows: datasets.Dataset,
    tokenizer,
    *,
    task_list: list[str],
    route: bool,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    folder,
    fast_lr_ratio: float,
) -> dict:
    """Train ``model`` for ``steps`` steps on ``rows`` (exactly ``steps * batch_size`` rows, in order).

    ``route``: keep ``task_ids`` (ids into ``task_list``) in the batches; single-task methods get none.
    """
    if len(rows) != steps * batch_size:
        raise ValueError(f"expected {steps * batch_size} rows for {steps} steps, got {len(rows)}")
    data = tokenize_for_causal_lm(rows, tokenizer, task_names=list(task_list))
    if not route:
        data = data.remove_columns("task_ids")
    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=min(5, steps // 10),
        weight_decay=0.0,
        logging_steps=max(1, steps // 4),
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="sequential",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        # Trainer inspects the *base* model's forward for a PeftModel and would drop task_ids for MPT/Poly;
        # the tokenised rows hold only model inputs anyway.
        remove_unused_columns=False,
    )
    collator = MultiTaskDataCollator(tokenizer=tokenizer, task_names=list(task_list))
    trainer = build_trainer(
        model,
        args,
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=collator,
        fast_lr_ratio=fast_lr_ratio,
    )
    trainer.remove_callback(PrinterCallback)  # one line per run from the caller instead of a dict per log
    start = time.perf_counter()
    output = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    seconds = time.perf_counter() - start
    print(f"    {steps} steps in {seconds:.1f} s, training loss {output.training_loss:.3f}", flush=True)
    return {
        "steps": steps,
        "train_loss": float(output.training_loss),
        "logged_losses": losses,
        "seconds": round(time.perf_counter() - start, 1),
    }


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, tokenizer, tests: dict, task_id_of, max_text_tokens: int) -> dict:
    """Accuracy/macro-F1 per task: ``tests`` maps task name to test rows; ``task_id_of(name)`` routes."""
    results = {}
    for name, rows in tests.items():
        start = time.perf_counter()
        result = evaluate_task(
            model,
            tokenizer,
            rows,
            task=name,
            task_id=task_id_of(name),
            batch_size=EVAL_BATCH_SIZE,
            max_text_tokens=max_text_tokens,
            system_prompt=SYSTEM_PROMPT,
        )
        results[name] = {**result.metrics(), "seconds": round(time.perf_counter() - start, 1)}
    return results


def average(per_task: dict, key: str = "accuracy") -> Optional[float]:
    values = [m[key] for m in per_task.values()]
    return sum(values) / len(values) if values else None
