"""Adding TA-LoRA to an existing Hugging Face fine-tuning script: the lines marked ``# TA-LoRA``.

The script fine-tunes a causal LM on two tasks of the packaged suite with the stock
``transformers.Trainer``. Without the marked lines it is an ordinary (full) fine-tuning script;
with them, one TA-LoRA adapter learns both tasks, and each example is routed by its
``task_ids`` column.

    python examples/finetune_with_trainer.py          # SmolLM2-135M, a few minutes on 2 CPU cores
    python examples/finetune_with_trainer.py --tiny   # tiny random model, seconds
"""

import argparse

import datasets
from peft import get_peft_model  # TA-LoRA
from transformers import Trainer, TrainingArguments

import peft_talora  # noqa: F401  TA-LoRA: registers the method with PEFT
from peft_talora import TALoraConfig  # TA-LoRA
from peft_talora.smollm2 import load_model
from peft_talora.suite import format_split, load_task, subsample
from peft_talora.training.collator import MultiTaskDataCollator, tokenize_for_causal_lm

parser = argparse.ArgumentParser()
parser.add_argument("--tiny", action="store_true")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--output-dir", default="outputs/finetune_with_trainer")
args = parser.parse_args()

model, tokenizer = load_model(tiny=args.tiny)
tasks = ["sms_spam", "trec"]
per_task = 8 if args.tiny else 64
rows = datasets.concatenate_datasets(
    [format_split(subsample(load_task(t)["train"], per_task), tokenizer, max_text_tokens=64) for t in tasks]
)  # columns: prompt, completion, task_ids (the task name), label

model = get_peft_model(model, TALoraConfig(task_type="CAUSAL_LM", task_names=tasks))  # TA-LoRA
train = tokenize_for_causal_lm(rows, tokenizer, task_names=model)  # keeps `task_ids` as ints  # TA-LoRA

trainer = Trainer(
    model=model,
    args=TrainingArguments(
        output_dir=args.output_dir,
        max_steps=2 if args.tiny else args.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    ),
    train_dataset=train,  # remove_unused_columns=True keeps task_ids: the model's forward declares it
    data_collator=MultiTaskDataCollator(tokenizer),  # pads and keeps task_ids
)
trainer.train()
model.save_pretrained(args.output_dir)
print(f"adapter for {tasks} saved to {args.output_dir}")
