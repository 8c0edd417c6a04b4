"""TRL's ``SFTTrainer`` and ``DPOTrainer`` for multi-task adapters (TA-LoRA, MTL-LoRA): each example keeps its task.

TRL tokenises the dataset itself, keeps only the columns its collators read (``_signature_columns``)
and collates ``input_ids``/``attention_mask``/``labels`` (SFT) or the chosen and rejected rows
stacked as ``[chosen; rejected]`` (DPO). A task column is dropped on the way, and the first step
fails with "every call needs task_ids". :class:`MultiTaskSFTTrainer` and :class:`MultiTaskDPOTrainer`
are the stock trainers with exactly that changed:

- the task column (``task_column``, default ``"task_ids"``; ids or task names) survives TRL's
  column removal, and is checked against the adapter's tasks before any data is prepared;
- the collator TRL builds (or the one passed) is wrapped by :class:`TaskIdsCollator`, which adds
  ``task_ids`` ``(rows,)``, repeated for DPO's ``[chosen; rejected]`` rows;
- ``packing`` and ``padding_free`` (several examples, possibly of different tasks, in one row,
  while routing is one task per row) raise at construction instead of training on wrong routes;
- TA-LoRA's orthogonality penalty is added to the loss, as ``Trainer`` gets it from the model:
  TRL computes its losses from per-token log-probabilities and never reads the model's ``loss``;
- ``task_sampling="proportional"`` or ``"temperature"`` (with ``task_sampling_temperature``) draws
  the training order from :class:`peft_talora.training.sampling.MultiTaskSampler`, as
  :class:`peft_talora.training.MultiTaskTrainer` does. ``"uncertainty"`` is refused: it needs the
  model's predictions at the target tokens, which TRL's losses do not hand back.

Everything else (dataset formats, completion-only and assistant-only loss, PEFT's ``peft_config=``,
DPO's reference model computed with the adapter disabled) is TRL's own. Needs ``pip install trl``.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import numpy as np
import torch
from datasets import Dataset

try:
    from trl import DPOTrainer, SFTTrainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("peft_talora.training.trl_trainers needs TRL: `pip install trl`.") from error

from ..multitask import MultiTaskConfig
from ..peft_patches import adapter_tensors
from ..talora.model import TALoraModel
from .collator import TaskIdEncoder, _encode_task_column
from .trainer import TaskColumnAndPenaltyLog, check_task_sampling, task_sampler

#: The task-sampling strategies the TRL trainers take (``"uncertainty"`` needs predictions TRL does not expose).
TRL_TASK_SAMPLING = ("proportional", "temperature")


class TaskIdsCollator:
    """Wraps a collator so that every batch also carries ``task_ids`` ``(rows,)`` (``torch.long``).

    Each feature's ``task_column`` (an id or a task name, mapped with ``task_names``: the adapter's
    config, the PEFT model or a list of names) is taken out before ``collator`` sees the features,
    and the ids are repeated ``rows_per_example`` times (2 for DPO, whose collator returns the
    chosen rows then the rejected rows). A batch whose row count is not ``len(features) *
    rows_per_example`` raises: its rows could not be routed one task each.
    """

    def __init__(self, collator, task_names=None, task_column: str = "task_ids", rows_per_example: int = 1):
        self.collator = collator
        self.encoder = None if task_names is None else _task_encoder(task_names)
        self.task_column = task_column
        self.rows_per_example = rows_per_example

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        missing = sum(self.task_column not in f for f in features)
        if missing:
            raise ValueError(
                f"{missing} of {len(features)} examples have no {self.task_column!r}; every example needs its task "
                "(an id or a task name) in that column."
            )
        values = [f[self.task_column] for f in features]
        values = [v.item() if isinstance(v, (torch.Tensor, np.generic, np.ndarray)) else v for v in values]
        task_ids = torch.tensor(_encode_task_column(values, self.encoder), dtype=torch.long)
        batch = self.collator([{k: v for k, v in f.items() if k != self.task_column} for f in features])
        rows = batch["input_ids"].shape[0]
        if rows != len(features) * self.rows_per_example:
            raise ValueError(
                f"The collator made {rows} rows from {len(features)} examples, so rows cannot be routed one task each "
                "(packing or padding-free collation mixes examples in a row); collate one example per row."
            )
        batch["task_ids"] = task_ids.repeat(self.rows_per_example)
        return batch


def _task_encoder(source) -> TaskIdEncoder:
    if isinstance(source, TaskIdEncoder):
        return source
    if isinstance(source, (list, tuple)):
        return TaskIdEncoder(task_names=source)
    return TaskIdEncoder.from_config(source)


def _multitask_config(model, peft_config) -> MultiTaskConfig:
    """The adapter config whose tasks the dataset must name: ``peft_config``, or the PEFT model's active one."""
    if peft_config is not None:
        if isinstance(peft_config, MultiTaskConfig):
            return peft_config
        raise TypeError(
            f"This trainer trains TA-LoRA/MTL-LoRA adapters (task-routed); peft_config is a "
            f"{type(peft_config).__name__}. Use trl's own trainer for it."
        )
    configs = getattr(model, "peft_config", None)
    config = configs.get(getattr(model, "active_adapter", None)) if isinstance(configs, dict) else None
    if isinstance(config, MultiTaskConfig):
        return config
    raise TypeError(
        "This trainer needs a TA-LoRA/MTL-LoRA adapter: pass peft_config=TALoraConfig(...)/MTLLoraConfig(...), or a "
        "PeftModel whose active adapter is one."
    )


