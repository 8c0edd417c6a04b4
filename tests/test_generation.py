"""Routing through generate (beams, return sequences) and the once-per-call prefix cost."""

import torch
from conftest import batch, perturb, tiny_model
from peft import get_peft_model

from peft_talora import TALoraConfig
from peft_talora.talora.attention import AttentionSite

TASKS = torch.tensor([2, 0, 1])


def talora(arch="llama", **kwargs):
    config = TALoraConfig(task_type="CAUSAL_LM", num_tasks=3, num_virtual_tokens=4, r=4, **kwargs)
    return perturb(get_peft_model(tiny_model(arch), config), scale=0.5)


def test_beam_search_and_return_sequences_expand_task_ids():
    model = talora()
    input_ids, mask = batch()
    kwargs = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    together = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASKS, **kwargs)
    assert together.shape[0] == 6
    for i, task in enumerate(TASKS.tolist()):
        alone = model.generate(
            input_ids=input_ids[i : i + 1], attention_mask=mask[i : i + 1], task_ids=[task], **kwargs
        )
        assert torch.equal(together[2 * i : 2 * i + 2], alone), f"example {i} (task {task}) differs"


def test_sampling_return_sequences_expand_task_ids():
    model = talora()
    input_ids, mask = batch()
    kwargs = dict(max_new_tokens=5, do_sample=True, top_k=1, num_return_sequences=2, pad_token_id=0)
    together = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASKS, **kwargs)
    for i, task in enumerate(TASKS.tolist()):
        greedy = model.generate(
            input_ids=input_ids[i : i + 1],
            attention_mask=mask[i : i + 1],
            task_ids=[task],
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
        assert torch.equal(together[2 * i : 2 * i + 2], greedy.expand(2, -1)), f"example {i} (task {task}) differs"


def test_prefixes_are_computed_once_per_generate_call(monkeypatch):
    model = talora(adapter_layers=[1])
    calls = []
    original = AttentionSite.project_prefix
    monkeypatch.setattr(AttentionSite, "project_prefix", lambda self, h: calls.append(self.layer) or original(self, h))
    input_ids, mask = batch()
    model.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASKS, max_new_tokens=8, do_sample=False)
    assert calls == [1], "one projection per adapted layer per generate call, not per decoding step"
    calls.clear()
    model(input_ids=input_ids, attention_mask=mask, task_ids=TASKS)
    assert calls == [1]


def test_every_generate_entry_point_routes_a_list_of_tasks_through_beams_once_per_call(monkeypatch):
    """A PEFT model without task_type (PEFT's PeftModel.generate) and the wrapped causal LM's own generate route
    like the CAUSAL_LM model's: a list of tasks follows beams and return sequences (transformers expands only
    tensors), and the prefix is computed once per call."""
    causal = talora(adapter_layers=[1])
    untyped = get_peft_model(
        tiny_model("llama"), TALoraConfig(num_tasks=3, num_virtual_tokens=4, r=4, adapter_layers=[1])
    )
    untyped.load_state_dict(causal.state_dict())
    input_ids, mask = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, num_beams=2, num_return_sequences=2, pad_token_id=0)
    expected = causal.generate(input_ids=input_ids, task_ids=TASKS, **kwargs)
    calls = []
    original = AttentionSite.project_prefix
    monkeypatch.setattr(AttentionSite, "project_prefix", lambda self, h: calls.append(self.layer) or original(self, h))
    for generate in (causal.generate, untyped.generate, causal.get_base_model().generate):
        calls.clear()
        assert torch.equal(generate(input_ids=input_ids, task_ids=TASKS.tolist(), **kwargs), expected)
        assert calls == [1]


def test_generate_with_disabled_adapter_equals_base():
    model = talora()
    input_ids, mask = batch()
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = tiny_model("llama").generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    with model.disable_adapter():
        assert torch.equal(model.generate(input_ids=input_ids, attention_mask=mask, **kwargs), expected)
    assert not torch.equal(model.generate(input_ids=input_ids, attention_mask=mask, task_ids=TASKS, **kwargs), expected)


def test_training_step_reaches_every_parameter():
    model = talora()
    model.train()
    input_ids, mask = batch()
    loss = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=TASKS).loss
    loss.backward()
    bank = model.base_model.talora_banks["default"]
    for name, param in bank.named_parameters():
        if name == "task_gate_blocks.0":  # the created tasks' gate scales are fixed at 1
            assert not param.requires_grad and param.grad is None
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"
    assert bank.task_u.grad[:, 0].abs().sum() > 0 and bank.task_v.grad[:, 2].abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "talora_banks" not in n), "base stays frozen"


def test_gradient_checkpointing_matches_plain_gradients():
    input_ids, mask = batch()
    grads = []
    for checkpointing in (False, True):
        model = talora()
        model.train()
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=TASKS).loss.backward()
        grads.append(model.base_model.talora_banks["default"].task_v.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_fullgraph_compiled_generation_equals_eager():
    """``torch.compile(fullgraph=True)`` (transformers' ``CompileConfig``, static cache) traces TA-LoRA's routed
    attention without a graph break and gives the eager tokens for a mixed-task batch."""
    import torch._dynamo
    from conftest import batch, make_adapted
    from transformers import CompileConfig

    model = make_adapted("talora", "llama", "sdpa")
    input_ids, mask = batch(3, 6, left_pad=2)
    tasks = torch.tensor([2, 0, 1])
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = model.generate(input_ids=input_ids, attention_mask=mask, task_ids=tasks, **greedy)
    torch._dynamo.reset()
    config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers compiles on CUDA only by default
    compiled = model.generate(
        input_ids=input_ids, attention_mask=mask, task_ids=tasks, cache_implementation="static",
        compile_config=config, **greedy,
    )  # fmt: skip
    torch._dynamo.reset()
    assert torch.equal(compiled, expected)
