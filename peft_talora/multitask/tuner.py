"""What the multi-task tuners share: task validation, stages and ``add_tasks``, export, the model
card, and checks of saved tensors and of the base model an adapter was saved for."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional, Union

import torch

from .config import MultiTaskConfig, TaskList
from .routing import ROUTED_TASK_IDS_KWARG
from .task_ids import TaskIds, resolve_task_ids


class MultiTaskTunerMixin:
    """What the multi-task tuners share: calls, stages, ``add_tasks``, task validation, export, model card.

    The tuner has ``model`` (the wrapped transformers model), ``peft_config`` (adapter name ->
    :class:`MultiTaskConfig`), ``_active_name`` (the active adapter, ``None`` when there is none),
    ``_router`` (its :class:`~peft_talora.multitask.routing.TaskRouter`), ``_stages`` and
    ``_frozen_blocks`` (dicts), ``_exported_tasks`` (read-only: adapter -> exported task ids, empty
    outside an export, see :meth:`exporting_tasks`) and a
    ``model_card_tags`` tuple, and implements four hooks: ``_task_block_sizes(name)`` (the number of
    tasks in each block), ``_add_task_block(name, count)``, ``_copy_task_factors(name, sources)`` (the
    last block's task ``i`` starts as a copy of task ``sources[i]``) and ``_apply_stage(name)`` (set
    ``requires_grad`` for the adapter's stage; ``_frozen_blocks[name]`` leading task blocks stay frozen
    in ``"new_tasks"``),
    plus ``_refresh_trainability(name)`` (apply the stage if the adapter trains now, else freeze it).
    Its ``_get_adapter_state_dict`` keeps only ``_exported_tasks[adapter]`` rows when that is set.
    """

    #: Training stages (see ``set_training_stage``); a method may add its own (TA-LoRA's warm-up).
    STAGES: tuple[str, ...] = ("multi_task", "new_tasks")
    model_card_tags: tuple[str, ...] = ("multi-task", "peft-talora")

    # ----------------------------------------------------------------- calls
    def forward(self, *args, task_ids: TaskIds = None, **kwargs):
        """The wrapped model's forward; ``task_ids`` (from the PEFT model or given here) route each example."""
        routed = kwargs.pop(ROUTED_TASK_IDS_KWARG, None)
        task_ids = routed if task_ids is None else task_ids
        if task_ids is not None:
            kwargs["task_ids"] = task_ids
        return self._after_forward(self.model(*args, **kwargs), kwargs)

    def _after_forward(self, output, kwargs: dict):
        """What the method adds to a forward's output (TA-LoRA: its orthogonality penalty)."""
        return output

    def generate(self, *args, task_ids: TaskIds = None, **kwargs):
        """``model.generate`` with per-example tasks; ``task_ids`` expand with beams and return sequences.

        One routing serves the whole call, so what the layers compute from it (TA-LoRA's prefixes)
        is computed once per call, not at every decoding step (the wrapped model's ``generate`` builds it,
        see :class:`~peft_talora.multitask.routing.TaskRouter`).
        """
        return self.model.generate(*args, task_ids=task_ids, **kwargs)

    def resolve_task_ids(self, task_ids: TaskIds, batch_size: int, device=None) -> torch.Tensor:
        """Validate ``task_ids`` against the active adapter's tasks; see :func:`~peft_talora.multitask.resolve_task_ids`."""
        config = self.peft_config[self._active_name]
        return resolve_task_ids(
            task_ids, batch_size=batch_size, num_tasks=config.num_tasks, task_names=config.task_names, device=device
        )

    def _warn_if_nothing_trains(self, name: str, resolved: torch.Tensor) -> None:
        """In the ``"new_tasks"`` stage, a training forward whose examples all route to frozen tasks
        trains nothing (zero gradients, no error from autograd): say so once, with the likely cause."""
        if not (self.training and torch.is_grad_enabled() and self.training_stage(name) == "new_tasks"):
            return
        sizes = self._task_block_sizes(name)
        first_new = sum(sizes[: self._frozen_blocks.get(name, len(sizes) - 1)])
        if resolved.numel() == 0 or bool((resolved >= first_new).any()):
            return
        config = self.peft_config[name]
        new = [config.task_label(t) for t in range(first_new, config.num_tasks)]
        got = sorted({config.task_label(int(t)) for t in resolved.unique().tolist()}, key=str)
        warnings.warn(
            f"In the 'new_tasks' stage of adapter {name!r} only the tasks {new} train, but this training batch routes "
            f"every example to frozen tasks {got}: it trains nothing. If the batch is meant for the new tasks, encode "
            "its task_ids with the model's own task list (tokenize_for_causal_lm(..., task_names=model)), not a list "
            "of the new tasks alone.",
            stacklevel=3,
        )

    # ----------------------------------------------------------------- stages and tasks
    def _check_adapter(self, adapter_name: Optional[str] = None) -> str:
        """``adapter_name`` (default: the active adapter), if it exists; else a ``ValueError`` listing them."""
        name = adapter_name or self._active_name
        if name not in self.peft_config:
            raise ValueError(f"Adapter {name!r} does not exist; available: {list(self.peft_config)}.")
        return name

    def training_stage(self, adapter_name: Optional[str] = None) -> str:
        """The training stage of ``adapter_name`` (default: the active adapter)."""
        return self._stages.get(self._check_adapter(adapter_name), "multi_task")

    def set_training_stage(self, stage: str, adapter_name: Optional[str] = None) -> None:
        """Choose what trains for ``adapter_name`` (default: the active adapter); see the method's ``STAGES``.

        - ``"multi_task"`` (the default): everything trains; each example gets its task's parameters.
        - ``"new_tasks"``: only the tasks added since the stage began (by ``add_tasks``) train; the shared
          parts and every earlier task are frozen and stay bit-identical.

        Setting a stage makes the adapter trainable, even if it was loaded for inference.
        """
        name = self._check_adapter(adapter_name)
        if stage not in self.STAGES:
            raise ValueError(f"Unknown training stage {stage!r}; choose one of {list(self.STAGES)}.")
        blocks = len(self._task_block_sizes(name))
        if stage == "new_tasks":
            if blocks == 1:
                raise ValueError(
                    f"Adapter {name!r} has no added tasks to train: call add_tasks([...]) first, which also selects "
                    "the 'new_tasks' stage."
                )
            self._frozen_blocks[name] = blocks - 1
        self._stages[name] = stage
        self.peft_config[name].inference_mode = False
        self._apply_stage(name)
        self._refresh_trainability(name)  # an adapter that is not the active one stays frozen

    def add_tasks(
        self,
        tasks: Union[int, Sequence[str]],
        *,
        adapter_name: Optional[str] = None,
        freeze: bool = True,
        init_from: TaskList = None,
    ) -> list[int]:
        """Add tasks (new names, or a count for unnamed adapters) and return their ids.

        The new tasks get their own parameter block, initialised so that no existing task's output
        changes. With ``freeze=True`` (the default) the adapter moves to the ``"new_tasks"`` stage:
        only the new tasks train. With ``freeze=False`` the stage stays; in the ``"new_tasks"``
        stage the new block then trains beside the blocks added since that stage began.
        ``init_from`` (an existing task, or one per new task; ids or names) starts each new task as
        a copy of that task's own factors instead of the method's neutral start, the way PEFT's MPT
        transfers a source prompt; :func:`peft_talora.multitask.transfer.closest_task` picks one
        from the new task's examples. Reachable from the PEFT model: ``peft_model.add_tasks([...])``.
        """
        name = self._check_adapter(adapter_name)
        config = self.peft_config[name]
        sources = None if init_from is None else config.resolve_task_list(init_from, "add_tasks(init_from=...)")
        before = (config.num_tasks, config.task_names)
        first, count = self._extend_task_list(name, tasks)
        if sources is not None and len(sources) not in (1, count):
            config.num_tasks, config.task_names = before
            raise ValueError(
                f"add_tasks got {len(sources)} tasks in init_from for {count} new tasks; give one task to copy "
                "for all of them or one per new task."
            )
        self._add_task_block(name, count)
        if sources is not None:
            self._copy_task_factors(name, sources * count if len(sources) == 1 else sources)
        if freeze:
            self.set_training_stage("new_tasks", name)
        else:
            self._refresh_trainability(name)
        return list(range(first, first + count))

    def _forget_adapter(self, adapter_name: str) -> None:
        """Drop the per-adapter state of a deleted adapter, so a new adapter of that name starts afresh."""
        self._stages.pop(adapter_name, None)
        self._frozen_blocks.pop(adapter_name, None)

    def _extend_task_list(self, adapter_name: str, tasks: Union[int, Sequence[str]]) -> tuple[int, int]:
        """Grow the adapter's config by ``tasks`` (validated first); returns (first new id, count)."""
        config = self.peft_config[adapter_name]
        names = config.new_task_names(tasks)  # raises before anything changes
        first = config.num_tasks
        count = int(tasks) if names is None else len(names) - first
        config.num_tasks = first + count
        config.task_names = names
        return first, count

    def _export(self) -> Optional[tuple]:
        """The export of this tuner running in this context: (its configs as shown, adapter -> task ids), or ``None``."""
        return (_EXPORTS.get() or {}).get(self)

    @property
    def _exported_tasks(self) -> dict[str, list[int]]:
        """Adapter name -> the task ids being exported, in this context; empty outside an export."""
        export = self._export()
        return export[1] if export is not None else {}

    def exported_configs(self) -> Optional[Mapping]:
        """The adapters' configs as the export running in this context writes them (read-only), else ``None``.

        ``PeftModel.peft_config`` returns it inside :meth:`exporting_tasks` (``peft_patches``), so PEFT's
        save writes the restricted configs; the tuner itself keeps reading ``self.peft_config``, the real
        configs, so routing and every change to the adapters stay consistent with the weights.
        """
        export = self._export()
        return export[0] if export is not None else None

    @contextmanager
    def exporting_tasks(self, tasks: TaskList, adapter_names: Sequence[str]):
        """Within this context the adapters' configs and saved tensors hold only ``tasks`` (ids or names).

        Used by ``save_pretrained(path, tasks=[...])`` and ``push_to_hub(repo, tasks=[...])``. Tasks
        are renumbered ``0..k-1`` in the order given; with one task the export needs no ``task_ids``.
        Nothing of the model changes: only what PEFT's save reads through ``PeftModel.peft_config``, in
        this context (thread, asyncio task), is the export's view (:meth:`exported_configs`); other
        threads, and this one's calls of the model, route every task by its own id.
        """
        if self.exported_configs() is not None:
            raise ValueError(
                "An export of tasks is already running here (save_pretrained/push_to_hub with tasks=...); a save "
                "with tasks= inside it would number the tasks twice. Save each selection on its own."
            )
        configs = self.peft_config
        selections = {
            name: configs[name].resolve_task_list(tasks, f"export of adapter {name!r}") for name in adapter_names
        }
        shown = {**configs, **{name: configs[name].restricted_to(ids) for name, ids in selections.items()}}
        token = _EXPORTS.set({**(_EXPORTS.get() or {}), self: (_ExportedConfigs(shown), selections)})
        try:
            yield
        finally:
            _EXPORTS.reset(token)

    def update_model_card(self, output_dir: str) -> None:
        """Add the method's tags, each saved adapter's task-name -> id map and the loading lines to
        ``output_dir/README.md``.

        The section sits between two HTML-comment markers and a later save replaces only what is between
        them: whatever else the card holds (the user's own sections, before or after) is kept. The loading
        lines name the folder or Hub repo the card is saved for (:func:`card_location`, set by
        ``save_pretrained``/``push_to_hub``; ``output_dir`` otherwise) and the adapters saved there.
        """
        from huggingface_hub import ModelCard

        path = os.path.join(output_dir, "README.md")
        card = ModelCard.load(path)
        card.data.tags = sorted({*(card.data.tags or []), *self.model_card_tags})
        configs = self._card_configs()
        saved = _saved_adapters(output_dir, configs)
        lines = []
        for name in saved:
            config = configs[name]
            tasks = [config.task_label(i) for i in range(config.num_tasks)]
            lines.append(
                f"- adapter `{name}`: {len(tasks)} task(s), in id order: " + ", ".join(f"`{t}`" for t in tasks)
            )
            lines += ["", "  | task id | task name |", "  |---|---|"]
            lines += [f"  | {i} | `{t}` |" for i, t in enumerate(tasks)] + [""]
        section = "\n".join(
            [
                CARD_START,
                "## Tasks",
                "",
                "Route each example with `task_ids` (ids or these names):",
                "",
                *lines,
                *self._loading_lines(output_dir, saved),
                CARD_END,
            ]
        )
        text = card.text
        start = text.find(CARD_START)
        end = text.find(CARD_END, start) if start >= 0 else -1
        if end >= 0 and text.count(CARD_START) == 1 and text.count(CARD_END) == 1:
            text = text[:start] + section + text[end + len(CARD_END) :]
        else:  # no section yet, an old card, or markers someone removed in part: lone markers go, text stays
            text = _LEGACY_SECTION.sub("", text.replace(CARD_START, "").replace(CARD_END, ""))
            text = text.rstrip() + "\n\n" + section + "\n"
        card.text = text
        card.save(path)

    def _card_configs(self) -> Mapping:
        """The configs a model card describes: the export's inside one, else the adapters' own."""
        exported = self.exported_configs()
        return self.peft_config if exported is None else exported

    def _loading_lines(self, output_dir: str, saved: Sequence[str]) -> list[str]:
        """The ``## How to load`` section of the model card (markdown lines) for the adapters ``saved``."""
        location = _CARD_LOCATION.get() or str(output_dir)
        first, *rest = sorted(saved, key=lambda name: name != "default")  # "default" sits at the root: it goes first
        configs = self._card_configs()
        config = configs[first]
        # every adapter sits on the same base; one added with add_adapter may not record it
        paths = [config.base_model_name_or_path, *(c.base_model_name_or_path for c in configs.values())]
        base = next((path for path in paths if path), "<base model>")
        where = f'"{location}"' if first == "default" else f'"{location}", subfolder="{first}", adapter_name="{first}"'
        others = [f'model.load_adapter("{location}", adapter_name="{n}", subfolder="{n}")' for n in rest]
        example = config.task_label(0) if config.task_names else 0
        auto = [  # AutoPeftModel would look for the base model in the subfolder too: only for an adapter at the root
            "```python",
            "import peft_talora",
            "from peft import AutoPeftModelForCausalLM",
            "",
            f"model = AutoPeftModelForCausalLM.from_pretrained({where})",
            *others,
            "```",
            "",
            "or, onto a base model you have already loaded:",
            "",
        ]
        return [
            "## How to load",
            "",
            "`import peft_talora` registers this adapter's method with PEFT; then PEFT loads it as any other:",
            "",
            *(auto if first == "default" else []),
            "```python",
            "import peft_talora",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f"model = PeftModel.from_pretrained(base, {where})",
            *others,
            "```",
            "",
            f"Then pass the tasks with every call: `model(**inputs, task_ids=[{example!r}, ...])`, "
            f"`model.generate(**inputs, task_ids=[{example!r}, ...])`.",
        ]


