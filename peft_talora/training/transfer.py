"""Which existing task a new task should start from, measured on the new task's own examples.

PEFT's MPT starts a target task from the average of the source prompts. Here the start is chosen
by evidence: the new task's few labelled examples are scored under every existing task's routing
(the mean loss of their label tokens), and the task that already explains them best is the one to
copy with ``add_tasks([...], init_from=...)``. All candidates are scored in batched passes: the
examples are repeated once per candidate and routed by ``task_ids``, no loop over tasks.

    batch = MultiTaskDataCollator(tokenizer)(tokenize_for_causal_lm(shots, tokenizer))
    source = closest_task(model, batch)              # e.g. "boolq"
    model.add_tasks(["pubmedqa"], init_from=source)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

import torch
import torch.nn.functional as F

from ..multitask.config import MultiTaskConfig, TaskList
from .collator import _talora_config

TaskKey = Union[str, int]


def _adapter_config(model) -> MultiTaskConfig:
    """The active adapter's multi-task config (``task_names`` / ``num_tasks``) of a ``PeftModel``; a bare config
    (which the collator's lookup accepts) is not a model to score with."""
    error = TypeError(
        "task_losses needs a PeftModel with an active TA-LoRA or MTL-LoRA adapter (one that takes task_ids); "
        f"got {type(model).__name__}."
    )
    if isinstance(model, MultiTaskConfig):
        raise error
    try:
        return _talora_config(model)
    except TypeError:
        raise error from None


def task_losses(model, batch: Mapping, tasks: TaskList = None, *, chunk_size: int = 8) -> dict[TaskKey, float]:
    """Mean label-token loss of ``batch`` under each task in ``tasks`` (default: every task of the adapter).

    ``batch`` holds ``input_ids`` and ``labels`` ``(B, S)`` (``-100`` where no loss is taken) and
    optionally ``attention_mask``; its own ``task_ids`` are ignored. Each example counts once,
    whatever its label length. Keys are task names when the adapter names its tasks, ids otherwise.
    Rows go through the model ``chunk_size`` at a time (memory: ``chunk_size x S x vocab`` logits).
    """
    config = _adapter_config(model)
    candidates = config.resolve_task_list(
        list(range(config.num_tasks)) if tasks is None else tasks, "task_losses(tasks=...)"
    )
    input_ids, labels = batch["input_ids"], batch["labels"]
    if input_ids.shape != labels.shape:
        raise ValueError(f"batch input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape.")
    targets = labels[:, 1:]
    if bool((targets == -100).all(dim=1).any()):
        raise ValueError("Some examples of the batch have no label tokens (all -100): there is nothing to score.")
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    from ..suite.evaluation import _device, evaluating  # here: the suite imports this package's collator

    rows, count = input_ids.shape[0], len(candidates)
    device = _device(model)
    repeated = {"input_ids": input_ids.repeat(count, 1), "attention_mask": attention_mask.repeat(count, 1)}
    repeated_targets = targets.repeat(count, 1)
    task_ids = torch.as_tensor(candidates).repeat_interleave(rows)
    losses = torch.empty(rows * count)
    with evaluating(model):
        for start in range(0, rows * count, chunk_size):
            part = slice(start, start + chunk_size)
            logits = model(
                input_ids=repeated["input_ids"][part].to(device),
                attention_mask=repeated["attention_mask"][part].to(device),
                task_ids=task_ids[part].to(device),
            ).logits[:, -targets.shape[1] - 1 : -1]  # prompt tuning prepends virtual tokens
            target = repeated_targets[part].to(device)
            token_loss = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=-100, reduction="none")
            losses[part] = (token_loss.sum(1) / (target != -100).sum(1)).cpu()
    means = losses.view(count, rows).mean(1)
    names = config.task_names
    return {(names[t] if names else t): float(loss) for t, loss in zip(candidates, means)}


def closest_task(model, batch: Mapping, tasks: TaskList = None, *, chunk_size: int = 8) -> TaskKey:
    """The task (name, or id for unnamed adapters) whose routing gives ``batch`` the lowest loss; see :func:`task_losses`."""
    losses = task_losses(model, batch, tasks, chunk_size=chunk_size)
    return min(losses, key=losses.get)
