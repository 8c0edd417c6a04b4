"""What every multi-task config of this package shares: its list of tasks, and how it changes.

Tasks are given as a count (``num_tasks=3``, ids ``0..2``) or by name (``task_names=[...]``,
ids in list order). Tasks can be added (``add_tasks``) and a subset exported
(``save_pretrained(path, tasks=[...])``); both go through the methods here, so TA-LoRA and
MTL-LoRA validate the same way and fail with the same messages.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft.config import PeftConfig

from .routing import TaskIds, resolve_task_ids, task_index

TaskList = Union[int, str, Sequence[Union[int, str]]]


@dataclass
class MultiTaskConfig(PeftConfig):
    """A ``PeftConfig`` with a task list: ``num_tasks`` and optional unique ``task_names``."""

    num_tasks: Optional[int] = field(
        default=None, metadata={"help": "Number of tasks; inferred from `task_names` when omitted."}
    )
    task_names: Optional[list[str]] = field(
        default=None, metadata={"help": "Task names, in id order. Optional; must be unique."}
    )

    def _validate_tasks(self) -> None:
        kind = type(self).__name__
        if self.task_names is not None:
            self.task_names = list(self.task_names)
            if not all(isinstance(n, str) and n for n in self.task_names):
                raise ValueError(f"{kind}.task_names must be non-empty strings.")
            duplicates = sorted({n for n in self.task_names if self.task_names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{kind}.task_names has duplicates {duplicates}; give every task a unique name.")
            if self.num_tasks is None:
                self.num_tasks = len(self.task_names)
            elif self.num_tasks != len(self.task_names):
                raise ValueError(
                    f"{kind}.num_tasks={self.num_tasks} disagrees with the {len(self.task_names)} task_names; "
                    "drop num_tasks or make them match."
                )
        if self.num_tasks is None or isinstance(self.num_tasks, bool) or int(self.num_tasks) != self.num_tasks:
            raise ValueError(f"{kind} needs tasks: pass num_tasks=<int >= 1> or task_names=[...].")
        if self.num_tasks < 1:
            raise ValueError(f"{kind}.num_tasks must be >= 1 (got {self.num_tasks}); pass at least one task.")

    def task_label(self, task_id: int) -> str:
        """The name of task ``task_id``, or ``"task <id>"`` for unnamed tasks."""
        return self.task_names[task_id] if self.task_names else f"task {task_id}"

    def resolve_task_list(self, tasks: TaskList, purpose: str) -> list[int]:
        """Ids of ``tasks`` (ids and/or names, one or many), in the given order; unknown or repeated ones raise."""
        items = [tasks] if isinstance(tasks, (int, str)) else list(tasks)
        if not items:
            raise ValueError(f"{purpose}: the task list is empty; name at least one task.")
        ids = []
        for item in items:
            if isinstance(item, str):
                ids.append(task_index(item, self.task_names, self.num_tasks))
            elif isinstance(item, int) and not isinstance(item, bool) and 0 <= item < self.num_tasks:
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
        if isinstance(tasks, int) and not isinstance(tasks, bool):
            if tasks < 1:
                raise ValueError(f"add_tasks: the number of tasks to add must be >= 1 (got {tasks}).")
            if self.task_names:
                raise ValueError(
                    f"add_tasks: this adapter's tasks have names {self.task_names}; add tasks by name, "
                    'e.g. add_tasks(["new_task"]).'
                )
            return None
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


class MultiTaskTunerMixin:
    """Task handling shared by the multi-task tuners: validation, adding, export, model card.

    The tuner has ``peft_config`` (adapter name -> :class:`MultiTaskConfig`), ``active_adapter``,
    ``_exported_tasks`` (a dict, empty outside an export) and a ``model_card_tags`` tuple. Its
    ``_get_adapter_state_dict`` keeps only ``_exported_tasks[adapter]`` rows when that is set.
    """

    model_card_tags: tuple[str, ...] = ("multi-task", "peft-talora")

    def resolve_task_ids(self, task_ids: TaskIds, batch_size: int, device=None) -> torch.Tensor:
        """Validate ``task_ids`` against the active adapter's tasks; see :func:`routing.resolve_task_ids`."""
        config = self.peft_config[self.active_adapter]
        return resolve_task_ids(
            task_ids, batch_size=batch_size, num_tasks=config.num_tasks, task_names=config.task_names, device=device
        )

    def _extend_task_list(self, adapter_name: str, tasks: Union[int, Sequence[str]]) -> tuple[int, int]:
        """Grow the adapter's config by ``tasks`` (validated first); returns (first new id, count)."""
        config = self.peft_config[adapter_name]
        names = config.new_task_names(tasks)  # raises before anything changes
        first = config.num_tasks
        count = tasks if names is None else len(names) - first
        config.num_tasks = first + count
        config.task_names = names
        return first, count

    @contextmanager
    def exporting_tasks(self, tasks: TaskList, adapter_names: Sequence[str]):
        """Within this context the adapters' configs and saved tensors hold only ``tasks`` (ids or names).

        Used by ``save_pretrained(path, tasks=[...])`` and ``push_to_hub(repo, tasks=[...])``. Tasks
        are renumbered ``0..k-1`` in the order given; with one task the export needs no ``task_ids``.
        """
        selections = {
            name: self.peft_config[name].resolve_task_list(tasks, f"export of adapter {name!r}")
            for name in adapter_names
        }
        configs = dict(self.peft_config)
        try:
            for name, ids in selections.items():
                self.peft_config[name] = configs[name].restricted_to(ids)
                self._exported_tasks[name] = ids
            yield
        finally:
            self.peft_config.update(configs)
            self._exported_tasks.clear()

    def update_model_card(self, output_dir: str) -> None:
        """Add the method's tags and each adapter's tasks to the ``README.md`` PEFT wrote in ``output_dir``."""
        from huggingface_hub import ModelCard

        path = os.path.join(output_dir, "README.md")
        card = ModelCard.load(path)
        card.data.tags = sorted({*(card.data.tags or []), *self.model_card_tags})
        heading = "## Tasks"
        lines = []
        for name, config in self.peft_config.items():
            tasks = [config.task_label(i) for i in range(config.num_tasks)]
            lines.append(f"- adapter `{name}`: {len(tasks)} task(s), in id order: " + ", ".join(f"`{t}`" for t in tasks))
        section = "\n".join([heading, "", "Route each example with `task_ids` (ids or these names):", "", *lines, ""])
        text = card.text
        if heading in text:
            text = text[: text.index(heading)].rstrip() + "\n"
        card.text = text.rstrip() + "\n\n" + section
        card.save(path)


def check_saved_shape(
    method: str, name: str, saved: Sequence[int], here: Sequence[int], meanings: Sequence[str], config
) -> None:
    """Raise a ``ValueError`` naming the setting behind each differing dimension of a saved tensor.

    ``method`` is the method's display name, ``config`` the adapter's config, ``name`` the
    tensor's name, ``meanings[i]`` the config field (or base-model property) behind dimension ``i``.
    """
    saved, here = tuple(saved), tuple(here)
    if saved == here:
        return
    differences = [
        f"{meanings[i] if i < len(meanings) else f'dim {i}'}: {a} in the file, {b} here"
        for i, (a, b) in enumerate(zip(saved, here))
        if a != b
    ] or [f"rank: {len(saved)} in the file, {len(here)} here"]
    raise ValueError(
        f"{method} adapter file does not fit this model: {name} has shape {saved} in the file but {here} here "
        f"({'; '.join(differences)}). Load or resume it into a model built with the {type(config).__name__} it was saved "
        f"with (its adapter_config.json) on the base model it was trained on "
        f"({config.base_model_name_or_path or 'see adapter_config.json'})."
    )
