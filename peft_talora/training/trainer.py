"""The training helper: a stock ``Trainer`` set up the way a multi-task adapter wants it.

:func:`build_trainer` adds, to whatever a user would pass ``Trainer`` anyway:

- fast/slow learning rates for TA-LoRA (``args.optim``, AdamW by default, over the parameter groups of
  :func:`peft_talora.talora_parameter_groups`; Trainer's scheduler then scales every group);
- multi-task sampling (``task_sampling``: ``"proportional"``, ``"temperature"``, ``"uncertainty"``);
- the orthogonality penalty as its own log entry (``orthogonality_loss``, seen by every ``report_to`` logger);
- a collator that masks prompt tokens, pads and keeps ``task_ids``.

It runs unchanged under ``torchrun`` and ``accelerate launch`` (Trainer handles DDP);
``python -m peft_talora.training`` is the command-line entry point built on it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..multitask.config import MultiTaskConfig
from ..talora.model import TALoraModel
from .callbacks import add_orthogonality_loss, forget_unlogged_penalties
from .collator import MultiTaskDataCollator
from .label_logits import label_positions, supports_label_logits
from .optim import DEFAULT_FAST_LR_RATIO, talora_parameter_groups
from .sampling import STRATEGIES, MultiTaskSampler, normalized_entropy

#: The file of a checkpoint that holds the task sampler's state (:meth:`MultiTaskTrainer.train`).
TASK_SAMPLER_NAME = "task_sampler.pt"


def build_trainer(
    model,
    args: TrainingArguments,
    train_dataset=None,
    eval_dataset=None,
    *,
    processing_class=None,
    data_collator=None,
    fast_lr_ratio: float = DEFAULT_FAST_LR_RATIO,
    task_sampling: Optional[str] = None,
    task_sampling_temperature: float = 2.0,
    compute_metrics=None,
    callbacks: Optional[list] = None,
    **trainer_kwargs,
) -> MultiTaskTrainer:
    """A :class:`~peft_talora.training.trainer.MultiTaskTrainer` for ``model`` (a ``PeftModel``).

    For a TA-LoRA adapter the optimizer is ``args.optim`` (with ``args.optim_args``, betas and epsilon, as
    ``Trainer`` would build it; AdamW by default) over fast/slow parameter groups: the learning rate
    times ``fast_lr_ratio`` for the fast factors, ``args.weight_decay`` where ``Trainer`` would decay.
    Other methods get Trainer's own optimizer. ``data_collator`` defaults to :class:`MultiTaskDataCollator`.
    """
    optimizers = (None, None)
    if isinstance(getattr(model, "base_model", None), TALoraModel):
        optimizers = (talora_optimizer_from_args(model, args, fast_lr_ratio), None)
    if data_collator is None:  # task names are the adapter's; another PEFT method's rows carry no task
        multi_task = isinstance(getattr(model, "active_peft_config", None), MultiTaskConfig)
        data_collator = MultiTaskDataCollator(
            tokenizer=processing_class,
            task_names=model if multi_task else None,
            task_column=trainer_kwargs.get("task_column", "task_ids"),
        )
    return MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        data_collator=data_collator,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        optimizers=optimizers,
        task_sampling=task_sampling,
        task_sampling_temperature=task_sampling_temperature,
        **trainer_kwargs,
    )


def talora_optimizer_from_args(model, args: TrainingArguments, fast_lr_ratio: float = DEFAULT_FAST_LR_RATIO):
    """The optimizer ``args.optim`` names, built the way ``Trainer`` builds it, over TA-LoRA's fast/slow groups."""
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if {"params", "optimizer_dict", "model"} & set(kwargs):
        raise ValueError(
            f"optim={args.optim!r} chooses its own parameter groups, so it cannot take TA-LoRA's fast/slow learning "
            "rates; use an AdamW, SGD or Adafactor variant, or pass optimizers=(your_optimizer, None) to Trainer."
        )
    groups = talora_parameter_groups(model, args.learning_rate, fast_lr_ratio, args.weight_decay)
    return optimizer_cls(groups, **kwargs)