#: The markers around the model card's generated section; a save replaces only what is between them.
CARD_START = "<!-- peft-talora: generated section, replaced on every save -->"
CARD_END = "<!-- peft-talora: end of generated section -->"
#: The section as cards written before the markers hold it (from its heading to its last line).
_LEGACY_SECTION = re.compile(
    r"^## Tasks\n\nRoute each example with `task_ids`.*?^Then pass the tasks with every call:[^\n]*\n?", re.S | re.M
)


def _saved_adapters(output_dir: str, configs: dict) -> list[str]:
    """The adapters a card in ``output_dir`` is for, in the model's order: those the save names
    (:func:`card_location`), else those whose files are in ``output_dir`` (``"default"`` at its root, the others
    in subfolders of their name: a ``push_to_hub`` upload), else every adapter."""
    named = _CARD_ADAPTERS.get()
    found = [
        name
        for name in configs
        if (
            name in named
            if named is not None
            else os.path.isfile(os.path.join(output_dir, "" if name == "default" else name, "adapter_config.json"))
        )
    ]
    return found or list(configs)


class _ExportedConfigs(Mapping):
    """Adapter name -> config as an export writes them; read-only, since an adapter added or removed in the
    middle of a save would exist in this view only."""

    def __init__(self, configs: dict):
        self._configs = configs

    def __getitem__(self, name):
        return self._configs[name]

    def __iter__(self):
        return iter(self._configs)

    def __len__(self) -> int:
        return len(self._configs)

    def __setitem__(self, name, config):
        raise ValueError(_CHANGE_IN_EXPORT)

    def __delitem__(self, name):
        raise ValueError(_CHANGE_IN_EXPORT)


