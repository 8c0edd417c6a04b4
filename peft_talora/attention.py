"""One general way into every decoder's attention: transformers' attention interface.

Every causal LM in transformers 5 computes attention with
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)``
and calls the result as ``fn(module, query, key, value, attention_mask, scaling=..., **kwargs)``,
with query/key/value already projected, normed and rotated. That call is where a prefix can be
added for all architectures without a per-model list.

An adapted attention module gets an :class:`AttentionSite` and a config view whose
``_attn_implementation`` reads ``"talora+<impl>"``, a function registered here that runs the
model's own ``<impl>`` and adds the gated prefix attention of the site. The model's own config,
its masks and every unadapted module keep using ``<impl>`` unchanged.

The same interception yields the prefix keys/values: the module's own forward runs on the
prompt hidden states with identity rotary (``cos = 1, sin = 0``) and the key/value tensors that
reach the interface are captured, so fused projections (GPT-2, Phi-3, GPT-NeoX), key norms
(Qwen3, Gemma3, OLMo2) and grouped-query heads are all handled by the model's own code.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .layer import gated_prefix_attention

ROUTED_PREFIX = "talora+"


class _PrefixCaptured(Exception):
    """Raised from the attention function to stop a prefix replay once its keys/values are known."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__()
        self.key, self.value = key, value


