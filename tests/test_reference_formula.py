"""Reference test: TA-LoRA's output computed from the formulas in METHOD.md by hand, with plain torch ops.

Nothing here uses the package's code (nor transformers' modules) to compute: the base weights are read from
the Llama model's state dict, the adapter's values from its bank, and the whole forward pass (embedding,
RMSNorm, rotary embedding, causal attention with left padding, the gated prefix of every layer, MLP, final
norm, lm_head) is written out below, one small function per formula piece. The package must agree with it on
logits and on the gradients of every bank parameter, on a mixed-task, left-padded batch, with grouped-query
heads (4 query heads, 2 key/value heads), under eager and sdpa attention, with and without projection biases:
in float32 to about 1e-5, and in float64 (sdpa) to 1e-10, where any real difference would stand out.

Shape letters: ``B`` batch, ``S`` sequence length, ``d`` hidden size, ``H`` query heads, ``G`` key/value heads,
``hd`` head size, ``n`` virtual tokens, ``r`` rank, ``L`` layers, ``T`` tasks, ``V`` vocabulary.
"""

import math

import pytest
import torch
from conftest import tiny_model
from peft import get_peft_model

from peft_talora import TALoraConfig

NUM_TASKS, NUM_VIRTUAL_TOKENS, RANK, ALPHA = 3, 5, 4, 6.0  # s = alpha / r = 1.5, not 1, so a lost factor shows
TASK_IDS = torch.tensor([2, 0, 2, 1])  # mixed tasks, one task twice
LEFT_PAD = [3, 0, 1, 0]  # left padding per example
SEQ_LEN = 7


# ----------------------------------------------------------------------------------------------------------
# The base Llama pieces
# ----------------------------------------------------------------------------------------------------------


def linear(x, weights, name):
    """``x @ W^T (+ b)`` for the ``nn.Linear`` called ``name`` in the state dict: ``(..., in) -> (..., out)``."""
    out = x @ weights[f"{name}.weight"].T
    bias = weights.get(f"{name}.bias")
    return out if bias is None else out + bias


def rms_norm(x, weight, eps):
    """Llama's RMSNorm: ``x / sqrt(mean(x^2) + eps) * weight`` over the last dim; ``(..., d) -> (..., d)``.

    Like transformers' ``LlamaRMSNorm``, the normalisation runs in float32 and is cast back before the weight
    (a no-op in float32; in float64 it is what lets the reference match to 1e-13).
    """
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotary_cos_sin(seq_len, head_dim, theta):
    """Default RoPE tables for positions ``0..S-1``: ``cos``, ``sin`` of shape ``(S, hd)``, in float32.

    Frequencies ``theta^(-2i/hd)`` for ``i < hd/2``, each used twice (the two halves of a head).
    Positions are ``0..S-1`` also for left-padded examples (transformers' default ``position_ids``).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (S, hd/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate ``x`` ``(B, heads, S, hd)``: ``x * cos + rotate_half(x) * sin``, ``rotate_half(a, b) = (-b, a)``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def split_heads(x, head_dim):
    """``(B, S, heads * hd) -> (B, heads, S, hd)``."""
    B, S, _ = x.shape
    return x.view(B, S, -1, head_dim).transpose(1, 2)


def share_kv_heads(x, num_heads):
    """Grouped-query attention: query head ``h`` reads key/value head ``h // (H / G)``.

    ``(B, G, m, hd) -> (B, H, m, hd)``.
    """
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def visible_keys(attention_mask):
    """Which key each query may attend to: causal and not padding. ``(B, S) -> (B, 1, S, S)`` bool."""
    S = attention_mask.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    return (causal[None] & attention_mask.bool()[:, None, :])[:, None]


def causal_attention(q, k, v, visible, scaling, attn_implementation):
    """``softmax(q k^T * scaling + mask) v`` per head: q ``(B, H, S, hd)``, k/v ``(B, H, S, hd)`` -> ``(B, H, S, hd)``.

    A left-padding query sees no key at all; what it gets is the backend's convention (eager adds the dtype's
    minimum to every score, so a uniform average of all values; sdpa returns zeros). Real queries never read
    those rows, so this only decides the padded positions' own logits, which the test compares too.
    """
    scores = (q @ k.transpose(-1, -2)) * scaling
    weights = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
    nothing_visible = ~visible.any(-1, keepdim=True)  # (B, 1, S, 1)
    weights = torch.nan_to_num(weights, nan=0.0)
    if attn_implementation == "eager":
        weights = torch.where(nothing_visible, torch.full_like(weights, 1.0 / k.shape[-2]), weights)
    return weights @ v


def mlp(x, weights, prefix):
    """Llama's SwiGLU MLP: ``down(silu(gate(x)) * up(x))``; ``(..., d) -> (..., d)``."""
    gate = torch.nn.functional.silu(linear(x, weights, f"{prefix}.gate_proj"))
    return linear(gate * linear(x, weights, f"{prefix}.up_proj"), weights, f"{prefix}.down_proj")


