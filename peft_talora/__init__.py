"""TA-LoRA (Task-Adaptive Low-Rank Representation) and MTL-LoRA as PEFT methods for any transformers causal LM.

``import peft_talora`` registers both methods with PEFT and applies the few patches PEFT needs
(all in :mod:`peft_talora.peft_patches`); importing it again is harmless.

Layout: ``talora/`` and ``mtl_lora/`` (one subpackage per method: ``config``, ``layer``,
``model``), ``multitask/`` (what both share: task ids, the routing of a call, the tuner base,
atomic saves), ``training/`` (collator, samplers, trainer, optimizer groups, callbacks, TRL,
command line), ``suite/`` (the packaged task suite) and ``peft_patches`` (every touch of PEFT internals).
"""

from .mtl_lora import MTLLoraConfig, MTLLoraModel
from .peft_patches import (
    complete_model_cards,
    explain_unreadable_adapter_files,
    export_tasks_through_save_and_push,
    route_task_ids_through_peft_forward,
)
from .talora import TALoraConfig, TALoraModel
from .training import OrthogonalityLogCallback, talora_optimizer, talora_parameter_groups

route_task_ids_through_peft_forward()
export_tasks_through_save_and_push()
complete_model_cards()
explain_unreadable_adapter_files()

__all__ = [
    "MTLLoraConfig",
    "MTLLoraModel",
    "OrthogonalityLogCallback",
    "TALoraConfig",
    "TALoraModel",
    "talora_optimizer",
    "talora_parameter_groups",
]
__version__ = "0.2.0"
