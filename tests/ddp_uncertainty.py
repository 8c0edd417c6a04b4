"""DDP worker for tests/test_distributed.py:
``torchrun --nproc_per_node N tests/ddp_uncertainty.py OUT_DIR PER_DEVICE_BATCH`` (or plain ``python`` for one process).

Trains a tiny three-task TA-LoRA adapter with ``MultiTaskTrainer(task_sampling="uncertainty")`` for a few steps,
the sampler refreshed every global batch, and writes each rank's final uncertainties and drawn task ids to
``OUT_DIR/rank<R>.json``. Two processes with a per-device batch of 2 and one with a batch of 4 see the same global
batches only if every process applies the global batch's update (each drawing the same stream).
"""

import json
import os
import sys

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_model  # noqa: E402

from peft_talora import TALoraConfig  # noqa: E402
from peft_talora.training import MultiTaskDataCollator, MultiTaskTrainer  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 3
TASKS = ["big", "mid", "small"]


def rows() -> Dataset:
    """12 rows of three tasks with different lengths and tokens, so that the tasks' entropies differ."""
    task_ids = [0] * 6 + [1] * 4 + [2] * 2
    input_ids = [[4 + t, *range(10 + i, 10 + i + 2 + t + i % 3)] for i, t in enumerate(task_ids)]
    labels = [[-100, *ids[1:]] for ids in input_ids]
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels, "task_ids": task_ids})


def main(out: str, per_device_batch: int) -> None:
    torch.manual_seed(0)
    config = TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=2, r=2)
    model = get_peft_model(tiny_model(), config)
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"),
        max_steps=STEPS,
        per_device_train_batch_size=per_device_batch,
        learning_rate=0.05,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=3,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=rows(),
        data_collator=MultiTaskDataCollator(pad_token_id=0),
        task_sampling="uncertainty",
        uncertainty_refresh_every=GLOBAL_BATCH,
    )
    drawn = []
    original = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        drawn.append(inputs["task_ids"].tolist())
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    trainer.train()
    result = {"uncertainties": trainer.task_sampler.uncertainties.tolist(), "drawn": drawn}
    with open(os.path.join(out, f"rank{trainer.args.process_index}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
