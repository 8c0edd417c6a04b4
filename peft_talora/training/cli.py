"""Command-line training entry point: ``python -m peft_talora.training``; the same under torchrun/accelerate.

    python -m peft_talora.training --model_name_or_path MODEL --train_file train.jsonl --output_dir out
    torchrun --nproc_per_node 2 -m peft_talora.training ...                 # DDP (gloo on CPU)
    accelerate launch --num_processes 2 -m peft_talora.training ...        # DDP through accelerate

The data file (JSON lines or CSV, read with ``datasets``) has ``prompt``, ``completion`` and a task
column (names or ids). ``transformers.TrainingArguments`` flags set the training (``--max_steps``,
``--per_device_train_batch_size``, ``--learning_rate``, ``--save_steps``, ``--eval_strategy`` ...);
an ``--eval_file`` is evaluated per ``--eval_strategy``, or once at the end without one. A run resumes from
``--resume_from_checkpoint`` when given, else from the last checkpoint in ``output_dir`` (use a new
``output_dir`` to start over). The adapter is saved to ``output_dir`` in the standard PEFT format.
With ``--adapter_path`` the adapter's layout (tasks, virtual tokens, rank, alpha) is the saved one:
those flags are refused beside it; ``--orthogonality_weight`` overrides a TA-LoRA adapter's saved weight.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint


@dataclass
class TALoraArguments:
    """What the run trains and on which data; everything else is ``TrainingArguments``."""

    model_name_or_path: str = field(metadata={"help": "Local folder (or cached Hub id) of the causal LM to adapt."})
    train_file: str = field(metadata={"help": "JSON lines or CSV with prompt, completion and task columns."})
    eval_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "Optional evaluation file, same columns; evaluated per --eval_strategy, else once at the end."
        },
    )
    task_column: str = field(default="task", metadata={"help": "Column holding each example's task name or id."})
    task_names: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated task names in id order; default: sorted names of the data."}
    )
    adapter_path: Optional[str] = field(
        default=None, metadata={"help": "Continue from this saved adapter instead of creating a new one."}
    )
    training_stage: str = field(
        default="multi_task",
        metadata={
            "help": "shared_warmup, multi_task or new_tasks (see set_training_stage). new_tasks needs --adapter_path "
            "and adds the tasks of --new_tasks (default: the data's task names the adapter lacks) with add_tasks."
        },
    )
    new_tasks: Optional[str] = field(
        default=None, metadata={"help": "Comma-separated names of the tasks to add in the new_tasks stage."}
    )
    num_virtual_tokens: Optional[int] = field(default=None, metadata={"help": "Default: TALoraConfig's (10)."})
    rank: Optional[int] = field(default=None, metadata={"help": "TALoraConfig.r, the shared basis' rank (default 8)."})
    alpha: Optional[float] = field(default=None, metadata={"help": "Default: TALoraConfig's (8.0)."})
    orthogonality_weight: Optional[float] = field(
        default=None, metadata={"help": "Default: TALoraConfig's (1e-3), or the saved adapter's with --adapter_path."}
    )
    fast_lr_ratio: float = 4.0
    task_sampling: Optional[str] = field(
        default=None, metadata={"help": "proportional, temperature or uncertainty; default: Trainer's own sampler."}
    )
    task_sampling_temperature: float = 2.0
    max_length: Optional[int] = field(default=None, metadata={"help": "Truncate tokenised examples to this length."})


def _read(path: str):
    """The data file; ``prompt`` and ``completion`` as text (a CSV column of 0 and 1 would be read as ints)."""
    from datasets import Value, load_dataset

    kind = "csv" if path.endswith(".csv") else "json"
    data = load_dataset(kind, data_files=path, split="train")
    for column in ("prompt", "completion"):
        if column in data.column_names and data.features[column] != Value("string"):
            data = data.cast_column(column, Value("string"))
    return data


def main(argv: Optional[list[str]] = None) -> str:
    """Train and save an adapter; returns the output directory."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import TALoraConfig
    from ..multitask.config import check_number
    from .collator import tokenize_for_causal_lm
    from .trainer import build_trainer

    parser = HfArgumentParser((TALoraArguments, TrainingArguments))
    talora_args, args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(args.seed)

    train = _read(talora_args.train_file)
    if talora_args.task_column not in train.column_names:
        raise ValueError(
            f"{talora_args.train_file} has no task column {talora_args.task_column!r} (columns: {train.column_names}); "
            "pass --task_column."
        )
    train = train.rename_column(talora_args.task_column, "task_ids") if talora_args.task_column != "task_ids" else train
    tokenizer = AutoTokenizer.from_pretrained(talora_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(talora_args.model_name_or_path)
    layout = {"task_names": talora_args.task_names, "num_virtual_tokens": talora_args.num_virtual_tokens}
    layout.update(rank=talora_args.rank, alpha=talora_args.alpha)
    if talora_args.new_tasks and talora_args.training_stage != "new_tasks":
        raise ValueError("--new_tasks adds tasks in the new_tasks stage: pass --training_stage new_tasks with it.")
    if talora_args.adapter_path:
        given = [f"--{name}" for name, value in layout.items() if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} set the layout of a new adapter, but --adapter_path continues a saved one whose "
                "layout is fixed: drop them (or train a new adapter without --adapter_path)."
            )
        model = PeftModel.from_pretrained(model, talora_args.adapter_path, is_trainable=True)
        if talora_args.orthogonality_weight is not None:
            saved = model.peft_config[model.active_adapter]
            if not isinstance(saved, TALoraConfig):
                raise ValueError(
                    f"--orthogonality_weight is TA-LoRA's penalty; the adapter at {talora_args.adapter_path} is "
                    f"{type(saved).__name__}, which has none: drop the flag."
                )
            saved.orthogonality_weight = (
                check_number(  # checked as TALoraConfig checks it: the adapter is saved with it
                    "--orthogonality_weight", "value", talora_args.orthogonality_weight, at_least=0
                )
            )
    else:
        values = train.unique("task_ids")
        if talora_args.task_names:
            tasks = {"task_names": talora_args.task_names.split(",")}
        elif all(isinstance(v, str) for v in values):
            tasks = {"task_names": sorted(values)}
        else:
            tasks = {"num_tasks": int(max(values)) + 1}
        fields = {
            "num_virtual_tokens": talora_args.num_virtual_tokens,
            "r": talora_args.rank,
            "alpha": talora_args.alpha,
            "orthogonality_weight": talora_args.orthogonality_weight,
        }
        config = TALoraConfig(task_type="CAUSAL_LM", **tasks, **{k: v for k, v in fields.items() if v is not None})
        model = get_peft_model(model, config)
    if talora_args.training_stage == "new_tasks":
        _add_new_tasks(model, talora_args, train)
    elif talora_args.training_stage != "multi_task":
        model.set_training_stage(talora_args.training_stage)

    def prepare(dataset):
        if dataset is None:
            return None
        return tokenize_for_causal_lm(dataset, tokenizer, task_names=model, max_length=talora_args.max_length)

    eval_data = _read(talora_args.eval_file) if talora_args.eval_file else None
    if eval_data is not None and talora_args.task_column != "task_ids":
        eval_data = eval_data.rename_column(talora_args.task_column, "task_ids")
    trainer = build_trainer(
        model,
        args,
        train_dataset=prepare(train),
        eval_dataset=prepare(eval_data),
        processing_class=tokenizer,
        fast_lr_ratio=talora_args.fast_lr_ratio,
        task_sampling=talora_args.task_sampling,
        task_sampling_temperature=talora_args.task_sampling_temperature,
    )
    resume = args.resume_from_checkpoint
    if resume is None and args.output_dir and os.path.isdir(args.output_dir):
        resume = get_last_checkpoint(args.output_dir)
    if trainer.is_world_process_zero():
        global_batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        print(f"peft_talora.training: world size {args.world_size}, global batch {global_batch}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    if eval_data is not None and args.eval_strategy == "no":  # an eval file is evaluated, at least once at the end
        trainer.log_metrics("eval", trainer.evaluate())
    _end_process_group()
    return args.output_dir


def _add_new_tasks(model, talora_args: TALoraArguments, train) -> None:
    """The unseen-task stage: add the new tasks to a saved adapter (``add_tasks`` selects the stage)."""
    if not talora_args.adapter_path:
        raise ValueError(
            "--training_stage new_tasks adds tasks to a trained adapter: pass --adapter_path with the adapter "
            "trained on the source tasks."
        )
    known = model.peft_config[model.active_adapter].task_names or []
    if talora_args.new_tasks:
        new = talora_args.new_tasks.split(",")
    else:
        new = sorted({v for v in train.unique("task_ids") if isinstance(v, str)} - set(known))
    if not new:
        raise ValueError(
            f"--training_stage new_tasks found no new task in {talora_args.train_file} (the adapter has {known}); "
            "name the tasks to add with --new_tasks or use a task column with new task names."
        )
    model.add_tasks(new)


def _end_process_group() -> None:
    """Close the DDP process group before exit: gloo's threads left running at interpreter shutdown
    can abort a rank ("terminate called without an active exception") after a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
