"""Early stopping without a checkpoint round trip: end training at the best evaluation, the start included.

A task added from a few shots is trained for a handful of steps, and with few shots a step that
lowers the training loss can raise the held-out loss. :class:`KeepBestCallback` keeps an
in-memory copy of the trainable parameters (a new task's factors: kilobytes) at every evaluation
that improves on the best so far, and copies the best one back when training ends. With
``TrainingArguments(eval_on_start=True)`` the start is one of the candidates, so a new task that
starts at the base model (TA-LoRA's gate scale ``c = 0``) never ends worse, on the held-out rows,
than the base model.

Why not ``load_best_model_at_end``: it needs a saved checkpoint per evaluation and cannot pick the
start (no checkpoint exists at step 0).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from transformers import TrainerCallback


class KeepBestCallback(TrainerCallback):
    """Restores, at the end of ``train()``, the trainable parameters of the best evaluation.

    The metric is ``TrainingArguments.metric_for_best_model`` (default ``"loss"``, read as
    ``eval_loss``) and its direction ``greater_is_better``. Ties keep the earlier (shorter-trained)
    point. ``min_improvement`` (in the metric's units, default 0) is the margin by which an evaluation
    must beat the best so far to replace it: with few held-out rows a small gain is mostly noise, and a
    margin keeps the start (the base model) unless a later point is clearly better. ``best_step`` and
    ``best_metric`` say what was chosen (``None`` before any evaluation), ``history`` holds
    ``{step: metric}`` of every evaluation.
    The copy lives in memory for one ``train()`` call (single process or DDP, where every rank holds
    the same replica; not for FSDP-sharded parameters). Evaluations under another prefix (a test set's
    ``trainer.evaluate(ds, metric_key_prefix="test")``, the other datasets of a dict ``eval_dataset``)
    are left alone; the evaluation that should carry the metric and does not raises a ``KeyError``.
    """

    def __init__(self, min_improvement: float = 0.0):
        if not min_improvement >= 0:
            raise ValueError(f"KeepBestCallback(min_improvement=...) must be >= 0, got {min_improvement!r}.")
        self.min_improvement = float(min_improvement)
        self.best_step: Optional[int] = None
        self.best_metric: Optional[float] = None
        self.history: dict[int, float] = {}
        self._best: dict[str, torch.Tensor] = {}
        self._evaluations = 0  # in this train() call, under the metric's prefix

    def on_train_begin(self, args, state, control, **kwargs):
        self.best_step, self.best_metric, self.history, self._best = None, None, {}, {}
        self._evaluations = 0
        if args.load_best_model_at_end:
            warnings.warn(
                "KeepBestCallback and load_best_model_at_end=True both restore a best point; the callback runs "
                "last, so its choice (which may be the start, and honours min_improvement) replaces the checkpoint "
                "Trainer loaded, and state.best_model_checkpoint no longer describes the model. Set "
                "load_best_model_at_end=False.",
                stacklevel=2,
            )

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        name = args.metric_for_best_model or "loss"
        key = name if name.startswith("eval_") else f"eval_{name}"
        # Trainer's own speed metrics name the split ("eval", "eval_<dataset>"); a compute_metrics key ending in
        # "_runtime" has no "_samples_per_second" twin
        prefix = next(
            (
                m[: -len("_runtime")]
                for m in metrics or {}
                if m.endswith("_runtime") and f"{m[: -len('_runtime')]}_samples_per_second" in metrics
            ),
            None,
        )
        if prefix is not None and not key.startswith(f"{prefix}_"):
            return  # another split (a test set, another dataset of a dict eval_dataset): not ours to judge
        if prefix not in (None, "eval") and key not in metrics:
            names = {m[len(prefix) + 1 :] for m in metrics}
            if any(key[len(prefix) + 1 :].endswith(f"_{n}") for n in names):
                return  # dataset "a" beside "a_b" (metric eval_a_b_loss, this one has eval_a_loss): not ours
        self._evaluations += 1
        if not metrics or key not in metrics:
            raise KeyError(
                f"KeepBestCallback needs {key!r} in the evaluation metrics, which hold {sorted(metrics or {})}; "
                "pass an eval_dataset with labels, or set metric_for_best_model to one of the metrics."
            )
        value = float(metrics[key])
        self.history[state.global_step] = value
        greater = args.greater_is_better if args.greater_is_better is not None else not key.endswith("loss")
        margin = self.min_improvement
        improved = self.best_metric is None or (
            value > self.best_metric + margin if greater else value < self.best_metric - margin
        )
        if improved:
            self.best_step, self.best_metric = state.global_step, value
            self._best = {n: p.detach().clone() for n, p in _trainable(model)}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self._best:
            if state.global_step > 0 and self._evaluations == 0 and args.eval_strategy != "no":
                name = args.metric_for_best_model or "loss"
                warnings.warn(
                    f"KeepBestCallback saw no evaluation carrying {name!r} (with a dict eval_dataset, name the "
                    "dataset: metric_for_best_model='eval_<name>_loss'); the model is left at the last step.",
                    stacklevel=2,
                )
            return
        with torch.no_grad():
            for name, param in _trainable(model):
                param.copy_(self._best[name])


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    model = getattr(model, "module", model)  # DDP
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
