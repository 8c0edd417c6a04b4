"""What every multi-task config of this package shares: its list of tasks, and how it changes.

Tasks are given as a count (``num_tasks=3``, ids ``0..2``) or by name (``task_names=[...]``,
ids in list order). Tasks can be added (``add_tasks``) and a subset exported
(``save_pretrained(path, tasks=[...])``); both go through the methods here, so TA-LoRA and
MTL-LoRA validate the same way and fail with the same messages.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from peft.config import PeftConfig

from .task_ids import task_index

TaskList = Union[int, str, Sequence[Union[int, str]]]


# Field checks shared by the configs. A value of the wrong type raises a ``TypeError``, a value of the right
# type out of range (NaN and inf included) a ``ValueError``; both name the field, the value and what is allowed.
# numpy scalars count as ints/floats (they are converted); ``bool`` is never a number here.


def _got(value) -> str:
    return f"{value!r}, a {type(value).__name__}"


def check_int(kind: str, name: str, value, *, minimum: int = 1, hint: str = "") -> int:
    """``value`` as an ``int >= minimum``; ``2.0``, ``"2"`` and ``True`` are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{kind}.{name} must be an int >= {minimum} (got {_got(value)}){hint}.")
    if value < minimum:
        raise ValueError(f"{kind}.{name} must be an int >= {minimum} (got {value!r}){hint}.")
    return int(value)


def check_number(
    kind: str,
    name: str,
    value,
    *,
    above: Optional[float] = None,
    at_least: Optional[float] = None,
    below: Optional[float] = None,
    hint: str = "",
) -> float:
    """``value`` as a finite ``float`` within the bounds given; ints are accepted (JSON may hold ``8`` for ``8.0``)."""
    lower = f"> {above:g}" if above is not None else f">= {at_least:g}" if at_least is not None else ""
    allowed = f"in [{at_least:g}, {below:g})" if at_least is not None and below is not None else lower
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{kind}.{name} must be a number {allowed} (got {_got(value)}){hint}.")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{kind}.{name} must be a finite number {allowed} (got {value!r}){hint}.")
    if (
        (above is not None and not number > above)
        or (at_least is not None and not number >= at_least)
        or (below is not None and not number < below)
    ):
        raise ValueError(f"{kind}.{name} must be {allowed} (got {value!r}){hint}.")
    return number


def check_names(kind: str, name: str, value, *, example: str, unique: bool = True) -> Optional[list[str]]:
    """``value`` as a list of non-empty strings (``None`` stays ``None``); a bare string is refused, not split."""
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(
            f"{kind}.{name} must be a list of names, not the string {value!r} (a string would be read letter by "
            f"letter); for one name write {name}=[{value!r}]."
        )
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{kind}.{name} must be a list of non-empty strings, e.g. {example} (got {_got(value)}).")
    bad = [n for n in value if not isinstance(n, str) or not n]
    if bad:
        error = TypeError if any(not isinstance(n, str) for n in bad) else ValueError
        raise error(f"{kind}.{name} must be non-empty strings, e.g. {example} (got {value!r}: {bad[0]!r}).")
    names = [str(n) for n in value]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if unique and duplicates:
        raise ValueError(f"{kind}.{name} has duplicates {duplicates}; give every task a unique name.")
    return names


