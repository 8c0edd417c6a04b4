"""Exactness at init, per-example routing, generation and save/load on every architecture family."""

import pytest
import torch
from conftest import batch, perturb, tiny_model
from peft import PeftModel, get_peft_model

from peft_talora import TALoraConfig

TASKS = torch.tensor([0, 2, 1])


def talora(model, **kwargs):
    config = dict(task_type="CAUSAL_LM", num_tasks=3, num_virtual_tokens=4, r=4)
    return get_peft_model(model, TALoraConfig(**{**config, **kwargs}))


def test_exact_at_init_for_every_task(arch_attn):
    arch, attn = arch_attn
    input_ids, mask = batch(left_pad=2)
    base_logits = tiny_model(arch, attn)(input_ids=input_ids, attention_mask=mask).logits
    model = talora(tiny_model(arch, attn))
    for task in range(3):
        logits = model(input_ids=input_ids, attention_mask=mask, task_ids=torch.full((3,), task)).logits
        assert torch.equal(logits, base_logits), f"task {task} differs from the base model at init"


def test_mixed_batch_routes_each_example_to_its_task(arch_attn):
    arch, attn = arch_attn
    input_ids, mask = batch()
    model = perturb(talora(tiny_model(arch, attn)))
    mixed = model(input_ids=input_ids, attention_mask=mask, task_ids=TASKS).logits
    for i, task in enumerate(TASKS.tolist()):
        alone = model(input_ids=input_ids[i : i + 1], attention_mask=mask[i : i + 1], task_ids=[task]).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-4, atol=1e-5)
    other = model(input_ids=input_ids, attention_mask=mask, task_ids=torch.tensor([1, 0, 2])).logits
    assert not torch.allclose(mixed, other, atol=1e-3), "different tasks must give different outputs"
    base_logits = tiny_model(arch, attn)(input_ids=input_ids, attention_mask=mask).logits
    assert not torch.allclose(mixed, base_logits, atol=1e-3), "a trained adapter must change the outputs"
    with model.disable_adapter():
        assert torch.equal(model(input_ids=input_ids, attention_mask=mask).logits, base_logits)


def test_batched_greedy_generation_equals_per_example(arch_attn):
    arch, attn = arch_attn
    input_ids, mask = batch(left_pad=2)
    model = perturb(talora(tiny_model(arch, attn)), scale=0.5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    together = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASKS, **kwargs)
    for i, task in enumerate(TASKS.tolist()):
        keep = mask[i].bool()
        alone = model.generate(input_ids=input_ids[i : i + 1, keep], task_ids=[task], **kwargs)[0, int(keep.sum()) :]
        batched = together[i, input_ids.shape[1] :]
        assert torch.equal(batched[: len(alone)], alone), f"example {i} (task {task}) differs"
        assert (batched[len(alone) :] == 0).all(), "after EOS the batched row holds only padding"


def test_save_load_round_trip_in_fresh_base(arch_attn, tmp_path):
    arch, attn = arch_attn
    input_ids, mask = batch()
    model = perturb(talora(tiny_model(arch, attn), task_names=["a", "b", "c"], num_tasks=None))
    expected = model(input_ids=input_ids, attention_mask=mask, task_ids=TASKS).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(arch, attn), tmp_path)
    assert loaded.peft_config["default"].task_names == ["a", "b", "c"]
    assert torch.equal(loaded(input_ids=input_ids, attention_mask=mask, task_ids=["a", "c", "b"]).logits, expected)
