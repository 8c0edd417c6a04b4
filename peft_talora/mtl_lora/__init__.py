"""MTL-LoRA (Yang et al. 2024, arXiv:2410.09437) as a PEFT method: LoRA with a per-task ``r x r``
transform and task-mixed shared up-projections, routed per example by ``task_ids``.

Registered with PEFT by ``import peft_talora`` under the name ``"mtllora"``.
"""

from .config import MTLLoraConfig
from .layer import Linear, MTLLoraLayer
from .model import STAGES, MTLLoraModel

__all__ = ["STAGES", "Linear", "MTLLoraConfig", "MTLLoraLayer", "MTLLoraModel"]