# ----------------------------------------------------------------------------------------------------------
# The TA-LoRA pieces (METHOD.md, "Shapes and formulas")
# ----------------------------------------------------------------------------------------------------------


def task_prompts(theta0, basis, u, v, task_ids, s):
    """``P[l, t] = theta0[l] + s * B[l] @ outer(u[l, t], v[l, t])`` for each example's task, at one layer.

    theta0 ``(n, d)``, basis ``(n, r)``, u ``(T, r)``, v ``(T, d)``, task_ids ``(B,)`` -> ``(B, n, d)``.
    """
    return torch.stack([theta0 + s * basis @ torch.outer(u[t], v[t]) for t in task_ids.tolist()])


def prefix_keys_values(prompts, weights, prefix, head_dim):
    """``K = k_proj(P)``, ``V = v_proj(P)``: the prompt enters where the layer's normed hidden states enter,
    with no norm and no rotary (it has no position). ``(B, n, d) -> (B, G, n, hd)`` each."""
    key = split_heads(linear(prompts, weights, f"{prefix}.k_proj"), head_dim)
    value = split_heads(linear(prompts, weights, f"{prefix}.v_proj"), head_dim)
    return key, value


def gated_prefix(q, prefix_key, prefix_value, gate, task_gate, scaling):
    """``c[t] * tanh(g[h]) * softmax(q K_p^T * scaling) V_p`` per head, every query (padded or not) over all
    ``n`` prefix positions: q ``(B, H, S, hd)``, K_p/V_p ``(B, H, n, hd)``, gate ``(H,)``, task_gate ``(B,)`` (each
    example's task's ``c``) -> ``(B, H, S, hd)``."""
    weights = torch.softmax((q @ prefix_key.transpose(-1, -2)) * scaling, dim=-1)
    return task_gate[:, None, None, None] * torch.tanh(gate)[None, :, None, None] * (weights @ prefix_value)


# ----------------------------------------------------------------------------------------------------------
# The whole forward pass
# ----------------------------------------------------------------------------------------------------------


def reference_logits(weights, config, bank, input_ids, attention_mask, task_ids, attn_implementation):
    """Logits ``(B, S, V)`` of the Llama in ``weights`` with TA-LoRA's prefix in every layer.

    ``bank`` holds the adapter's tensors: ``theta0`` ``(L, n, d)``, ``basis`` ``(L, n, r)``, ``u`` ``(L, T, r)``,
    ``v`` ``(L, T, d)``, ``c`` ``(L, T)``, ``gate`` ``(L, H)``, ``s`` (a float); ``bank=None`` is the base model.
    """
    H, G = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // H
    scaling = head_dim**-0.5
    eps = config.rms_norm_eps
    dtype = weights["model.embed_tokens.weight"].dtype
    cos, sin = rotary_cos_sin(input_ids.shape[1], head_dim, config.rope_parameters["rope_theta"])
    cos, sin = cos.to(dtype), sin.to(dtype)  # tables in float32, then the model's dtype (as transformers does)
    visible = visible_keys(attention_mask)

    hidden = weights["model.embed_tokens.weight"][input_ids]  # (B, S, d)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        attn = f"{prefix}.self_attn"
        x = rms_norm(hidden, weights[f"{prefix}.input_layernorm.weight"], eps)
        q = apply_rotary(split_heads(linear(x, weights, f"{attn}.q_proj"), head_dim), cos, sin)  # (B, H, S, hd)
        k = apply_rotary(split_heads(linear(x, weights, f"{attn}.k_proj"), head_dim), cos, sin)  # (B, G, S, hd)
        v = split_heads(linear(x, weights, f"{attn}.v_proj"), head_dim)
        assert q.shape[1] == H and k.shape[1] == G
        out = causal_attention(q, share_kv_heads(k, H), share_kv_heads(v, H), visible, scaling, attn_implementation)
        if bank is not None:
            prompts = task_prompts(
                bank["theta0"][layer], bank["basis"][layer], bank["u"][layer], bank["v"][layer], task_ids, bank["s"]
            )
            prefix_key, prefix_value = prefix_keys_values(prompts, weights, attn, head_dim)
            out = out + gated_prefix(
                q,
                share_kv_heads(prefix_key, H),
                share_kv_heads(prefix_value, H),
                bank["gate"][layer],
                bank["c"][layer][task_ids],
                scaling,
            )
        out = out.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], H * head_dim)  # heads back together
        hidden = hidden + linear(out, weights, f"{attn}.o_proj")
        x = rms_norm(hidden, weights[f"{prefix}.post_attention_layernorm.weight"], eps)
        hidden = hidden + mlp(x, weights, f"{prefix}.mlp")
    hidden = rms_norm(hidden, weights["model.norm.weight"], eps)
    return linear(hidden, weights, "lm_head")


