"""Training multi-task adapters with the stock ``transformers.Trainer``.

- ``collator``: task-name encoding, prompt/completion tokenisation and the collator that keeps
  ``task_ids`` (:class:`MultiTaskDataCollator`);
- ``sampling``: multi-task samplers for imbalanced tasks;
- ``trainer``: :class:`MultiTaskTrainer` and :func:`build_trainer`, the training helper;
- ``optim``: TA-LoRA's fast/slow parameter groups; ``callbacks``: the orthogonality log entry;
- ``keep_best``: early stopping that ends at the best evaluation, the start included (:class:`KeepBestCallback`);
- ``transfer``: which existing task a new task should start from (``task_losses``, ``closest_task``);
- ``trl_trainers``: TRL's SFT and DPO trainers with a task column (imports ``trl``);
- ``cli``: the command line, ``python -m peft_talora.training`` (also under torchrun / accelerate launch).
"""

from .callbacks import OrthogonalityLogCallback
from .collator import MultiTaskDataCollator, TALoraDataCollator, TaskIdEncoder, k_shot, tokenize_for_causal_lm
from .keep_best import KeepBestCallback
from .optim import talora_optimizer, talora_parameter_groups
from .sampling import MultiTaskSampler, normalized_entropy, task_sampling_probabilities
from .trainer import MultiTaskTrainer, build_trainer
from .transfer import closest_task, task_losses

__all__ = [
    "KeepBestCallback",
    "MultiTaskDataCollator",
    "MultiTaskSampler",
    "MultiTaskTrainer",
    "OrthogonalityLogCallback",
    "TALoraDataCollator",
    "TaskIdEncoder",
    "build_trainer",
    "closest_task",
    "k_shot",
    "normalized_entropy",
    "talora_optimizer",
    "talora_parameter_groups",
    "task_losses",
    "task_sampling_probabilities",
    "tokenize_for_causal_lm",
]
