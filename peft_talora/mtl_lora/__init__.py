"""MTL-LoRA (Yang et al. 2024, arXiv:2410.09437) as a PEFT method: LoRA with a per-task ``r x r``
transform and task-mixed shared up-projections, routed per example by ``task_ids``.

- ``config``: :class:`MTLLoraConfig`; ``layer``: the math (the routed low-rank update);
- ``model``: :class:`MTLLoraModel`, the tuner; ``lora_export``: one task as a plain PEFT LoRA adapter.

Registered with PEFT under the name ``"mtllora"`` when this package is imported.
"""

from ..peft_patches import register_tuner
from .config import MTLLoraConfig
from .layer import Linear, MTLLoraLayer
from .model import STAGES, MTLLoraModel

register_tuner("mtllora", MTLLoraConfig, MTLLoraModel)

__all__ = ["STAGES", "Linear", "MTLLoraConfig", "MTLLoraLayer", "MTLLoraModel"]