def label_loss(logits, labels, attention_mask):
    """``sum`` of ``log_softmax(logits)`` at ``labels`` over the real (unpadded) positions: a scalar."""
    picked = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None])[..., 0]
    return (picked * attention_mask).sum()


# ----------------------------------------------------------------------------------------------------------
# Test setup and tests
# ----------------------------------------------------------------------------------------------------------


def base_model(attn_implementation, attention_bias):
    """The tiny GQA Llama with weights large enough that attention is far from uniform and norms are not 1."""
    model = tiny_model("llama", attn_implementation, attention_bias=attention_bias)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / math.sqrt(p.shape[1]))
    return model


def inputs():
    """``input_ids``, ``attention_mask`` ``(B, S)`` with the left padding in ``LEFT_PAD``, and ``labels``."""
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 128, (len(LEFT_PAD), SEQ_LEN), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for i, pad in enumerate(LEFT_PAD):
        input_ids[i, :pad] = 0
        attention_mask[i, :pad] = 0
    labels = torch.randint(0, 128, input_ids.shape, generator=g)
    return input_ids, attention_mask, labels


def talora(base):
    config = TALoraConfig(
        task_type="CAUSAL_LM", num_tasks=NUM_TASKS, num_virtual_tokens=NUM_VIRTUAL_TOKENS, r=RANK, alpha=ALPHA
    )
    return get_peft_model(base, config).eval()


def bank_leaves(bank):
    """Leaf copies of the package bank's tensors (one per parameter, task blocks kept apart) for the reference."""
    leaves = {
        "shared_prompt": bank.shared_prompt,
        "shared_basis": bank.shared_basis,
        "gate": bank.gate,
        **{f"task_u_blocks.{i}": p for i, p in enumerate(bank.task_u_blocks)},
        **{f"task_v_blocks.{i}": p for i, p in enumerate(bank.task_v_blocks)},
        **{f"task_gate_blocks.{i}": p for i, p in enumerate(bank.task_gate_blocks)},
    }
    return {name: p.detach().clone().requires_grad_(True) for name, p in leaves.items()}


def reference_bank(leaves):
    """The reference's view of ``leaves``: task blocks concatenated along the task dim, and ``s = alpha / r``."""
    blocks = sorted(name for name in leaves if name.startswith("task_u_blocks."))
    return {
        "theta0": leaves["shared_prompt"],
        "basis": leaves["shared_basis"],
        "u": torch.cat([leaves[name] for name in blocks], dim=1),
        "v": torch.cat([leaves[name.replace("task_u", "task_v")] for name in blocks], dim=1),
        "c": torch.cat([leaves[name.replace("task_u", "task_gate")] for name in blocks], dim=1),
        "gate": leaves["gate"],
        "s": ALPHA / RANK,
    }


def random_bank_values(bank, seed=0):
    """Stand-in for training: every bank value random, gates open (``tanh(g)`` well away from 0), each task's
    gate scale ``c`` in ``[0.5, 1.5)`` (different per task and layer, so a lost or misrouted ``c`` shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bank.named_parameters():
            if name.startswith("task_gate_blocks."):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g))


# (attention, attention_bias, dtype). float64 only with sdpa: transformers' eager attention takes its softmax in
# float32, where the float64 mask minimum becomes -inf and a left-padding row turns into NaN.
CASES = [
    ("eager", False, torch.float32),
    ("sdpa", False, torch.float32),
    ("eager", True, torch.float32),
    ("sdpa", True, torch.float32),
    ("sdpa", False, torch.float64),
    ("sdpa", True, torch.float64),
]
IDS = [f"{a}{'-bias' if b else ''}-{str(t).removeprefix('torch.')}" for a, b, t in CASES]
# (atol, rtol, gradient rtol). float32: logits to 1e-5 (+3e-5 relative), the package's logits to 1e-5 of their
# largest entry (+3e-5 relative): its float32 error follows the scale of the logits and the machine's summation
# order (measured: 2.1e-5 at a largest logit of 5.8 on one CPU, under 1e-5 on another);
# gradients (sums over 24 positions, two layers) to 1e-5 of their largest entry plus 1e-4 relative.
# float64: everything to 1e-10 (measured: logits bit-identical, gradients within 2e-13).
TOLERANCE = {torch.float32: (1e-5, 3e-5, 1e-4), torch.float64: (1e-10, 1e-10, 1e-10)}


def weights_of(model):
    """The base model's state dict (detached copies), the reference's only source of base weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("attn_implementation,attention_bias,dtype", CASES, ids=IDS)