def check_task_sampling(trainer: Trainer) -> None:
    """``task_sampling`` replaces Trainer's sampler: refuse what would silently skip or override it. Shared by
    :class:`MultiTaskTrainer` and the TRL trainers."""
    if isinstance(trainer.train_dataset, torch.utils.data.IterableDataset):
        raise ValueError(
            f"task_sampling={trainer.task_sampling!r} needs a map-style training set (datasets.Dataset): Trainer takes "
            "an iterable dataset's own order and never builds a sampler. Pass a Dataset, or interleave the tasks "
            "of your stream yourself (datasets.interleave_datasets with probabilities) and drop task_sampling."
        )
    strategy = getattr(trainer.args, "train_sampling_strategy", "random")
    if strategy not in ("random", None):
        raise ValueError(
            f"task_sampling={trainer.task_sampling!r} and train_sampling_strategy={strategy!r} both choose the training "
            "order; keep one of them (train_sampling_strategy='random' leaves it to task_sampling)."
        )


def _column_values(dataset, column: str) -> list:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        if column not in names:
            raise ValueError(f"task_sampling needs a {column!r} column in the training set; its columns are {names}.")
        return list(dataset[column])
    return [dataset[i][column] for i in range(len(dataset))]


def task_sampler(
    trainer: Trainer,
    dataset,
    column: str,
    strategy: str,
    temperature: float,
    uncertainty_momentum: float = 0.0,
    refresh_every: Optional[int] = None,
) -> MultiTaskSampler:
    """The :class:`MultiTaskSampler` of ``trainer``'s training set ``dataset`` under ``strategy``.

    ``column`` holds each example's task (an int id, or a task name of the model's adapter); the sampler
    is seeded with ``args.data_seed`` (else ``args.seed``). Shared by :class:`MultiTaskTrainer` and the
    TRL trainers of :mod:`peft_talora.training.trl_trainers`.
    """
    from .collator import TaskIdEncoder

    values = _column_values(dataset, column)
    num_tasks = None
    try:
        encoder = TaskIdEncoder.from_config(trainer.accelerator.unwrap_model(trainer.model))
        values, num_tasks = encoder.encode(values), encoder.num_tasks
    except TypeError:  # not a TA-LoRA model: take the ids as they are
        values = [int(v) for v in values]
    seed = trainer.args.data_seed if trainer.args.data_seed is not None else trainer.args.seed
    return MultiTaskSampler(
        values,
        strategy,
        temperature=temperature,
        num_tasks=num_tasks,
        seed=seed,
        uncertainty_momentum=uncertainty_momentum,
        refresh_every=refresh_every,
    )


