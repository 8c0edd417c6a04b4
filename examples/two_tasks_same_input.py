"""Two tasks that share their inputs: TA-LoRA routing in its simplest form, on the embedded SmolLM2-135M.

Both tasks read the same prompt ("Country: France") and must answer differently: task
``capital`` with the capital, task ``language`` with the language. Only the task id tells them
apart, so after training the two answers can differ only through TA-LoRA's routing.

    python examples/two_tasks_same_input.py          # real model, ~1 minute on 2 CPU cores
    python examples/two_tasks_same_input.py --tiny   # tiny random model, a few seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import get_peft_model

import peft_talora  # noqa: F401  (registers TA-LoRA with PEFT)
from peft_talora import TALoraConfig
from peft_talora.smollm2 import load_model

FACTS = {  # country: (capital, language)
    "France": ("Paris", "French"),
    "Germany": ("Berlin", "German"),
    "Italy": ("Rome", "Italian"),
    "Spain": ("Madrid", "Spanish"),
    "Japan": ("Tokyo", "Japanese"),
    "Russia": ("Moscow", "Russian"),
    "Greece": ("Athens", "Greek"),
    "Portugal": ("Lisbon", "Portuguese"),
}
TASKS = ["capital", "language"]


def prompt(country: str) -> str:
    return f"Country: {country}\nAnswer:"


def toy_examples() -> list[tuple[str, str, int]]:
    """``(prompt, answer, task id)`` for every country and both tasks."""
    return [(prompt(c), f" {answer}", t) for c, answers in FACTS.items() for t, answer in enumerate(answers)]


def encode(tokenizer, examples):
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (prompt tokens masked out) and ``task_ids``."""
    rows = []
    for text, answer, _ in examples:
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    task_ids = torch.tensor([t for _, _, t in examples])
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, task_ids=task_ids)


def train(model, tokenizer, steps: int = 40, lr: float = 1e-2, log_every: int = 10) -> list[float]:
    """Full-batch AdamW on the toy examples; returns the loss curve."""
    inputs = encode(tokenizer, toy_examples())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def answer(model, tokenizer, countries: list[str], task: str | int, max_new_tokens: int = 6) -> list[str]:
    """Greedy answers of one task for several countries (left-padded batch)."""
    tokenizer.padding_side = "left"
    batch = tokenizer([prompt(c) for c in countries], return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **batch,
        task_ids=[task] * len(countries),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return [t.strip() for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model instead of SmolLM2 (smoke test)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--output-dir", default="outputs/two_tasks_adapter")
    args = parser.parse_args(argv)

    start = time.time()
    base, tokenizer = load_model(tiny=args.tiny)
    countries = list(FACTS)
    model = get_peft_model(base, TALoraConfig(task_type="CAUSAL_LM", task_names=TASKS, num_virtual_tokens=10, r=8))
    model.print_trainable_parameters()
    losses = train(model, tokenizer, steps=args.steps, lr=args.lr)
    results = {task: dict(zip(countries, answer(model, tokenizer, countries, task))) for task in TASKS}
    print(f"\n{'country':<10} " + " ".join(f"{t:<12}" for t in TASKS))
    for c in countries:
        print(f"{c:<10} " + " ".join(f"{results[t][c]:<12}" for t in TASKS))
    model.save_pretrained(args.output_dir)
    print(f"\nadapter saved to {args.output_dir}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; {time.time() - start:.0f}s")
    return {"losses": losses, "answers": results}


if __name__ == "__main__":
    main()