def test_reference_base_model_matches_transformers(attn_implementation, attention_bias, dtype):
    """The hand-written forward pass without prefix is the transformers Llama (checks the reference itself)."""
    atol, rtol, _ = TOLERANCE[dtype]
    base = base_model(attn_implementation, attention_bias).to(dtype)
    input_ids, attention_mask, _ = inputs()
    with torch.no_grad():
        expected = base(input_ids=input_ids, attention_mask=attention_mask).logits
    ours = reference_logits(
        weights_of(base), base.config, None, input_ids, attention_mask, TASK_IDS, attn_implementation
    )
    assert expected.abs().max() > 1.0  # logits are not all near zero: the comparison means something
    torch.testing.assert_close(ours, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("attn_implementation,attention_bias,dtype", CASES, ids=IDS)
def test_at_init_reference_and_package_equal_base_model(attn_implementation, attention_bias, dtype):
    """Gates start at 0: the reference with the fresh bank, and the package, both give the base model's logits."""
    atol, rtol, _ = TOLERANCE[dtype]
    base = base_model(attn_implementation, attention_bias).to(dtype)
    input_ids, attention_mask, _ = inputs()
    with torch.no_grad():
        expected = base(input_ids=input_ids, attention_mask=attention_mask).logits
    weights = weights_of(base)
    model = talora(base).to(dtype)
    bank = model.base_model.talora_banks["default"]
    assert torch.count_nonzero(bank.gate) == 0
    with torch.no_grad():
        ours = reference_logits(
            weights,
            base.config,
            reference_bank(bank_leaves(bank)),
            input_ids,
            attention_mask,
            TASK_IDS,
            attn_implementation,
        )
        package = model(input_ids=input_ids, attention_mask=attention_mask, task_ids=TASK_IDS).logits
    torch.testing.assert_close(ours, expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(package, expected, atol=0.0, rtol=0.0)  # the package: bit for bit


@pytest.mark.parametrize("attn_implementation,attention_bias,dtype", CASES, ids=IDS)
def test_package_matches_reference_logits_and_bank_gradients(attn_implementation, attention_bias, dtype):
    """Open gates, random bank, mixed tasks, left padding: logits at every position (padded ones included) and
    the gradient of a label loss w.r.t. every bank parameter agree with the hand computation."""
    atol, rtol, grad_rtol = TOLERANCE[dtype]
    base = base_model(attn_implementation, attention_bias).to(dtype)
    weights = weights_of(base)
    model = talora(base).to(dtype)
    bank = model.base_model.talora_banks["default"]
    random_bank_values(bank)
    bank.requires_grad_(True)  # the first block's gate scales too (fixed in training, but their gradient is checked)
    input_ids, attention_mask, labels = inputs()

    leaves = bank_leaves(bank)
    ours = reference_logits(
        weights, base.config, reference_bank(leaves), input_ids, attention_mask, TASK_IDS, attn_implementation
    )
    label_loss(ours, labels, attention_mask).backward()

    model.zero_grad(set_to_none=True)
    package = model(input_ids=input_ids, attention_mask=attention_mask, task_ids=TASK_IDS).logits
    label_loss(package, labels, attention_mask).backward()

    with torch.no_grad():
        base_logits = reference_logits(
            weights, base.config, None, input_ids, attention_mask, TASK_IDS, attn_implementation
        )
    assert (ours - base_logits).abs().amax() > 0.1  # the prefix changes the output a lot: a real check
    scale = ours.detach().abs().amax().item()
    torch.testing.assert_close(package.detach(), ours.detach(), atol=atol * scale, rtol=rtol)

    package_params = dict(bank.named_parameters())
    assert set(package_params) == set(leaves)
    for name, leaf in leaves.items():
        scale = leaf.grad.abs().amax()
        assert scale > 0, name
        assert package_params[name].grad is not None, name
        torch.testing.assert_close(
            package_params[name].grad,
            leaf.grad,
            atol=atol * scale.item(),
            rtol=grad_rtol,
            msg=lambda m, name=name: f"{name}: {m}",
        )
