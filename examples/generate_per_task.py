"""Load a TA-LoRA adapter and generate for several tasks in one batch.

    python examples/generate_per_task.py --adapter outputs/main_job/adapter
    python examples/generate_per_task.py --tiny     # a fresh tiny adapter, seconds

Each row of the batch names its task in ``task_ids``; the prefixes of the tasks present are
computed once per ``generate`` call, so mixing tasks costs nothing extra per decoded token.
"""

import argparse

from peft import PeftModel, get_peft_model

import peft_talora  # noqa: F401
from peft_talora import TALoraConfig
from peft_talora.smollm2 import load_model
from peft_talora.suite import PromptFormatter, get_task, load_task


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", help="a saved TA-LoRA adapter (default with --tiny: a fresh tiny one)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)

    base, tokenizer = load_model(tiny=args.tiny)
    if args.adapter:
        model = PeftModel.from_pretrained(base, args.adapter)
    elif args.tiny:
        model = get_peft_model(base, TALoraConfig(task_type="CAUSAL_LM", task_names=["sms_spam", "trec"]))
    else:
        parser.error("--adapter is required (or use --tiny)")
    tasks = model.peft_config["default"].task_names

    formatter = PromptFormatter(tokenizer, max_text_tokens=64)
    prompts, row_tasks = [], []
    for name in tasks:
        text = load_task(name)["test"][0]["text"]
        prompts += formatter.prompts(get_task(name), [text])
        row_tasks.append(name)
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    output = model.generate(**batch, task_ids=row_tasks, max_new_tokens=args.max_new_tokens, do_sample=False)
    answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    for name, answer in zip(row_tasks, answers):
        print(f"{name:<18} -> {answer.strip()!r}")
    return dict(zip(row_tasks, answers))


if __name__ == "__main__":
    main()
