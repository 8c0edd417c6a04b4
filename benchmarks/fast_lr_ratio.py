"""Measure the fast/slow learning-rate ratio on the main job's two tasks (SmolLM2-135M).

For each ratio, the same seed, data and step budget; prints the final training loss and
whether both tasks answer every country correctly. The ratio with the lowest loss at a small
budget is the package default (``peft_talora.training.optim.DEFAULT_FAST_LR_RATIO``).

    python benchmarks/fast_lr_ratio.py [--steps 8] [--ratios 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from peft import get_peft_model

import peft_talora  # noqa: F401
from peft_talora import TALoraConfig, talora_optimizer
from peft_talora.smollm2 import load_smollm2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import two_tasks_same_input as main_job  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args(argv)
    base, tokenizer = load_smollm2()
    inputs = main_job.encode(tokenizer, main_job.toy_examples())
    print(f"{'ratio':>6} {'final loss':>11} {'mean loss':>10} correct")
    for ratio in args.ratios:
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), TALoraConfig(task_type="CAUSAL_LM", task_names=main_job.TASKS))
        optimizer = talora_optimizer(model, lr=args.lr, fast_lr_ratio=ratio)
        model.train()
        losses = []
        for _ in range(args.steps):
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        model.eval()
        correct = sum(
            got == want[t]
            for t, task in enumerate(main_job.TASKS)
            for got, want in zip(main_job.answer(model, tokenizer, list(main_job.FACTS), task), main_job.FACTS.values())
        )
        print(f"{ratio:>6g} {losses[-1]:>11.3f} {sum(losses) / len(losses):>10.3f} {correct}/{2 * len(main_job.FACTS)}")


if __name__ == "__main__":
    main()
