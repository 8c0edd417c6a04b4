"""Configuration of an MTL-LoRA adapter."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional, Union

from ..multitask import MultiTaskConfig, check_int, check_int_list, check_names, check_number
from ..peft_patches import add_peft_type

MTLLORA = add_peft_type("MTLLORA")


@dataclass
class MTLLoraConfig(MultiTaskConfig):
    """Configuration of an [`MTLLoraModel`] (MTL-LoRA, Yang et al. 2024, arXiv:2410.09437).

    Every targeted linear layer ``W`` gets a shared down-projection ``A`` (``r x in``), a
    per-task transform ``Lambda_t`` (``r x r``, identity at init) and ``k`` shared
    up-projections ``B_1..B_k`` (``out x r``, zero at init) mixed by per-task softmax weights::

        h = W x + (lora_alpha / r) * sum_i softmax(w_t / temperature)_i * B_i Lambda_t A dropout(x)

    Tasks are given as a count (``num_tasks=3``) or by name (``task_names=[...]``) and routed per
    example with ``task_ids``, as for TA-LoRA. Defaults follow the authors' code
    (github.com/pUmpKin-Co/MTL-LoRA): ``r=8``, ``lora_alpha=16``, ``lora_dropout=0.05``,
    ``num_up_projections=3``, ``temperature=1.0`` (their default; their LLaMA-2 commonsense
    script uses 0.1, which makes each task's mix of up-projections sharper).
    """

    LAYOUT_FIELDS = (
        "r",
        "lora_alpha",
        "num_up_projections",
        "temperature",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
    )

    r: int = field(default=8, metadata={"help": "Rank r of the shared down-projection A (r x in)."})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "Scaling numerator: the update is scaled by lora_alpha / r."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input x, as in LoRA."})
    num_up_projections: int = field(
        default=3,
        metadata={"help": "Number k of shared up-projections B_i (out x r) that each task mixes; the authors use 3."},
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature tau of the per-task softmax over the k up-projections: weights softmax(w_t / tau). "
            "Default 1.0 (the authors' code default; lower values make each task's mix sharper)."
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (or a regex) of the linear / GPT-2 Conv1D modules to adapt, or 'all-linear' for every "
            "linear layer except the output head. Default: the attention projections PEFT's LoRA targets for the "
            "architecture."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names (or a regex) of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Indices of the layers to adapt (with `target_modules` as a list). Default: all."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with `layers_to_transform`, e.g. 'layers'."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the adapter layers to train and save (e.g. a new head)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MTLLORA
        self._validate_tasks()
        kind = type(self).__name__
        self.r = check_int(kind, "r", self.r, hint="; the rank of the down-projection A")
        k = self.num_up_projections
        self.num_up_projections = check_int(kind, "num_up_projections", k, hint="; the authors use 3")
        self.lora_alpha = check_number(kind, "lora_alpha", self.lora_alpha, above=0, hint="; it scales the update")
        self.temperature = check_number(kind, "temperature", self.temperature, above=0, hint="; it divides the logits")
        self.lora_dropout = check_number(kind, "lora_dropout", self.lora_dropout, at_least=0, below=1)
        for name in ("target_modules", "exclude_modules", "layers_pattern"):  # a name/regex, or a list of names
            value = getattr(self, name)
            if isinstance(value, set):
                value = sorted(value) if all(isinstance(v, str) for v in value) else list(value)
            if value == "" or (name == "target_modules" and value == []):
                raise ValueError(f"{kind}.{name} is empty (got {value!r}); leave it None for the default.")
            if value is not None and not isinstance(value, str):
                value = check_names(kind, name, value, example="['q_proj', 'v_proj']", unique=False)
            setattr(self, name, value)
        self.modules_to_save = check_names(
            kind, "modules_to_save", self.modules_to_save, example="['lm_head']", unique=False
        )
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
                self.layers_to_transform = check_int(kind, "layers_to_transform", layers, minimum=0)
            else:
                self.layers_to_transform = check_int_list(
                    kind, "layers_to_transform", self.layers_to_transform, minimum=0, example="[0, 1]"
                )
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{kind}.layers_pattern only applies together with layers_to_transform.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(f"{kind}.layers_to_transform needs target_modules as a list of names, not a regex.")

    @property
    def scaling(self) -> float:
        """The factor ``lora_alpha / r`` applied to the adapter's update."""
        return self.lora_alpha / self.r
