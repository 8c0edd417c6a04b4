"""Generation speed of TA-LoRA vs the base model and PEFT's AdaptionPrompt, side by side.

All three run on SmolLM2-135M (the embedded real model), the same prompts and the same number of
new tokens; runs are interleaved (base, TA-LoRA, AdaptionPrompt, base, ...) and the median of the
repeats is reported, so the ratios compare like with like on a shared, noisy machine.

    python benchmarks/generation.py [--batch-size 4] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from peft import AdaptionPromptConfig, get_peft_model

import peft_talora  # noqa: F401
from peft_talora import TALoraConfig
from peft_talora.smollm2 import load_smollm2

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a child.",
    "Name three prime numbers.",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
    "What does a compiler do?",
    "Translate 'good morning' to Spanish.",
]


def build_models(num_tasks: int):
    base, tokenizer = load_smollm2()
    layers = base.config.num_hidden_layers
    talora = get_peft_model(
        copy.deepcopy(base), TALoraConfig(task_type="CAUSAL_LM", num_tasks=num_tasks, num_virtual_tokens=10, r=8)
    )
    adaption = get_peft_model(
        copy.deepcopy(base), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=10, adapter_layers=layers)
    )
    with torch.no_grad():  # open the gates as after training, so no path is skipped
        for bank in talora.base_model.talora_banks.values():
            bank.gate.fill_(0.1)
            bank.task_v.normal_(std=0.02)
        for name, param in adaption.named_parameters():
            if "adaption_gate" in name:
                param.fill_(0.1)
    return {"base": base, "ta-lora": talora, "adaption-prompt": adaption}, tokenizer


def tokens_per_second(model, inputs, new_tokens: int, extra: dict) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, **extra, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    generated = (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    return generated / elapsed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-tasks", type=int, default=4)
    args = parser.parse_args(argv)

    models, tokenizer = build_models(args.num_tasks)
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in (PROMPTS * args.batch_size)[: args.batch_size]
    ]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    extra = {
        "base": {},
        "ta-lora": {"task_ids": torch.arange(args.batch_size) % args.num_tasks},  # a mixed-task batch
        "adaption-prompt": {},
    }
    common = {"pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    for name, model in models.items():  # warm-up
        tokens_per_second(model, inputs, 4, {**extra[name], **common})
    speeds = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            speeds[name].append(tokens_per_second(model, inputs, args.new_tokens, {**extra[name], **common}))
    median = {name: statistics.median(v) for name, v in speeds.items()}
    print(
        f"SmolLM2-135M, batch {args.batch_size}, {args.new_tokens} new tokens, median of {args.repeats} "
        f"interleaved runs, torch threads {torch.get_num_threads()}"
    )
    print(f"{'model':<16} {'tokens/s':>10} {'vs base':>8}")
    for name, value in median.items():
        print(f"{name:<16} {value:>10.1f} {value / median['base']:>7.3f}x")
    target = median["ta-lora"] / median["base"]
    print(f"target: TA-LoRA >= 0.97x base tokens/s -> {'met' if target >= 0.97 else 'MISSED'} ({target:.3f}x)")
    return {"median_tokens_per_s": median, "runs": speeds}


if __name__ == "__main__":
    main()
