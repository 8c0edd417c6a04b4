"""TA-LoRA (Task-Adaptive Low-Rank Representation) as a PEFT method for any transformers causal LM.

``import peft_talora`` registers the method with PEFT; importing it again is harmless.
"""

from .callbacks import OrthogonalityLogCallback
from .config import TALoraConfig
from .model import TALoraModel
from .mtl_lora import MTLLoraConfig, MTLLoraModel
from .optim import talora_optimizer, talora_parameter_groups
from .peft_integration import (
    complete_model_cards,
    explain_unreadable_adapter_files,
    export_tasks_through_save_and_push,
    register_tuner,
    route_task_ids_through_peft_forward,
)

register_tuner("talora", TALoraConfig, TALoraModel)
register_tuner("mtllora", MTLLoraConfig, MTLLoraModel)
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
__version__ = "0.1.0"