def check_int_list(kind: str, name: str, value, *, minimum: Optional[int] = None, example: str) -> list[int]:
    """``value`` (a list or tuple) as a non-empty list of ints (each ``>= minimum`` when given)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{kind}.{name} must be a list of ints, e.g. {example} (got {_got(value)}).")
    bad = [i for i in value if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad:
        raise TypeError(f"{kind}.{name} must hold ints, e.g. {example} (got {value!r}; {_got(bad[0])}).")
    if minimum is not None and any(i < minimum for i in value):
        raise ValueError(f"{kind}.{name} must hold ints >= {minimum} (got {value!r}).")
    return [int(i) for i in value]


@dataclass
class MultiTaskConfig(PeftConfig):
    """A ``PeftConfig`` with a task list: ``num_tasks`` and optional unique ``task_names``."""

    #: Fields the saved tensors' place and meaning depend on: a file saved with other values must not be loaded
    #: into an existing adapter (tensor shapes alone miss e.g. other layers of the same count).
    LAYOUT_FIELDS: ClassVar[tuple[str, ...]] = ()

    num_tasks: Optional[int] = field(
        default=None, metadata={"help": "Number of tasks; inferred from `task_names` when omitted."}
    )
    task_names: Optional[list[str]] = field(
        default=None, metadata={"help": "Task names, in id order. Optional; must be unique."}
    )
    base_model_shape: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Written by save_pretrained: type and attention shape of the base model the adapter was saved "
            "from (model_type, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim). "
            "Loading onto a base that differs raises; None (adapters saved before this field existed) skips the check."
        },
    )

    def _validate_tasks(self) -> None:
        """Check ``num_tasks``/``task_names`` and PEFT's own fields; fill ``num_tasks`` from the names."""
        kind = type(self).__name__
        self._validate_peft_fields()
        self.task_names = check_names(kind, "task_names", self.task_names, example="['sst2', 'trec']")
        if self.task_names == []:
            raise ValueError(f"{kind}.task_names is empty (got []); name at least one task, e.g. task_names=['sst2'].")
        if self.num_tasks is None and self.task_names is not None:
            self.num_tasks = len(self.task_names)
        if self.num_tasks is None:
            raise ValueError(f"{kind} needs tasks: pass num_tasks=<int >= 1> or task_names=[...].")
        if isinstance(self.num_tasks, bool) or not isinstance(self.num_tasks, numbers.Integral):
            raise TypeError(f"{kind}.num_tasks must be an int >= 1 (got {_got(self.num_tasks)}); the number of tasks.")
        self.num_tasks = int(self.num_tasks)
        if self.task_names is not None and self.num_tasks != len(self.task_names):
            raise ValueError(
                f"{kind}.num_tasks={self.num_tasks} disagrees with the {len(self.task_names)} task_names; "
                "drop num_tasks or make them match."
            )
        if self.num_tasks < 1:
            raise ValueError(f"{kind}.num_tasks must be >= 1 (got {self.num_tasks}); pass at least one task.")

    def _validate_peft_fields(self) -> None:
        """The fields every ``PeftConfig`` has (PEFT itself checks ``task_type``)."""
        kind = type(self).__name__
        if not isinstance(self.inference_mode, bool):
            raise TypeError(f"{kind}.inference_mode must be True or False (got {self.inference_mode!r}).")
        shape = self.base_model_shape
        plain = (int, str)
        if shape is not None and not (
            isinstance(shape, dict)
            and all(isinstance(k, str) and isinstance(v, plain) and not isinstance(v, bool) for k, v in shape.items())
        ):
            raise TypeError(
                f"{kind}.base_model_shape must be None or a dict of ints and strings written by save_pretrained "
                f"(got {_got(shape)}); leave it to save_pretrained."
            )
        for name in ("base_model_name_or_path", "revision"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise TypeError(f"{kind}.{name} must be a string or None (got {value!r}, a {type(value).__name__}).")

    def task_label(self, task_id: int) -> str:
        """The name of task ``task_id``, or ``"task <id>"`` for unnamed tasks."""
        return self.task_names[task_id] if self.task_names else f"task {task_id}"

    def resolve_task_list(self, tasks: TaskList, purpose: str) -> list[int]:
        """Ids of ``tasks`` (ids and/or names, one or many), in the given order; unknown or repeated ones raise."""
        if hasattr(tasks, "tolist") and not isinstance(tasks, str):  # a tensor, numpy array or numpy scalar
            tasks = tasks.tolist()
        if isinstance(tasks, (numbers.Integral, str)):
            items = [tasks]
        elif isinstance(tasks, (list, tuple)):
            items = list(tasks)
        else:
            raise TypeError(f"{purpose}: `tasks` must be a task id or name, or a list of them (got {_got(tasks)}).")
        if not items:
            raise ValueError(f"{purpose}: the task list is empty; name at least one task.")
        ids = []
        for item in items:
            if isinstance(item, str):
                ids.append(task_index(item, self.task_names, self.num_tasks))
            elif isinstance(item, numbers.Integral) and not isinstance(item, bool) and 0 <= item < self.num_tasks:
                ids.append(int(item))
            else:
                valid = f"ids 0..{self.num_tasks - 1}" + (f" or names {self.task_names}" if self.task_names else "")
                raise ValueError(f"{purpose}: unknown task {item!r}; valid tasks are {valid}.")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{purpose}: the task list {items} names the same task twice.")
        return ids

    def restricted_to(self, task_ids: Sequence[int]) -> "MultiTaskConfig":
        """A copy of this config that holds only ``task_ids`` (renumbered ``0..k-1`` in that order)."""
        subset = copy.deepcopy(self)
        subset.num_tasks = len(task_ids)
        subset.task_names = [self.task_names[i] for i in task_ids] if self.task_names else None
        return subset

    def new_task_names(self, tasks: Union[int, Sequence[str]]) -> Optional[list[str]]:
        """Validate tasks to add (a count, or new names) and return the full name list afterwards.

        Returns ``None`` when the config stays unnamed (a count was given to an unnamed config).
        Existing unnamed tasks get the names ``task_0, task_1, ...`` when named tasks join them.
        """
        if hasattr(tasks, "tolist") and not isinstance(tasks, str):  # a numpy scalar or array
            tasks = tasks.tolist()
        if isinstance(tasks, numbers.Integral) and not isinstance(tasks, bool):
            tasks = int(tasks)
            if tasks < 1:
                raise ValueError(f"add_tasks: the number of tasks to add must be >= 1 (got {tasks}).")
            if self.task_names:
                raise ValueError(
                    f"add_tasks: this adapter's tasks have names {self.task_names}; add tasks by name, "
                    'e.g. add_tasks(["new_task"]).'
                )
            return None
        if not isinstance(tasks, (str, list, tuple)):
            raise TypeError(
                f"add_tasks: give a number of tasks (an int >= 1) or a list of new task names (got {_got(tasks)})."
            )
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"add_tasks: give new task names as non-empty strings (got {names!r}).")
        existing = self.task_names or [f"task_{i}" for i in range(self.num_tasks)]
        taken = sorted({n for n in names if n in existing})
        if taken:
            raise ValueError(
                f"add_tasks: task(s) {taken} already exist in this adapter (tasks: {existing}); choose new names. "
                "Nothing was changed."
            )
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"add_tasks: {repeated} appear more than once in the new task names.")
        return existing + names
