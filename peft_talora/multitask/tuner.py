"""What the multi-task tuners share: task validation, stages and ``add_tasks``, export, the model
card, and checks of saved tensors and of the base model an adapter was saved for."""

from __future__ import annotations

import copy
import math
import numbers
import os
from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft.config import PeftConfig

from .task_ids import TaskIds, resolve_task_ids, task_index


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
        count = int(tasks) if names is None else len(names) - first
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
        """Add the method's tags, each adapter's task-name -> id map and the loading lines to ``output_dir/README.md``.

        The loading lines name the folder or Hub repo the card is saved for (:func:`card_location`,
        set by ``save_pretrained``/``push_to_hub``; ``output_dir`` otherwise).
        """
        from huggingface_hub import ModelCard

        path = os.path.join(output_dir, "README.md")
        card = ModelCard.load(path)
        card.data.tags = sorted({*(card.data.tags or []), *self.model_card_tags})
        heading = "## Tasks"
        lines = []
        for name, config in self.peft_config.items():
            tasks = [config.task_label(i) for i in range(config.num_tasks)]
            lines.append(f"- adapter `{name}`: {len(tasks)} task(s), in id order: " + ", ".join(f"`{t}`" for t in tasks))
            lines += ["", "  | task id | task name |", "  |---|---|"]
            lines += [f"  | {i} | `{t}` |" for i, t in enumerate(tasks)] + [""]
        section = "\n".join(
            [heading, "", "Route each example with `task_ids` (ids or these names):", "", *lines, *self._loading_lines(output_dir)]
        )
        text = card.text
        if heading in text:
            text = text[: text.index(heading)].rstrip() + "\n"
        card.text = text.rstrip() + "\n\n" + section
        card.save(path)

    def _loading_lines(self, output_dir: str) -> list[str]:
        """The ``## How to load`` section of the model card (markdown lines)."""
        location = _CARD_LOCATION.get() or str(output_dir)
        config = next(iter(self.peft_config.values()))
        base = config.base_model_name_or_path or "<base model>"
        names = [n for n in self.peft_config if n != "default"]
        others = [f'model.load_adapter("{location}", adapter_name="{n}", subfolder="{n}")' for n in names]
        example = config.task_label(0) if config.task_names else 0
        return [
            "## How to load",
            "",
            "`import peft_talora` registers this adapter's method with PEFT; then PEFT loads it as any other:",
            "",
            "```python",
            "import peft_talora",
            "from peft import AutoPeftModelForCausalLM",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{location}")',
            *others,
            "```",
            "",
            "or, onto a base model you have already loaded:",
            "",
            "```python",
            "import peft_talora",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{location}")',
            *others,
            "```",
            "",
            f"Then pass the tasks with every call: `model(**inputs, task_ids=[{example!r}, ...])`, "
            f"`model.generate(**inputs, task_ids=[{example!r}, ...])`.",
            "",
        ]


#: Where the model card being written will be loaded from (a folder or a Hub repo id), see :func:`card_location`.
_CARD_LOCATION: ContextVar[Optional[str]] = ContextVar("peft_talora_card_location", default=None)


@contextmanager
def card_location(location):
    """Within this context, model cards' loading lines name ``location``; an outer location (a ``push_to_hub``
    repo id around its own ``save_pretrained`` into a temporary folder) is kept."""
    token = _CARD_LOCATION.set(str(location)) if _CARD_LOCATION.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _CARD_LOCATION.reset(token)


def base_model_shape(model) -> dict:
    """What an adapter depends on in ``model`` (a transformers model): its type and attention shape."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, heads = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    shape = {
        "model_type": getattr(text, "model_type", None),
        "hidden_size": hidden,
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None),
    }
    return {k: v for k, v in shape.items() if isinstance(v, (int, str)) and not isinstance(v, bool)}


def check_base_model_shape(config: MultiTaskConfig, model, source: str) -> None:
    """Raise a ``ValueError`` if ``model`` differs from the base ``config`` was saved from (``base_model_shape``).

    Tensor shapes alone miss some of these: a TA-LoRA prefix projects through the base's own
    attention, so it loads onto a base with other KV heads, or onto GPT-2 of the same width.
    """
    saved, here = config.base_model_shape or {}, base_model_shape(model)
    differences = [f"{k}: {saved[k]!r} in the file, {here[k]!r} here" for k in saved if k in here and saved[k] != here[k]]
    if differences:
        raise ValueError(
            f"The adapter in {source} was saved from another base model ({'; '.join(differences)}). Load it onto the "
            f"base model it was trained on ({config.base_model_name_or_path or 'see adapter_config.json'}); an adapter "
            "does not carry over to a base of another family or attention shape."
        )


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
