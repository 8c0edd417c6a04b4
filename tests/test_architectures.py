"""Exactness at init, per-example routing, generation and save/load on every architecture family."""

import pytest
import torch
from conftest import _COMMON, _DECODER, batch, perturb, tiny_model
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

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


# Families whose key/value path is affine per row (projections, biases, fused or not); the others norm their keys.
AFFINE_REPLAY = {"llama", "qwen2", "mistral", "gemma2", "phi3", "gpt2", "gpt_neox"}


def test_affine_replays_are_detected(arch_attn):
    arch, attn = arch_attn
    sites = talora(tiny_model(arch, attn)).base_model._sites
    assert [site.affine for site in sites] == [arch in AFFINE_REPLAY] * len(sites)


def test_low_rank_prefix_equals_replaying_the_built_prompts(arch_attn):
    """The shortcut ``f(a) + c (f(v) - f(0))`` must give the outputs and gradients of replaying every prompt row."""
    arch, attn = arch_attn
    input_ids, mask = batch()
    model = perturb(talora(tiny_model(arch, attn)), scale=0.5)
    sites = model.base_model._sites
    results = []
    for affine in ([site.affine for site in sites], [False] * len(sites)):
        for site, flag in zip(sites, affine):
            site.affine = flag
        model.zero_grad()
        out = model(input_ids=input_ids, attention_mask=mask, labels=input_ids, task_ids=TASKS)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), grads))
    (fast_logits, fast_grads), (built_logits, built_grads) = results
    torch.testing.assert_close(fast_logits, built_logits, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == built_grads.keys() and len(fast_grads) == 5  # theta0, B, u, v, gate
    for name, grad in fast_grads.items():
        torch.testing.assert_close(
            grad, built_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("clip_qkv, affine", [(None, True), (2.0, False)])
def test_a_clamped_key_path_is_not_taken_for_affine(clip_qkv, affine):
    """OLMo clamps q/k/v to +-clip_qkv: affine on small inputs only, so the probe's large scale must catch it."""
    config = AutoConfig.for_model("olmo", **_COMMON, **_DECODER, clip_qkv=clip_qkv)
    model = AutoModelForCausalLM.from_config(config)
    assert [site.affine for site in talora(model).base_model._sites] == [affine] * 2


def test_half_precision_shortcut_stays_within_rounding():
    """bf16 with large key biases (Qwen2 has them): the shortcut is as close to float32 as replaying the prompts."""

    def adapted(dtype):
        base = tiny_model("qwen2")
        with torch.no_grad():
            for layer in base.model.layers:
                layer.self_attn.k_proj.bias.normal_(0, 20, generator=torch.Generator().manual_seed(3))
        return perturb(talora(base.to(dtype)), scale=0.5)

    input_ids, mask = batch()
    reference = adapted(torch.float32)(input_ids=input_ids, attention_mask=mask, task_ids=TASKS).logits
    model = adapted(torch.bfloat16)
    sites = model.base_model._sites
    assert all(site.affine for site in sites)
    fast = model(input_ids=input_ids, attention_mask=mask, task_ids=TASKS).logits.float()
    for site in sites:
        site.affine = False
    built = model(input_ids=input_ids, attention_mask=mask, task_ids=TASKS).logits.float()
    built_error = (built - reference).abs().max()
    assert 0 < built_error < 0.05 * reference.abs().max()
    assert (fast - reference).abs().max() <= 2 * built_error
