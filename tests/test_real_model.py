"""TA-LoRA on the real embedded SmolLM2-135M: exact at init, and routing that learns."""

import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_talora import TALoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import two_tasks_same_input as main_job  # noqa: E402

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    from peft_talora.smollm2 import load_smollm2

    return load_smollm2()


def chat_batch(tokenizer, questions):
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_adapted_model_generates_exactly_what_the_base_generates_at_init(smollm2):
    base, tokenizer = smollm2
    inputs = chat_batch(tokenizer, ["What is the capital of France?", "Name a color."])
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = base.generate(**inputs, **kwargs)
    assert "Paris" in tokenizer.decode(expected[0]), "the embedded model is a real model"
    model = get_peft_model(base, TALoraConfig(task_type="CAUSAL_LM", num_tasks=2, num_virtual_tokens=10, r=8))
    try:
        for task in (0, 1):
            assert torch.equal(model.generate(**inputs, task_ids=[task, task], **kwargs), expected)
    finally:
        model.base_model.unload()


def test_training_makes_two_tasks_answer_the_same_input_differently(smollm2):
    base, tokenizer = smollm2
    torch.manual_seed(0)
    model = get_peft_model(base, TALoraConfig(task_type="CAUSAL_LM", task_names=main_job.TASKS))
    try:
        losses = main_job.train(model, tokenizer, steps=12, log_every=0)
        assert losses[-1] < 0.25 * losses[0], f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"
        countries = ["France", "Japan"]
        capitals = main_job.answer(model, tokenizer, countries, "capital")
        languages = main_job.answer(model, tokenizer, countries, "language")
        assert capitals == ["Paris", "Tokyo"], capitals
        assert languages == ["French", "Japanese"], languages
    finally:
        model.base_model.unload()
