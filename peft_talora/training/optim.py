"""Fast/slow learning rates for TA-LoRA, as optimizer parameter groups for the stock ``Trainer``.

Slow weights (shared prompt, shared basis ``B``, gates) learn from every example of a batch; each
task's fast factors ``u, v`` only from that task's share of it, so they get a learning rate
``fast_lr_ratio`` times larger. Use::

    optimizer = talora_optimizer(model, lr=1e-3)
    Trainer(model=model, args=args, ..., optimizers=(optimizer, None))

``Trainer`` then builds its scheduler on this optimizer, and the schedule scales every group.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer

from ..talora.layer import is_fast_parameter

#: Default ratio of the fast to the slow learning rate; see docs/training.md for the measurement.
DEFAULT_FAST_LR_RATIO = 4.0


def talora_parameter_groups(
    model: nn.Module, lr: float, fast_lr_ratio: float = DEFAULT_FAST_LR_RATIO, weight_decay: float = 0.0
) -> list[dict]:
    """Four groups: slow/fast x decay/no-decay, over the trainable parameters only.

    The decay/no-decay split is ``Trainer.get_decay_parameter_names`` (no decay for biases and
    norms), so it matches what ``Trainer`` would have built.
    """
    if fast_lr_ratio <= 0:
        raise ValueError(f"fast_lr_ratio must be > 0 (got {fast_lr_ratio}); 1.0 gives equal learning rates.")
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        fast = is_fast_parameter(name)
        key = (fast, name in decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lr * fast_lr_ratio if fast else lr,
                "weight_decay": weight_decay if name in decay else 0.0,
                "name": ("fast" if fast else "slow") + ("" if name in decay else "_no_decay"),
            }
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("The model has no trainable parameters; call set_adapter() or load with is_trainable=True.")
    return list(groups.values())


def talora_optimizer(
    model: nn.Module,
    lr: float,
    fast_lr_ratio: float = DEFAULT_FAST_LR_RATIO,
    weight_decay: float = 0.0,
    **adamw_kwargs,
) -> torch.optim.AdamW:
    """AdamW over :func:`talora_parameter_groups`."""
    return torch.optim.AdamW(talora_parameter_groups(model, lr, fast_lr_ratio, weight_decay), lr=lr, **adamw_kwargs)