@dataclass(eq=False)
class AttentionSite:
    """One adapted attention module and the prefix it adds during the current call.

    ``num_heads``/``num_kv_heads``/``head_dim`` and the names of the module's forward arguments are
    read off the probe forward at injection time.
    """

    module: nn.Module
    layer: int = -1
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    forward_args: dict[str, Any] = field(default_factory=dict)
    hidden_size: int = 0
    # whether the replay maps every prompt row on its own and affinely (see replay_is_affine)
    affine: bool = False
    # state of the current forward/generate call
    prefix_key: Optional[torch.Tensor] = None  # (B, H_kv, n, hd)
    prefix_value: Optional[torch.Tensor] = None
    gate: Optional[torch.Tensor] = None  # (H,)
    capturing: bool = False

    def set_prefix(self, key: torch.Tensor, value: torch.Tensor, gate: torch.Tensor) -> None:
        self.prefix_key, self.prefix_value, self.gate = key, value, gate

    def clear_prefix(self) -> None:
        self.prefix_key = self.prefix_value = self.gate = None

    def project_prefix(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``(U, H_kv, n, hd)`` of prompt hidden states ``(U, n, d)``, from the module's own forward."""
        kwargs = {}
        for name, example in self.forward_args.items():
            if name == "position_embeddings" and example is not None:
                kwargs[name] = _identity_rotary(example, hidden)
            else:
                kwargs[name] = None
        self.capturing = True
        try:
            self.module(hidden, **kwargs)
        except _PrefixCaptured as captured:
            return captured.key, captured.value
        finally:
            self.capturing = False
        raise RuntimeError(f"{type(self.module).__name__} did not reach the attention interface on the prefix replay.")

    def project_prompts(
        self, shared: torch.Tensor, coefficients: Optional[torch.Tensor] = None, directions: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``(U, H_kv, n, hd)`` of the prompts ``shared + coefficients[u, :, None] * directions[u]``.

        ``shared`` ``(n, d)``; ``coefficients`` ``(U, n)`` and ``directions`` ``(U, d)``, or neither
        (then the one prompt ``shared``, ``U = 1``). When the replay is affine and per row
        (``self.affine``), ``f(a + c w) = f(a) + c (f(w) - f(0))``, so one replay of ``n + U + 1``
        rows gives what a replay of all ``U * n`` prompt rows would: a batch of 64 distinct tasks
        costs almost what a batch of one task costs. Otherwise the prompts are built and replayed.
        """
        dtype = module_dtype(self.module, shared.dtype)
        if coefficients is None:
            return self.project_prefix(shared.unsqueeze(0).to(dtype))
        if not self.affine:
            prompts = shared.unsqueeze(0) + coefficients.unsqueeze(-1) * directions.unsqueeze(1)  # (U, n, d)
            return self.project_prefix(prompts.to(dtype))
        n, num_tasks = shared.shape[0], directions.shape[0]
        rows = torch.cat([shared, directions, directions.new_zeros(1, directions.shape[1])]).to(dtype)
        key, value = self.project_prefix(rows.unsqueeze(0))  # (1, H_kv, n + U + 1, hd)
        scale = coefficients.to(key.dtype)[:, None, :, None]  # (U, 1, n, 1)

        def combine(projected: torch.Tensor) -> torch.Tensor:
            at_shared = projected[:, :, :n]  # (1, H_kv, n, hd)
            slope = (projected[0, :, n : n + num_tasks] - projected[0, :, n + num_tasks :]).transpose(0, 1)
            return at_shared + scale * slope.unsqueeze(2)  # (U, H_kv, n, hd)

        return combine(key), combine(value)


def module_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (``default`` if it has none)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return default


def replay_is_affine(site: AttentionSite) -> bool:
    """Whether the site's key/value replay is an affine map applied to each row on its own.

    Checked numerically once per site, on fixed random rows ``x, y``: the shortcut of
    :meth:`AttentionSite.project_prompts` must reproduce ``f(x + c y)`` for ``c = 0.5, -2`` (a key
    norm fails this), ``f(100 x) + f(100 y) - f(0)`` must equal ``f(100 (x + y))`` (a clamp such as
    OLMo's ``clip_qkv`` fails this at large inputs), and the rows in reverse order must come back
    reversed. The tolerance, the square root of the dtype's epsilon relative to the outputs' size, is
    far below what a norm or clamp deviates by and far above rounding.
    """
    if site.hidden_size <= 0:  # the probe could not see the prompt width: replay the built prompts
        return False
    device = next(site.module.parameters()).device
    dtype = module_dtype(site.module, torch.float32)
    x, y = torch.randn(2, site.hidden_size, generator=torch.Generator().manual_seed(0))
    rows = torch.stack([x, y, x + 0.5 * y, x - 2 * y, 100 * x, 100 * y, 100 * (x + y), torch.zeros_like(x)])
    rows = rows.to(device, dtype).unsqueeze(0)
    with torch.no_grad():
        forward, backward = site.project_prefix(rows), site.project_prefix(rows.flip(1))
    tolerance = torch.finfo(dtype).eps ** 0.5
    for out, reversed_out in zip(forward, backward):
        f = out[0].transpose(0, 1).flatten(1).float()  # (8, H_kv * hd): one row per input row
        fx, fy, f_half, f_minus_two, f_big_x, f_big_y, f_big_sum, f0 = f
        slope = fy - f0
        pairs = [(f_half, fx + 0.5 * slope), (f_minus_two, fx - 2 * slope), (f_big_sum, f_big_x + f_big_y - f0)]
        pairs.append((f, reversed_out[0].transpose(0, 1).flatten(1).float().flip(0)))
        for got, want in pairs:
            if not torch.isfinite(got).all() or (got - want).norm() > tolerance * max(want.norm(), got.norm(), 1e-6):
                return False
    return True


def _identity_rotary(example, hidden: torch.Tensor):
    """``(cos, sin) = (1, 0)`` shaped like the module's real rotary embedding, for ``hidden`` ``(U, n, d)``."""
    cos, _ = example
    shape = (hidden.shape[0], hidden.shape[1], *cos.shape[2:])
    return torch.ones(shape, dtype=cos.dtype, device=hidden.device), torch.zeros(shape, dtype=cos.dtype, device=hidden.device)


class _SiteConfigView:
    """The module's config as it was, except ``_attn_implementation`` routes through TA-LoRA."""

    def __init__(self, config):
        object.__setattr__(self, "_talora_base_config", config)

    @property
    def _attn_implementation(self) -> str:
        base = object.__getattribute__(self, "_talora_base_config")._attn_implementation or "eager"
        return routed_implementation(base)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_talora_base_config"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_talora_base_config"), name, value)

    def __repr__(self):
        return repr(object.__getattribute__(self, "_talora_base_config"))


def _eager_attention_of(module: nn.Module) -> Callable:
    """The model's own eager attention (each modeling file defines ``eager_attention_forward``)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(
            f"{type(module).__name__} has no eager_attention_forward in {type(module).__module__}; load the model "
            "with attn_implementation='sdpa' to use TA-LoRA with it."
        )
    return fn


def routed_implementation(base: str) -> str:
    """Register (once) and return the name of the TA-LoRA attention wrapping implementation ``base``."""
    name = ROUTED_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_routed_attention(base))
    return name


def _make_routed_attention(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        site: AttentionSite = module._talora_site
        if site.capturing:
            raise _PrefixCaptured(key, value)
        base_fn = _eager_attention_of(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        out, weights = base_fn(module, query, key, value, attention_mask, *args, **kwargs)
        if site.num_heads == 0:  # the probe forward at injection time
            site.num_heads, site.num_kv_heads, site.head_dim = query.shape[1], key.shape[1], query.shape[-1]
        if site.prefix_key is not None:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            out = out + gated_prefix_attention(query, site.prefix_key, site.prefix_value, site.gate, scaling)
        return out, weights

    attention.__name__ = f"talora_{base.replace('|', '_')}_attention"
    return attention


def _looks_like_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower() and hasattr(module, "config")


def install_sites(model: nn.Module, num_layers: int) -> list[AttentionSite]:
    """Attach an :class:`AttentionSite` to the attention module of every decoder layer, one per layer.

    A probe forward on two tokens checks that each candidate module really calls the attention
    interface and records its head counts and forward arguments. A model whose decoder layers
    cannot all be reached this way gets a ``ValueError`` here, never silently unadapted layers.
    """
    candidates = [(name, m) for name, m in model.named_modules() if _looks_like_attention(m)]
    sites, hooks, calls = [], [], []
    for name, module in candidates:
        site = AttentionSite(module=module)
        module._talora_site = site
        module.config = _SiteConfigView(module.config)
        sites.append((name, site))

        def record(mod, args, kwargs, site=site):
            bound = inspect.signature(mod.forward).bind_partial(*args, **kwargs).arguments
            site.forward_args = {k: v for k, v in list(bound.items())[1:] if k not in ("kwargs", "args")}
            hidden_states = next(iter(bound.values()), None)
            site.hidden_size = hidden_states.shape[-1] if isinstance(hidden_states, torch.Tensor) else 0
            calls.append(site)

        hooks.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    reached = [(name, s) for name, s in sites if s.num_heads > 0]
    for name, site in sites:
        if site.num_heads == 0:
            remove_site(site)
    if len(reached) != num_layers:
        for _, site in reached:
            remove_site(site)
        names = [name for name, _ in reached] or "none"
        raise ValueError(
            f"TA-LoRA reaches attention through transformers' attention interface (ALL_ATTENTION_FUNCTIONS), but in "
            f"{type(model).__name__} only {len(reached)} of {num_layers} decoder layers called it (reached: {names}). "
            "This model computes attention in its own code; TA-LoRA supports models whose attention modules call "
            "the attention interface, as all current transformers decoders do."
        )
    order = {id(s): i for i, s in enumerate(dict.fromkeys(calls))}
    ordered = sorted((s for _, s in reached), key=lambda s: order[id(s)])
    for position, site in enumerate(ordered):
        layer_idx = getattr(site.module, "layer_idx", None)
        site.layer = layer_idx if isinstance(layer_idx, int) else position
        site.affine = replay_is_affine(site)
    return sorted(ordered, key=lambda s: s.layer)


def remove_site(site: AttentionSite) -> None:
    """Give the module back its own config and drop the site."""
    module = site.module
    if isinstance(module.config, _SiteConfigView):
        module.config = object.__getattribute__(module.config, "_talora_base_config")
    if getattr(module, "_talora_site", None) is site:
        del module._talora_site
