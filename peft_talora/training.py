"""The training helper: a stock ``Trainer`` set up the way a multi-task adapter wants it.

:func:`build_trainer` adds, to whatever a user would pass ``Trainer`` anyway:

- fast/slow learning rates for TA-LoRA (:func:`peft_talora.talora_optimizer`; Trainer's
  scheduler then scales every group);
- multi-task sampling (``task_sampling``: ``"proportional"``, ``"temperature"``, ``"uncertainty"``);
- the orthogonality penalty as its own log entry;
- a collator that masks prompt tokens, pads and keeps ``task_ids``.

It runs unchanged under ``torchrun`` and ``accelerate launch`` (Trainer handles DDP);
``python -m peft_talora.train`` is the command-line entry point built on it.
"""

from __future__ import annotations

from typing import Optional

from transformers import TrainingArguments

from .callbacks import OrthogonalityLogCallback
from .data import TALoraDataCollator
from .model import TALoraModel
from .optim import DEFAULT_FAST_LR_RATIO, talora_optimizer
from .sampling import MultiTaskTrainer


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
    """A :class:`~peft_talora.sampling.MultiTaskTrainer` for ``model`` (a ``PeftModel``).

    For a TA-LoRA adapter the optimizer is AdamW over fast/slow groups built from ``args``
    (learning rate, weight decay, betas, epsilon) with ``fast_lr_ratio``; other methods get
    Trainer's own optimizer. ``data_collator`` defaults to :class:`TALoraDataCollator`.
    """
    optimizers = (None, None)
    if isinstance(getattr(model, "base_model", None), TALoraModel):
        optimizer = talora_optimizer(
            model,
            lr=args.learning_rate,
            fast_lr_ratio=fast_lr_ratio,
            weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        optimizers = (optimizer, None)
    if data_collator is None:
        data_collator = TALoraDataCollator(tokenizer=processing_class, task_names=model)
    return MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        data_collator=data_collator,
        compute_metrics=compute_metrics,
        callbacks=[OrthogonalityLogCallback(), *(callbacks or [])],
        optimizers=optimizers,
        task_sampling=task_sampling,
        task_sampling_temperature=task_sampling_temperature,
        **trainer_kwargs,
    )
