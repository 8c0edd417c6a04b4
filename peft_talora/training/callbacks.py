"""Trainer callback that logs TA-LoRA's orthogonality penalty as its own entry."""

from __future__ import annotations

from typing import Optional

from transformers import TrainerCallback


def _running_penalty(model):
    """TA-LoRA's running mean of the penalty since the last log (``None`` for other adapters); ``model`` may be
    wrapped by DDP."""
    tuner = getattr(getattr(model, "module", model), "base_model", None)
    return getattr(tuner, "orthogonality_log", None)


def add_orthogonality_loss(model, logs: Optional[dict]) -> Optional[float]:
    """Put ``orthogonality_loss`` (TA-LoRA's penalty, mean since the previous log) into a training log
    ``logs`` (one with ``loss``) and return it; ``None`` (nothing added) for other adapters or logs."""
    running = _running_penalty(model)
    if running is None or logs is None or "loss" not in logs:
        return None
    value = running.pop()
    if value is not None:
        logs["orthogonality_loss"] = value
    return value


def forget_unlogged_penalties(model) -> None:
    """Drop the penalties added since the last log (a run that ended between logs), so that a new run's first
    ``orthogonality_loss`` is its own steps' mean."""
    running = _running_penalty(model)
    if running is not None:
        running.pop()


class OrthogonalityLogCallback(TrainerCallback):
    """Adds ``orthogonality_loss`` (mean since the previous log) to every training log of a plain ``Trainer``.

    ``Trainer(..., callbacks=[OrthogonalityLogCallback()])``; the logged ``loss`` already includes
    ``orthogonality_weight * orthogonality_loss``. ``Trainer`` runs the ``report_to`` loggers
    (TensorBoard, W&B, ...) before the callbacks it is given, so they miss this entry; it reaches them
    with :class:`~peft_talora.training.trainer.MultiTaskTrainer` (``build_trainer``) or the TRL trainers,
    which add it before any logger runs.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        forget_unlogged_penalties(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        value = add_orthogonality_loss(model, logs)
        if value is not None and state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["orthogonality_loss"] = value