def _check_task_column(dataset, name: str, column: str, config: MultiTaskConfig) -> None:
    """Fail before any preparation if ``dataset`` lacks ``column`` (several tasks) or names unknown tasks."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            _check_task_column(part, f"{name}[{key!r}]", column, config)
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None or (column not in columns and config.num_tasks == 1):  # one task: task_ids are optional
        return
    if column not in columns:
        raise ValueError(
            f"The {name} has no {column!r} column (columns: {list(columns)}); this adapter has {config.num_tasks} "
            f"task(s), so every example needs one. Add a column of task ids or names "
            f"({[config.task_label(i) for i in range(config.num_tasks)]}), or pass task_column=<its name>."
        )
    if isinstance(dataset, Dataset):  # an IterableDataset is checked batch by batch, by the collator
        try:
            _encode_task_column(list(dataset[column]), _task_encoder(config))
        except ValueError as error:
            raise ValueError(f"The {name}'s {column!r} column: {error}") from None


class _TaskColumnMixin(TaskColumnAndPenaltyLog):
    """What the TRL trainers below share; ``_rows_per_example`` is how many collated rows one example gives."""

    _rows_per_example = 1
    _row_mixing_options = ()

    def __init__(
        self,
        *args,
        task_column: str = "task_ids",
        task_sampling: Optional[str] = None,
        task_sampling_temperature: float = 2.0,
        **kwargs,
    ):
        if task_sampling is not None and task_sampling not in TRL_TASK_SAMPLING:
            raise ValueError(
                f"{type(self).__name__} takes task_sampling None, {' or '.join(map(repr, TRL_TASK_SAMPLING))}; got "
                f"{task_sampling!r}. ('uncertainty' needs the model's predictions at the target tokens, which TRL's "
                "losses do not hand back: use peft_talora.training.MultiTaskTrainer for it.)"
            )
        self.task_sampling, self.task_sampling_temperature = task_sampling, task_sampling_temperature
        self.task_sampler = None
        given = inspect.signature(super().__init__).bind(*args, **kwargs).arguments
        self._check_row_options(given.get("args"))
        config = _multitask_config(given.get("model"), given.get("peft_config"))
        for name in ("train_dataset", "eval_dataset"):
            _check_task_column(given.get(name), name.replace("_", " "), task_column, config)
        columns = getattr(given.get("train_dataset"), "column_names", None) or ()
        # a single-task adapter needs no task column (no task_ids means task 0)
        self._task_column = None if config.num_tasks == 1 and task_column not in columns else task_column
        super().__init__(*args, **kwargs)
        if task_sampling is not None:
            check_task_sampling(self)
        if self._task_column is not None:
            self.data_collator = TaskIdsCollator(
                self.data_collator, _task_encoder(self.model), task_column, rows_per_example=self._rows_per_example
            )

    def _check_row_options(self, args) -> None:
        on = [option for option in self._row_mixing_options if getattr(args, option, None)]
        if on:
            settings = ", ".join(f"{option}=False" for option in self._row_mixing_options)
            raise ValueError(
                f"{type(self).__name__} does not support {', '.join(f'{o}=True' for o in on)}: it puts several "
                "examples, possibly of different tasks, into one row, but a multi-task adapter routes each row to one "
                f"task, so training would use wrong routes. Set {settings} in the config."
            )

    def _get_train_sampler(self, train_dataset=None):
        if self.task_sampling is None or self._task_column is None:  # stock order; one task: nothing to balance
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        self.task_sampler = task_sampler(
            self, dataset, self._task_column, self.task_sampling, self.task_sampling_temperature
        )
        return self.task_sampler

    @property
    def _tuner(self):
        return self.accelerator.unwrap_model(self.model).base_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        penalty = self._orthogonality_term(model, inputs, num_items_in_batch)
        if penalty is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss + penalty, outputs
        return result + penalty

    def _orthogonality_term(self, model, inputs, num_items_in_batch) -> Optional[torch.Tensor]:
        """``lambda * R`` weighted as ``TALoraModel.forward`` weights it under ``Trainer`` (None when off)."""
        tuner = self._tuner
        if not (isinstance(tuner, TALoraModel) and model.training):
            return None
        term = tuner.orthogonality_term(inputs.get("labels"), num_items_in_batch)
        if term is not None and self.args.average_tokens_across_devices and num_items_in_batch is not None:
            term = term * (self.accelerator.num_processes // self.get_tp_size())  # as TRL scales its loss
        return term


class MultiTaskSFTTrainer(_TaskColumnMixin, SFTTrainer):
    """``trl.SFTTrainer`` for TA-LoRA/MTL-LoRA: the dataset's ``task_column`` (ids or names) routes each example.

    Takes every argument of ``SFTTrainer`` plus ``task_column``, ``task_sampling`` and
    ``task_sampling_temperature``. Works with TRL's prompt/completion
    and conversational (``messages``, or ``prompt``/``completion`` as message lists) datasets and
    their completion-only and assistant-only losses. ``packing=True`` and ``padding_free=True``
    raise a ``ValueError``.
    """

    _row_mixing_options = ("packing", "padding_free", "eval_packing")


class MultiTaskDPOTrainer(_TaskColumnMixin, DPOTrainer):
    """``trl.DPOTrainer`` for TA-LoRA/MTL-LoRA: the preference dataset's ``task_column`` routes each example.

    Takes every argument of ``DPOTrainer`` plus ``task_column``, ``task_sampling`` and
    ``task_sampling_temperature``. With ``peft_config=`` (and no
    ``ref_model``) the reference log-probabilities come from the model with the adapter disabled,
    as TRL does for every PEFT adapter; the task ids go to both the chosen and the rejected row.
    """

    _rows_per_example = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mirror_reference_adapter()

    def _mirror_reference_adapter(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if "ref" in getattr(model, "peft_config", {}) and "default" in model.peft_config:
            _copy_adapter(model, "default", "ref")

    def _precompute_ref_logps(self, *args, **kwargs):
        """``precompute_ref_log_probs=True``: TRL runs this inside ``__init__``, before the task column is wired
        into the collator and the reference adapter mirrors the policy: do both first."""
        self._mirror_reference_adapter()
        if self._task_column is None or isinstance(self.data_collator, TaskIdsCollator):
            return super()._precompute_ref_logps(*args, **kwargs)
        collator = self.data_collator
        self.data_collator = TaskIdsCollator(
            collator, _task_encoder(self.model), self._task_column, rows_per_example=self._rows_per_example
        )
        try:
            return super()._precompute_ref_logps(*args, **kwargs)
        finally:
            self.data_collator = collator


def _copy_adapter(model, source: str, target: str) -> None:
    """Give adapter ``target`` the values of ``source`` (:func:`~peft_talora.peft_patches.adapter_tensors`).

    TRL's DPO makes its reference adapter "ref" a copy of "default" by copying the parameters whose name
    contains ``.default.``; MTL-LoRA's end in ``.default`` (``q_proj.mtllora_A.default``), so its reference
    silently stayed at the initial values, i.e. the base model."""
    targets = adapter_tensors(model, target)
    with torch.no_grad():
        for name, param in adapter_tensors(model, source).items():
            counterpart = ".".join(target if part == source else part for part in name.split("."))
            if counterpart not in targets or targets[counterpart].shape != param.shape:
                raise ValueError(
                    f"The reference adapter {target!r} does not mirror {source!r} ({name} has no counterpart of the "
                    "same shape; an adapter with added tasks is laid out in blocks). Pass ref_model= (a copy of the "
                    "PEFT model) to the trainer instead."
                )
            targets[counterpart].copy_(param)