def _next_token_entropies(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean normalised entropy of a causal LM's predictions at its target tokens ``(B,)``.

    ``shift_labels`` ``(B, K)`` holds position ``k``'s next-token label; ``logits`` ``(B, K', V)`` end with those
    ``K`` positions (prompt-learning adapters put their virtual tokens' logits first, ``K' > K``). Entropies are
    computed at the target positions only: over every position of a long sequence and a large vocabulary the
    float64 temporaries would take gigabytes."""
    logits = logits[:, logits.shape[1] - shift_labels.shape[1] :]
    mask = shift_labels != -100
    entropy = torch.zeros(mask.shape, dtype=torch.float64, device=logits.device)
    entropy[mask] = normalized_entropy(logits[mask].float())  # normalised by log(vocab)
    counts = mask.sum(-1)
    means = (entropy * mask).sum(-1) / counts.clamp(min=1)
    return torch.where(counts > 0, means, torch.zeros_like(means))


class TaskColumnAndPenaltyLog:
    """What every trainer of this package adds to a transformers ``Trainer`` (:class:`MultiTaskTrainer` and the TRL
    trainers): the task column ``_task_column`` (``None``: none) survives ``remove_unused_columns`` whatever it is
    called (the collator reads it); each training log gets ``orthogonality_loss`` before any callback, so
    ``report_to`` loggers get it; and each ``train()`` starts that mean afresh."""

    _task_column: Optional[str] = None

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._task_column is not None and self._task_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self._task_column]

    def log(self, logs: dict, *args, **kwargs) -> None:
        add_orthogonality_loss(self.model, logs)
        super().log(logs, *args, **kwargs)

    def train(self, *args, **kwargs):
        forget_unlogged_penalties(self.model)
        return super().train(*args, **kwargs)


class MultiTaskTrainer(TaskColumnAndPenaltyLog, Trainer):
    """``transformers.Trainer`` whose training order follows a multi-task sampling strategy.

    ``task_sampling``: ``None`` (the stock sampler), ``"proportional"``, ``"temperature"`` or
    ``"uncertainty"`` (see :mod:`peft_talora.training.sampling`); ``task_sampling_temperature`` is ``T``;
    the sampler is seeded with ``args.data_seed`` (else ``args.seed``). The training set needs a
    ``task_column`` column (int ids, or task names of the adapter). With ``"uncertainty"`` every
    training batch updates its tasks' uncertainties from the model's own predictions at the
    target tokens (entropy normalised by the vocabulary size; on several processes the per-task
    sums are all-reduced, so every process holds the global batch's estimate and draws the same
    stream); the probabilities are refreshed every ``uncertainty_refresh_every``
    examples drawn. The sampler in use is ``trainer.task_sampler``.

    ``label_logits_only`` (default on): a training step computes the vocabulary logits only at the
    positions whose next token is a label (:mod:`peft_talora.training.label_logits`); the loss is
    the same, the LM head's work over the prompt is skipped. Off by itself where it cannot apply
    (prompt-learning adapters, label smoothing, a custom ``compute_loss_func``, a model without
    ``logits_to_keep``); evaluation always computes every position's logits.
    """

    def __init__(
        self,
        *args,
        task_sampling: Optional[str] = None,
        task_sampling_temperature: float = 2.0,
        task_column: str = "task_ids",
        uncertainty_momentum: float = 0.0,
        uncertainty_refresh_every: Optional[int] = None,
        label_logits_only: bool = True,
        **kwargs,
    ):
        if task_sampling is not None and task_sampling not in STRATEGIES:
            raise ValueError(f"Unknown task_sampling {task_sampling!r}; choose None or one of {list(STRATEGIES)}.")
        self.task_sampling = task_sampling
        self.task_sampling_temperature = task_sampling_temperature
        self._task_column = task_column
        self.uncertainty_momentum = uncertainty_momentum
        self.uncertainty_refresh_every = uncertainty_refresh_every
        self.task_sampler: Optional[MultiTaskSampler] = None
        self.label_logits_only = label_logits_only
        super().__init__(*args, **kwargs)
        self._label_logits_model = self._label_logits_supported = None
        if task_sampling is not None:
            check_task_sampling(self)

    @property
    def task_column(self) -> str:
        """The training set's column of task ids or names."""
        return self._task_column

    def _set_signature_columns_if_needed(self) -> None:
        """The task column is kept (the mixin), and the columns the package's collator reads: text it tokenises
        itself, and the ``prompt_length`` that masks tokenised prompts out of the loss."""
        super()._set_signature_columns_if_needed()
        if isinstance(self.data_collator, MultiTaskDataCollator):
            text = [c for c in ("prompt", "completion", "prompt_length") if c not in self._signature_columns]
            self._signature_columns = [*self._signature_columns, *text]

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``; a run resumed from a checkpoint also gets its task sampler's state back."""
        path = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
        self._resuming_from = path or None  # (none found: Trainer raises)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._resuming_from = None

    def _get_train_sampler(self, train_dataset=None):
        if self.task_sampling is None:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        self.task_sampler = task_sampler(
            self,
            dataset,
            self.task_column,
            self.task_sampling,
            self.task_sampling_temperature,
            self.uncertainty_momentum,
            self.uncertainty_refresh_every,
        )
        resuming = getattr(self, "_resuming_from", None)
        saved = resuming and os.path.join(resuming, TASK_SAMPLER_NAME)
        if saved and os.path.isfile(saved):
            self.task_sampler.load_state_dict(torch.load(saved, weights_only=True))
        return self.task_sampler

    def _save_rng_state(self, output_dir: str) -> None:
        """Checkpoints keep the task sampler's state beside the random states (see :meth:`train`)."""
        super()._save_rng_state(output_dir)
        if self.task_sampler is not None and self.args.should_save:
            torch.save(self.task_sampler.state_dict(), os.path.join(output_dir, TASK_SAMPLER_NAME))

    def _keeps_label_logits_only(self, model, labels) -> bool:
        """Whether this training step computes logits at the label positions only (see the class doc)."""
        if not (self.label_logits_only and model.training and labels is not None):
            return False
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return False  # they read every position's logits
        if self._label_logits_model is not model:  # checked once per model (Trainer may wrap it later)
            self._label_logits_model, self._label_logits_supported = model, supports_label_logits(model)
        return self._label_logits_supported

    def _with_orthogonality_term(self, result, model, labels, num_items_in_batch, return_outputs: bool):
        """Label smoothing or a ``compute_loss_func``: ``Trainer`` takes the labels away from the model, which then
        returns no loss to add TA-LoRA's orthogonality penalty to; add it here, scaled as ``Trainer`` scales
        that loss (the model's own loss path adds it itself)."""
        if labels is None or (self.label_smoother is None and self.compute_loss_func is None):
            return result
        tuner = getattr(self.accelerator.unwrap_model(model), "base_model", None)
        term = tuner.orthogonality_term(labels, num_items_in_batch) if hasattr(tuner, "orthogonality_term") else None
        if term is None:
            return result
        accepts = self.model_accepts_loss_kwargs or self.compute_loss_func is not None
        if self.args.average_tokens_across_devices and accepts and num_items_in_batch is not None:
            term = term * (
                self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
            )
        if return_outputs:
            loss, outputs = result
            return loss + term, outputs
        return result + term

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        shift_labels = None
        if self._keeps_label_logits_only(model, labels) and (kept := label_positions(labels)) is not None:
            positions, shift_labels = kept
            inputs = {**inputs, "logits_to_keep": positions, "shift_labels": shift_labels}
        sampler = self.task_sampler
        track = (
            sampler is not None
            and sampler.strategy == "uncertainty"
            and model.training
            and labels is not None
            and inputs.get("task_ids") is not None
        )
        if not track:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            return self._with_orthogonality_term(result, model, labels, num_items_in_batch, return_outputs)
        task_ids = inputs["task_ids"]  # the collator's key, whatever the dataset column is called
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = self._with_orthogonality_term(loss, model, labels, num_items_in_batch, False)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
        if shift_labels is None:  # every position's logits: position i predicts token i + 1
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        with torch.no_grad():
            entropies = _next_token_entropies(logits.detach(), shift_labels)
            has_targets = (shift_labels != -100).any(-1)
            task_ids = torch.as_tensor(task_ids, device=entropies.device)
            sums, counts = sampler.task_totals(task_ids[has_targets], entropies[has_targets])
            if self.accelerator.num_processes > 1:
                # every process draws from the same stream and takes its share of it, so every process must
                # apply the same update: the whole global batch's, not its own share's
                sums, counts = self.accelerator.reduce(torch.stack([sums, counts]), reduction="sum")
            sampler.update_from_totals(sums, counts)
        return (loss, outputs) if return_outputs else loss
