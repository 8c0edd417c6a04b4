"""Training logits only where a label is: the LM head skipped at prompt positions.

A causal LM's training step computes the vocabulary logits at every position, ``(B, L, V)``, but the loss
reads them only where the next token is a label. For prompt-heavy multi-task data (a 96-token prompt and a
2-token answer) the LM head over the prompt is most of the head's cost, and with a 49k-token vocabulary
about a fifth of a small model's step. transformers' causal LMs take ``logits_to_keep`` (positions to keep)
and their loss takes ``shift_labels`` (the next-token labels at those positions), so the same loss comes
out of a fraction of the head's work.

Models where that does not hold are left alone (:func:`supports_label_logits`): PEFT's prompt-learning
methods prepend virtual tokens, which moves every position; a forward without ``logits_to_keep`` or
without ``**kwargs`` (for ``shift_labels``) cannot take them.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from peft import PeftModel


def supports_label_logits(model) -> bool:
    """Whether ``model`` (a ``PeftModel``, a transformers causal LM, or either wrapped by DDP) computes the
    same loss from ``logits_to_keep`` positions and their ``shift_labels``."""
    model = getattr(model, "module", model)
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        return False  # virtual tokens are prepended: the positions move
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    parameters = inspect.signature(base.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return "logits_to_keep" in parameters and takes_kwargs


def label_positions(labels: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(positions (K,), shift_labels (B, K))`` for ``labels`` ``(B, L)``: the positions whose next token is a
    label in some row of the batch (one set for the batch, so the head runs on ``(B, K)``), and each row's
    next-token labels there (``-100`` where that row has none). ``None`` when no row has a label."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    positions = (shifted != -100).any(0).nonzero().flatten()
    if positions.numel() == 0:
        return None
    return positions, shifted[:, positions]