_CHANGE_IN_EXPORT = (
    "Adapters cannot be added or removed while save_pretrained/push_to_hub(tasks=...) writes them; "
    "change them before or after the save."
)
#: The exports running in this context: tuner -> (its configs as the export shows them, adapter -> exported task ids).
_EXPORTS: ContextVar[Optional[dict]] = ContextVar("peft_talora_exports", default=None)
#: Where the model card being written will be loaded from (a folder or a Hub repo id), see :func:`card_location`.
_CARD_LOCATION: ContextVar[Optional[str]] = ContextVar("peft_talora_card_location", default=None)
#: The adapters the save being carded writes (``selected_adapters``), see :func:`card_location`.
_CARD_ADAPTERS: ContextVar[Optional[tuple]] = ContextVar("peft_talora_card_adapters", default=None)


@contextmanager
def card_location(location, adapters: Optional[Sequence[str]] = None):
    """Within this context, model cards' loading lines name ``location`` and list ``adapters`` (the adapters being
    saved; ``None``: those found in the card's folder); an outer location (a ``push_to_hub`` repo id around its own
    ``save_pretrained`` into a temporary folder) is kept."""
    token = _CARD_LOCATION.set(str(location)) if _CARD_LOCATION.get() is None else None
    listed = _CARD_ADAPTERS.set(tuple(adapters)) if adapters is not None and _CARD_ADAPTERS.get() is None else None
    try:
        yield
    finally:
        if listed is not None:
            _CARD_ADAPTERS.reset(listed)
        if token is not None:
            _CARD_LOCATION.reset(token)


def text_config(model):
    """The text part of a transformers model's config (a multimodal model's language model), or its config."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def base_model_shape(model) -> dict:
    """What an adapter depends on in ``model`` (a transformers model): its type and attention shape."""
    text = text_config(model)
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
    differences = [
        f"{k}: {saved[k]!r} in the file, {here[k]!r} here" for k in saved if k in here and saved[k] != here[k]
    ]
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
