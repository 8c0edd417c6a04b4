"""TA-LoRA's attention shortcut on every architecture family: which key/value paths replay affinely, and that the
low-rank prefix equals replaying the built prompts (also when clamped or in half precision).

What both methods share (exactness at init, routing, generation, save/load, ...) on every architecture is tested
once for both in ``test_shared_behaviour.py``."""

import pytest
import torch
from conftest import _COMMON, _DECODER, batch, perturb, tiny_model
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from peft_talora import TALoraConfig

TASKS = torch.tensor([0, 2, 1])


def talora(model, **kwargs):
    config = dict(task_type="CAUSAL_LM", num_tasks=3, num_virtual_tokens=4, r=4)
    return get_peft_model(model, TALoraConfig(**{**config, **kwargs}))


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
    assert (
        fast_grads.keys() == built_grads.keys() and len(fast_grads) == 5
    )  # theta0, B, u, v, gate (the first block's c is fixed)
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
