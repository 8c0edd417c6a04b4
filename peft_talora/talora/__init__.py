"""TA-LoRA (Task-Adaptive Low-Rank Representation) as a PEFT method.

- ``config``: :class:`TALoraConfig`;
- ``layer``: the math: the prompt bank (shared prompt, shared basis, per-task rank-1 factors,
  gates) and the gated prefix attention;
- ``attention``: how the prefix reaches every decoder's attention (transformers' attention
  interface, the prompt replay through the layer's own projections);
- ``model``: :class:`TALoraModel`, the tuner.

Registered with PEFT under the name ``"talora"`` when this package is imported.
"""

from ..peft_patches import register_tuner
from .config import TALoraConfig
from .layer import TALoraPromptBank, gated_prefix_attention
from .model import STAGES, TALoraModel

register_tuner("talora", TALoraConfig, TALoraModel)

__all__ = ["STAGES", "TALoraConfig", "TALoraModel", "TALoraPromptBank", "gated_prefix_attention"]
