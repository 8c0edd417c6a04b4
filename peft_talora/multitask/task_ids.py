"""Turning a user's ``task_ids`` into one validated ``LongTensor`` of shape ``(batch,)``.

Shared by every multi-task tuner of this package so that all of them accept the same inputs and
fail with the same messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

TaskIds = Union[torch.Tensor, Sequence[Union[int, str]], int, str, None]


def _valid(num_tasks: int, task_names: Optional[Sequence[str]]) -> str:
    ids = f"ids 0..{num_tasks - 1}"
    return f"{ids} or names {list(task_names)}" if task_names else ids


def task_index(name: str, task_names: Optional[Sequence[str]], num_tasks: int) -> int:
    """The id of the task called ``name``; raises a ``ValueError`` listing the valid tasks."""
    if task_names and name in task_names:
        return list(task_names).index(name)
    raise ValueError(f"Unknown task name {name!r}; valid tasks are {_valid(num_tasks, task_names)}.")


def resolve_task_ids(
    task_ids: TaskIds,
    *,
    batch_size: int,
    num_tasks: int,
    task_names: Optional[Sequence[str]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Validate ``task_ids`` for a batch and return them as a ``LongTensor`` of shape ``(batch_size,)``.

    Accepts a tensor, numpy array or sequence of ints or task names, one per example, or a single
    id/name for the whole batch. With a single task ``None`` means task 0; with several it is an
    error, never a silent default. An empty batch (``batch_size=0``) gives an empty ``LongTensor``.
    """
    if task_ids is None:
        if num_tasks == 1:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        raise ValueError(
            f"This adapter has {num_tasks} tasks, so every call needs `task_ids` (one per example): "
            f"pass task_ids=torch.tensor([...]) with {_valid(num_tasks, task_names)}."
        )
    if not isinstance(task_ids, torch.Tensor) and hasattr(task_ids, "tolist"):  # numpy array or scalar
        task_ids = task_ids.tolist()
    if isinstance(task_ids, (bytes, bytearray)):
        raise TypeError(
            f"`task_ids` must be ints or task names, got {type(task_ids).__name__}; valid tasks are "
            f"{_valid(num_tasks, task_names)}."
        )
    if isinstance(task_ids, str):  # one name for the whole batch
        task_ids = task_index(task_ids, task_names, num_tasks)
    elif isinstance(task_ids, Sequence) and not isinstance(task_ids, torch.Tensor):
        bools = [_is_bool(t) for t in task_ids]
        if any(bools) and not all(bools):  # torch.as_tensor([True, 1]) would make it an id (all bools: below)
            raise TypeError(
                f"`task_ids` holds a bool ({task_ids!r}); pass task ids (ints) or names: valid tasks are "
                f"{_valid(num_tasks, task_names)}."
            )
        task_ids = [task_index(t, task_names, num_tasks) if isinstance(t, str) else t for t in task_ids]
        if not task_ids:  # torch.as_tensor([]) would be float32
            task_ids = torch.empty(0, dtype=torch.long)
    if not isinstance(task_ids, torch.Tensor):
        try:
            task_ids = torch.as_tensor(task_ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"`task_ids` must be ints or task names, got {type(task_ids).__name__}: {err}") from None
    if task_ids.dtype == torch.bool or task_ids.is_floating_point() or task_ids.is_complex():
        raise TypeError(
            f"`task_ids` must be an integer tensor (torch.long) of task ids, got dtype {task_ids.dtype}; "
            f"valid tasks are {_valid(num_tasks, task_names)}."
        )
    if task_ids.dim() == 0:
        task_ids = task_ids.expand(batch_size)
    if task_ids.dim() != 1 or task_ids.shape[0] != batch_size:
        raise ValueError(
            f"`task_ids` must have shape (batch,) = ({batch_size},), one task per example; got shape "
            f"{tuple(task_ids.shape)}; valid tasks are {_valid(num_tasks, task_names)}."
        )
    task_ids = task_ids.to(device=device, dtype=torch.long)
    if batch_size and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
        bad = sorted({int(t) for t in task_ids.tolist() if not 0 <= t < num_tasks})
        raise ValueError(f"Unknown task id(s) {bad}; valid tasks are {_valid(num_tasks, task_names)}.")
    return task_ids


def _is_bool(value) -> bool:
    """A Python, numpy or 0-d tensor bool."""
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    return isinstance(value, (bool, np.bool_))
