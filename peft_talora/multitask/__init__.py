"""What TA-LoRA and MTL-LoRA share.

- ``config``: :class:`MultiTaskConfig` (the task list) and the field checks of both configs;
- ``task_ids``: turning a user's ``task_ids`` into a validated ``LongTensor (batch,)``;
- ``routing``: how each call's routing travels with the call to every layer;
- ``tuner``: :class:`MultiTaskTunerMixin` (stages, ``add_tasks``, task export, model card, the
  per-task block layout of saved adapters, checks of saved shapes and of the base model);
- ``atomic_save``: writing an adapter folder so that a failed save never destroys the previous one.
"""

from .config import MultiTaskConfig, TaskList, check_int, check_int_list, check_names, check_number
from .routing import ROUTING_KWARG, CallRouting, TaskRouter
from .task_ids import TaskIds, resolve_task_ids, task_index
from .tuner import (
    MultiTaskTunerMixin,
    base_model_shape,
    card_location,
    check_base_model_shape,
    check_saved_shape,
    text_config,
)

__all__ = [
    "ROUTING_KWARG",
    "CallRouting",
    "MultiTaskConfig",
    "MultiTaskTunerMixin",
    "TaskIds",
    "TaskList",
    "TaskRouter",
    "base_model_shape",
    "card_location",
    "check_base_model_shape",
    "check_int",
    "check_int_list",
    "check_names",
    "check_number",
    "check_saved_shape",
    "resolve_task_ids",
    "task_index",
    "text_config",
]
