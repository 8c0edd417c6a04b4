"""Data streams, training and evaluation shared by every method of the quality benchmark.

Every method sees the same rows in the same order: a seeded, shuffled stream of formatted
examples is cut to exactly ``steps * batch_size`` rows and trained with Trainer's sequential
sampler (``train_sampling_strategy="sequential"``), so step ``i`` of every method gets the same
batch. TA-LoRA's shared warm-up consumes the first ``warmup_steps`` batches of that stream and
multi-task training the rest: its total step budget is the same as everyone else's.
Evaluation is :func:`peft_talora.suite.evaluate_task` (rank classification) on fixed test
subsets, identical for every method and seed. The validation loss (learning-rate choice and
curves) is Trainer's own evaluation loop on fixed rows of each source task's validation split.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import datasets
import torch
from transformers import TrainerCallback, TrainingArguments
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


def validation_data(
    tasks, tokenizer, per_task: int, max_text_tokens: int, task_names: Optional[list[str]] = None
) -> datasets.Dataset:
    """Tokenised rows of every task's validation split (``per_task`` each, fixed for every method and seed),
    sorted by length so that evaluation batches carry little padding; ``task_ids`` index ``task_names``
    (default ``tasks``; an unseen task's rows index the list its model routes by)."""
    rows = [subsample(load_task(t)["validation"], per_task, seed=TEST_SEED) for t in tasks]
    parts = [format_rows(r, tokenizer, max_text_tokens) for r in rows]
    names = list(tasks if task_names is None else task_names)
    data = tokenize_for_causal_lm(datasets.concatenate_datasets(parts), tokenizer, task_names=names)
    lengths = [len(ids) for ids in data["input_ids"]]  # once per benchmark, not per step
    return data.select(sorted(range(len(data)), key=lengths.__getitem__))


def eval_passes(task: str, tokenizer) -> int:
    """Forward passes per example in rank classification, an upper bound: one over the prompt, plus one short pass
    continuing it when some label word has several tokens (counted as a whole pass)."""
    from peft_talora.suite import PromptFormatter

    formatter = PromptFormatter(tokenizer, system_prompt=SYSTEM_PROMPT)
    choices = formatter.completions(get_task(task))
    lengths = [len(ids) for ids in tokenizer(choices, add_special_tokens=False)["input_ids"]]
    return 1 + (max(lengths) > 1)


# ----------------------------------------------------------------------------- training
class EvaluateEvery(TrainerCallback):
    """Asks Trainer for its evaluation every ``every`` steps of the whole budget and after the last step.

    ``offset`` is the number of steps trained before this call (TA-LoRA's warm-up), so every method's curve
    has its points at the same steps of the budget; ``every=0``: the last step only (the loss the learning
    rate is chosen by). Each evaluation leaves torch's random stream as it found it (its data loader draws a
    seed from it), so training with validation is bit-identical to training without (LoRA's dropout).
    """

    def __init__(self, every: int, offset: int):
        self.every, self.offset = every, offset
        self.rng = None

    def _keep_rng(self) -> None:
        self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def on_train_begin(self, args, state, control, **kwargs):
        self._keep_rng()  # for eval_on_start

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == state.max_steps or (self.every and (self.offset + step) % self.every == 0):
            control.should_evaluate = True
            self._keep_rng()

    def on_evaluate(self, args, state, control, **kwargs):
        cpu, cuda = self.rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


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
    validation: Optional[datasets.Dataset] = None,
    eval_every: int = 0,
    step_offset: int = 0,
    eval_start: bool = False,
) -> dict:
    """Train ``model`` for ``steps`` steps on ``rows`` (exactly ``steps * batch_size`` rows, in order).

    ``route``: keep ``task_ids`` (ids into ``task_list``) in the batches; single-task methods get none.
    ``validation`` (tokenised rows, :func:`validation_data`): Trainer's evaluation loop computes their mean
    label-token loss every ``eval_every`` steps of the budget (``step_offset`` steps were trained before this
    call), after the last step and, with ``eval_start``, before the first; the result gets ``curve``:
    ``[[budget step, loss], ...]``.
    """
    if len(rows) != steps * batch_size:
        raise ValueError(f"expected {steps * batch_size} rows for {steps} steps, got {len(rows)}")
    data = tokenize_for_causal_lm(rows, tokenizer, task_names=list(task_list))
    if not route:
        data = data.remove_columns("task_ids")
        if validation is not None:
            validation = validation.remove_columns("task_ids")
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
        # the validation loss: label tokens only (a PeftModel hides the label names from Trainer's inspection)
        label_names=["labels"],
        prediction_loss_only=True,
        per_device_eval_batch_size=EVAL_BATCH_SIZE,
        eval_on_start=validation is not None and eval_start,
    )
    collator = MultiTaskDataCollator(tokenizer=tokenizer, task_names=list(task_list))
    trainer = build_trainer(
        model,
        args,
        train_dataset=data,
        eval_dataset=validation,
        processing_class=tokenizer,
        data_collator=collator,
        fast_lr_ratio=fast_lr_ratio,
        callbacks=[EvaluateEvery(eval_every, step_offset)] if validation is not None else None,
    )
    trainer.remove_callback(PrinterCallback)  # one line per run from the caller instead of a dict per log
    start = time.perf_counter()
    output = trainer.train()
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    seconds = time.perf_counter() - start
    result = {
        "steps": steps,
        "train_loss": float(output.training_loss),
        "logged_losses": losses,
        "seconds": round(seconds, 1),
    }
    message = f"    {steps} steps in {seconds:.1f} s, training loss {output.training_loss:.3f}"
    if validation is not None:
        result["curve"] = [[step_offset + e["step"], e["eval_loss"]] for e in history if "eval_loss" in e]
        result["validation_seconds"] = round(sum(e["eval_runtime"] for e in history if "eval_runtime" in e), 1)
        message += f", validation loss {result['curve'][-1][1]:.3f} ({result['validation_seconds']:.1f} s)"
    print(message, flush=True)
    return result


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
