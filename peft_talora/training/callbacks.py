"""Trainer callback that logs TA-LoRA's orthogonality penalty as its own entry."""

from __future__ import annotations

from transformers import TrainerCallback


class OrthogonalityLogCallback(TrainerCallback):
    """Adds ``orthogonality_loss`` (mean since the previous log) to every training log of ``Trainer``.

    ``Trainer(..., callbacks=[OrthogonalityLogCallback()])``; the logged ``loss`` already includes
    ``orthogonality_weight * orthogonality_loss``.
    """

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        tuner = getattr(getattr(model, "module", model), "base_model", None)
        running = getattr(tuner, "orthogonality_log", None)
        if running is None or logs is None or "loss" not in logs:
            return
        value = running.pop()
        if value is not None:
            logs["orthogonality_loss"] = value
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["orthogonality_loss"] = value
