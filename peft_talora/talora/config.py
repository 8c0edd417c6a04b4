"""Configuration of a TA-LoRA adapter."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional

from ..multitask import MultiTaskConfig, check_int, check_int_list, check_number
from ..peft_patches import PeftModelDispatch, add_peft_type

TALORA = add_peft_type("TALORA")

#: Values of ``TALoraConfig.new_task_start``.
NEW_TASK_STARTS = ("base", "shared_prompt")


@dataclass
class TALoraConfig(PeftModelDispatch, MultiTaskConfig):
    """Configuration of a [`TALoraModel`]: a shared prompt plus per-task rank-1 factors, fed
    into every adapted decoder layer through zero-initialised gated prefix attention.

    Give the tasks either as a count (``num_tasks=3``, ids ``0..2``) or by name
    (``task_names=["sst2", "trec"]``, ids in list order); names travel with the saved adapter
    and are accepted wherever task ids are.
    """

    LAYOUT_FIELDS = ("num_virtual_tokens", "r", "alpha", "adapter_layers")

    num_virtual_tokens: int = field(default=10, metadata={"help": "Prefix length n (virtual tokens per layer)."})
    r: int = field(default=8, metadata={"help": "Rank of the shared basis B (n x r) of the task-specific part."})
    alpha: float = field(default=8.0, metadata={"help": "Scaling numerator: the task part is scaled by alpha / r."})
    adapter_layers: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Indices of the decoder layers to adapt (negative counts from the end). Default: all."},
    )
    orthogonality_weight: float = field(
        default=1e-3,
        metadata={
            "help": "Weight lambda of the penalty sum_{i != j} ||A_i A_j^T||_F^2 that pushes tasks' factors apart; "
            "added to the loss in training mode when labels are given. 0 turns it off."
        },
    )
    prompt_init_std: float = field(
        default=1.0,
        metadata={"help": "Std of the shared prompt's normal init; 1.0 matches normalised hidden states."},
    )
    new_task_start: str = field(
        default="base",
        metadata={
            "help": "Where a task added by add_tasks (without init_from) starts: 'base' (its gate scale c is 0, so "
            "its output is exactly the base model's until training opens it) or 'shared_prompt' (c = 1: the "
            "trained shared prompt, as in the paper). The tasks of the config always start at c = 1."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = TALORA
        self._validate_tasks()
        kind = type(self).__name__
        n = self.num_virtual_tokens
        self.num_virtual_tokens = check_int(kind, "num_virtual_tokens", n, hint="; the prefix length n")
        self.r = check_int(kind, "r", self.r, hint="; the rank of the shared basis B")
        self.alpha = check_number(kind, "alpha", self.alpha, above=0, hint="; the task part is scaled by alpha / r")
        self.orthogonality_weight = check_number(
            kind, "orthogonality_weight", self.orthogonality_weight, at_least=0, hint="; 0 turns the penalty off"
        )
        self.prompt_init_std = check_number(
            kind, "prompt_init_std", self.prompt_init_std, at_least=0, hint="; the std of the shared prompt's init"
        )
        if self.new_task_start not in NEW_TASK_STARTS:
            raise ValueError(
                f"{kind}.new_task_start must be one of {NEW_TASK_STARTS} (got {self.new_task_start!r}): 'base' starts "
                "added tasks at the base model's output, 'shared_prompt' at the trained shared prompt."
            )
        if self.adapter_layers is not None:
            if isinstance(self.adapter_layers, numbers.Integral) and not isinstance(self.adapter_layers, bool):
                raise TypeError(
                    f"{kind}.adapter_layers must be a list of layer indices (got {self.adapter_layers!r}); for one "
                    f"layer write adapter_layers=[{self.adapter_layers!r}], for every layer leave it None."
                )
            self.adapter_layers = check_int_list(kind, "adapter_layers", self.adapter_layers, example="[0, -1]")
            if not self.adapter_layers:
                raise ValueError(f"{kind}.adapter_layers is empty (got []); pass None to adapt every layer.")
            if len(set(self.adapter_layers)) != len(self.adapter_layers):
                raise ValueError(f"{kind}.adapter_layers has repeated indices: {self.adapter_layers}.")

    @property
    def scaling(self) -> float:
        """The factor ``s = alpha / r`` applied to the task-specific part ``B @ A_t``."""
        return self.alpha / self.r

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The adapted layer indices in ``[0, num_layers)``, sorted; raises if any is out of range."""
        if self.adapter_layers is None:
            return list(range(num_layers))
        bad = [i for i in self.adapter_layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(
                f"TALoraConfig.adapter_layers {bad} out of range for a model with {num_layers} decoder layers; "
                f"use indices in [{-num_layers}, {num_layers - 1}]."
            )
        layers = sorted(i % num_layers for i in self.adapter_layers)
        if len(set(layers)) != len(layers):
            raise ValueError(f"TALoraConfig.adapter_layers {self.adapter_layers} name the same layer twice.")
        return layers
