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

Everything happens inside the attention module's own forward, from the call's routing (the
``talora_routing`` keyword argument, see :mod:`peft_talora.multitask.routing`): the prefix is computed
with the layer's weights as they are at that moment (unsharded by FSDP, loaded by an offload
hook, on the layer's device, in its compute dtype), and a layer recomputed by gradient
checkpointing recomputes its prefix from the parameters. A site holds only static facts about
its module (head counts, argument names, whether its key/value path is affine).
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..multitask.routing import ROUTING_KWARG, CallRouting
from .layer import TALoraPromptBank, gated_prefix_attention

ROUTED_PREFIX = "talora+"


#: Keyword argument of a prefix replay: its attention call raises :class:`_PrefixCaptured`.
_CAPTURE_KWARG = "talora_capture_prefix"


class _PrefixCaptured(Exception):
    """Raised from the attention function to stop a prefix replay once its keys/values are known."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__()
        self.key, self.value = key, value


@dataclass(frozen=True, eq=False)
class PrefixSource:
    """What TA-LoRA's sites need from the adapter for one call: its bank, the decoder layer -> bank row
    map, and whether the call uses the shared prompt only (the ``shared_warmup`` stage)."""

    bank: TALoraPromptBank
    rows: dict[int, int]
    shared_only: bool = False


#: The adapter of the probe forward at injection time: sites record their shapes and check affinity.
_PROBE = object()


@dataclass(eq=False)
class AttentionSite:
    """One adapted attention module: static facts read off the probe forward at injection time.

    ``num_heads``/``num_kv_heads``/``head_dim``, the prompt width ``hidden_size``, the names of the
    module's forward arguments (``forward_args``, each ``None`` in a replay) and the trailing shape
    of its rotary ``cos`` (``rotary_shape``; ``None`` when it takes none). Nothing per call.
    """

    module: nn.Module
    layer: int = -1
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    forward_args: tuple[str, ...] = ()
    rotary_shape: Optional[tuple[int, ...]] = None
    hidden_size: int = 0
    # whether the replay maps every prompt row on its own and affinely (see replay_is_affine)
    affine: bool = False
    reached: bool = False  # the probe's routing reached this module's attention call

    def project_prefix(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``(U, H_kv, n, hd)`` of prompt hidden states ``(U, n, d)``, from the module's own forward.

        Called from inside the module's forward (its weights are materialised there); the nested call
        carries only a capture marker, so it cannot be mistaken for a routed call.
        """
        kwargs = dict.fromkeys(self.forward_args)
        if self.rotary_shape is not None:
            kwargs["position_embeddings"] = _identity_rotary(self.rotary_shape, hidden)
        kwargs[_CAPTURE_KWARG] = True
        try:
            self.module(hidden, **kwargs)
        except _PrefixCaptured as captured:
            return captured.key, captured.value
        except Exception as error:
            if self.layer >= 0:  # installed: an error of the call (out of memory ...), not of the architecture
                raise
            raise ValueError(
                f"TA-LoRA computes its prefix keys/values by running its prompt through {type(self.module).__name__} "
                f"with no mask, cache or positions, and this attention failed on that ({type(error).__name__}: "
                f"{error}); attention that needs them (a sparse top-k indexer, as in DeepSeek-V3.2) is not supported."
            ) from error
        raise RuntimeError(f"{type(self.module).__name__} did not reach the attention interface on the prefix replay.")

    def project_prompts(
        self,
        shared: torch.Tensor,
        coefficients: Optional[torch.Tensor] = None,
        directions: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``(U, H_kv, n, hd)`` of the prompts ``shared + coefficients[u, :, None] * directions[u]``.

        ``shared`` ``(n, d)``; ``coefficients`` ``(U, n)`` and ``directions`` ``(U, d)``, or neither
        (then the one prompt ``shared``, ``U = 1``), all in the dtype and on the device the replay
        runs in. When the replay is affine and per row (``self.affine``),
        ``f(a + c w) = f(a) + c (f(w) - f(0))``, so one replay of ``n + U + 1`` rows gives what a
        replay of all ``U * n`` prompt rows would: a batch of 64 distinct tasks costs almost what a
        batch of one task costs. Otherwise the prompts are built and replayed.
        """
        if coefficients is None:
            return self.project_prefix(shared.unsqueeze(0))
        if not self.affine:
            prompts = shared.unsqueeze(0) + coefficients.unsqueeze(-1) * directions.unsqueeze(1)  # (U, n, d)
            return self.project_prefix(prompts)
        n, num_tasks = shared.shape[0], directions.shape[0]
        rows = torch.cat([shared, directions, directions.new_zeros(1, directions.shape[1])])
        key, value = self.project_prefix(rows.unsqueeze(0))  # (1, H_kv, n + U + 1, hd)
        scale = coefficients.to(key.dtype)[:, None, :, None]  # (U, 1, n, 1)

        def combine(projected: torch.Tensor) -> torch.Tensor:
            at_shared = projected[:, :, :n]  # (1, H_kv, n, hd)
            slope = (projected[0, :, n : n + num_tasks] - projected[0, :, n + num_tasks :]).transpose(0, 1)
            return at_shared + scale * slope.unsqueeze(2)  # (U, H_kv, n, hd)

        return combine(key), combine(value)

    def prefix(self, source: PrefixSource, routing: CallRouting, query: torch.Tensor):
        """This layer's prefix for the call, or ``None``: ``(key, value, gate, gate_scale)``.

        ``key``/``value`` ``(B, H_kv, n, hd)``, ``gate`` ``(H,)`` and each example's task gate scale
        ``(B,)`` (``None`` for the shared prompt alone).

        ``query`` ``(B, H, q, hd)`` fixes the batch (grown by ``generate`` for beams), the device and
        the compute dtype. Inside ``generate`` (``routing.cache``) each layer computes it once per
        call and batch size; in training it is recomputed from the parameters on every forward.
        """
        row = source.rows.get(self.layer)
        if row is None:
            return None
        batch_size = query.shape[0]
        cache_key = (self.layer, batch_size)
        if routing.cache is not None and cache_key in routing.cache:
            return routing.cache[cache_key]
        bank, device, dtype = source.bank, query.device, query.dtype
        if source.shared_only:  # one prompt for all: the shared one
            key, value = self.project_prompts(bank.shared_prompt[row].to(device, dtype))  # (1, H_kv, n, hd)
            inverse = torch.zeros(batch_size, dtype=torch.long, device=device)
            gate_scale = None
        else:
            tasks, inverse = routing.unique_tasks(batch_size)
            tasks = tasks.to(bank.gate.device)
            shared, coefficients, directions = bank.task_prompt_factors(tasks, row)
            key, value = self.project_prompts(
                shared.to(device, dtype), coefficients.to(device, dtype), directions.to(device, dtype)
            )  # (U, H_kv, n, hd)
            inverse = inverse.to(device)
            gate_scale = bank.task_gate_scales(tasks, row).to(device)[inverse]  # (B,)
        result = (key[inverse], value[inverse], bank.gate[row].to(device), gate_scale)
        if routing.cache is not None:
            routing.cache[cache_key] = result
        return result


def replay_is_affine(site: AttentionSite, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the site's key/value replay is an affine map applied to each row on its own.

    Checked numerically once per site, inside the probe forward, on fixed random rows ``x, y``: the
    shortcut of :meth:`AttentionSite.project_prompts` must reproduce ``f(x + c y)`` for ``c = 0.5, -2``
    (a key norm fails this), ``f(100 x) + f(100 y) - f(0)`` must equal ``f(100 (x + y))`` (a clamp
    such as OLMo's ``clip_qkv`` fails this at large inputs), and the rows in reverse order must come
    back reversed. The tolerance, the square root of the dtype's epsilon relative to the outputs'
    size, is far below what a norm or clamp deviates by and far above rounding.
    """
    if site.hidden_size <= 0:  # the probe could not see the prompt width: replay the built prompts
        return False
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


def _identity_rotary(rotary_shape: tuple[int, ...], hidden: torch.Tensor):
    """``(cos, sin) = (1, 0)`` shaped like the module's real rotary embedding, for ``hidden`` ``(U, n, d)``."""
    shape = (hidden.shape[0], hidden.shape[1], *rotary_shape)
    return hidden.new_ones(shape), hidden.new_zeros(shape)


#: Set while the wrapped base attention function runs: the config then reports the base implementation, which
#: that function may read (transformers' flash attention picks its kernel by ``config._attn_implementation``).
_RUNNING_BASE: contextvars.ContextVar[bool] = contextvars.ContextVar("talora_running_base_attention", default=False)


#: Base attention functions that never read the implementation's name from the config (flash attention does).
_NAME_BLIND = ("eager", "sdpa", "flex_attention")


def _compiled_without_name(base: str) -> bool:
    """Whether ``base`` runs inside torch.compile without ``_RUNNING_BASE``, whose ContextVar would break the graph
    (it needs no name)."""
    return base in _NAME_BLIND and torch.compiler.is_compiling()


class _SiteConfigView:
    """The module's config as it was, except ``_attn_implementation`` routes through TA-LoRA (outside the
    wrapped base attention function, which sees its own name)."""

    def __init__(self, config):
        self.__dict__["_talora_base_config"] = config  # read through __dict__: torch.compile traces it

    @property
    def _attn_implementation(self) -> str:
        base = self.__dict__["_talora_base_config"]._attn_implementation or "eager"
        if _compiled_without_name(base):
            return routed_implementation(base)
        return base if _RUNNING_BASE.get() else routed_implementation(base)

    def __getattr__(self, name):
        if "_talora_base_config" not in self.__dict__:  # a copy being built (deepcopy, pickle) asks before it is set
            raise AttributeError(name)
        return getattr(self.__dict__["_talora_base_config"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["_talora_base_config"], name, value)

    def __repr__(self):
        return repr(self.__dict__["_talora_base_config"])


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
        if kwargs.pop(_CAPTURE_KWARG, False):
            raise _PrefixCaptured(key, value)
        routing = kwargs.pop(ROUTING_KWARG, None)
        if base == "eager" and getattr(module, "reorder_and_upcast_attn", False):
            # GPT-2's own branch for eager attention, which the routed name would otherwise skip
            out, weights = module._upcast_and_reordered_attn(query, key, value, attention_mask)
        else:
            base_fn = _eager_attention_of(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
            if _compiled_without_name(base):
                out, weights = base_fn(module, query, key, value, attention_mask, *args, **kwargs)
            else:
                token = _RUNNING_BASE.set(True)
                try:
                    out, weights = base_fn(module, query, key, value, attention_mask, *args, **kwargs)
                finally:
                    _RUNNING_BASE.reset(token)
        site: AttentionSite = module._talora_site
        if routing is None and site.layer < 0:  # the setup probe, through a layer that drops keyword arguments:
            return out, weights  # install_sites counts the layers the routing reached and says so
        if routing is None:
            raise RuntimeError(
                f"{type(module).__name__} (decoder layer {site.layer}) carries a TA-LoRA adapter but was called "
                "without the call's task routing: an inner module (e.g. model.model or a decoder layer) was called "
                "directly. Call the PEFT model, or the causal LM it wraps, with task_ids=...; to run the base model, "
                "use `with peft_model.disable_adapter():`."
            )
        if routing.adapter is _PROBE:
            _record_probe(site, query, key)
        elif routing.enabled and routing.adapter is not None:
            prefix = site.prefix(routing.adapter, routing, query)
            if prefix is not None:
                scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
                dropout = kwargs.get("dropout", 0.0) if module.training else 0.0
                softcap = kwargs.get("softcap")
                key, value, gate, gate_scale = prefix
                out = out + gated_prefix_attention(
                    query, key, value, gate, scaling, dropout=dropout, softcap=softcap, gate_scale=gate_scale
                ).to(out.dtype)
        return out, weights

    attention.__name__ = f"talora_{base.replace('|', '_')}_attention"
    return attention


def _record_probe(site: AttentionSite, query: torch.Tensor, key: torch.Tensor) -> None:
    """In the probe forward: the site's head counts, and whether its key/value replay is affine."""
    site.num_heads, site.num_kv_heads, site.head_dim = query.shape[1], key.shape[1], query.shape[-1]
    site.reached = True
    site.affine = replay_is_affine(site, query.device, query.dtype)


def _looks_like_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower() and hasattr(module, "config")


def install_sites(model: nn.Module, num_layers: int) -> list[AttentionSite]:
    """Attach an :class:`AttentionSite` to the attention module of every decoder layer, one per layer.

    A probe forward on two tokens, with a probe routing, checks that each candidate module really
    calls the attention interface *and* receives the call's keyword arguments there (the route the
    task routing takes), and records its head counts and forward arguments. A model whose decoder
    layers cannot all be reached this way gets a ``ValueError`` here, never silently unadapted layers.
    """
    if any(hasattr(m, "_talora_site") for m in model.modules()):
        raise ValueError(
            f"This {type(model).__name__} already carries a TA-LoRA adapter. Add another adapter with "
            "peft_model.add_adapter(name, config), or call get_peft_model on a fresh base model."
        )
    candidates = [(name, m) for name, m in model.named_modules() if _looks_like_attention(m)]
    sites, hooks, calls = [], [], []
    for name, module in candidates:
        site = AttentionSite(module=module)
        module._talora_site = site
        module.config = _SiteConfigView(module.config)
        sites.append((name, site))

        def record(mod, args, kwargs, site=site):
            if not isinstance(kwargs.get(ROUTING_KWARG), CallRouting):
                return
            bound = inspect.signature(mod.forward).bind_partial(*args, **kwargs).arguments
            arguments = {k: v for k, v in list(bound.items())[1:] if k not in ("kwargs", "args")}
            rotary = arguments.get("position_embeddings")
            if rotary is not None:
                if not (isinstance(rotary, (tuple, list)) and len(rotary) == 2 and all(map(torch.is_tensor, rotary))):
                    raise ValueError(
                        f"{type(mod).__name__} takes a rotary embedding that is not a (cos, sin) pair of tensors "
                        f"(got {type(rotary).__name__}); TA-LoRA replays prompts with identity rotary and supports "
                        "(cos, sin) rotary embeddings only."
                    )
                site.rotary_shape = tuple(rotary[0].shape[2:])
            site.forward_args = tuple(k for k in arguments if k != "position_embeddings")
            hidden_states = next(iter(bound.values()), None)
            site.hidden_size = hidden_states.shape[-1] if isinstance(hidden_states, torch.Tensor) else 0
            calls.append(site)

        hooks.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        device = execution_device(model)
        with torch.no_grad():
            model(
                input_ids=torch.zeros(1, 2, dtype=torch.long, device=device),
                use_cache=False,
                **{ROUTING_KWARG: CallRouting(None, adapter=_PROBE)},
            )
    except Exception:
        for _, site in sites:
            remove_site(site)
        raise
    finally:
        for hook in hooks:
            hook.remove()

    reached = [(name, s) for name, s in sites if s.reached]
    for _, site in sites:
        if not site.reached:
            remove_site(site)
    if len(reached) != num_layers:
        for _, site in reached:
            remove_site(site)
        names = [name for name, _ in reached] or "none"
        raise ValueError(
            f"TA-LoRA reaches attention through transformers' attention interface (ALL_ATTENTION_FUNCTIONS), with "
            f"the call's keyword arguments passed down to it, but in {type(model).__name__} only {len(reached)} of "
            f"{num_layers} decoder layers called it (reached: {names}). This model computes attention in its own code or "
            "drops keyword arguments on the way; TA-LoRA supports models whose decoder layers pass their keyword "
            "arguments to the attention interface, as all current transformers decoders do."
        )
    order = {id(s): i for i, s in enumerate(dict.fromkeys(calls))}
    ordered = sorted((s for _, s in reached), key=lambda s: order[id(s)])
    for position, site in enumerate(ordered):
        layer_idx = getattr(site.module, "layer_idx", None)
        site.layer = layer_idx if isinstance(layer_idx, int) else position
    return sorted(ordered, key=lambda s: s.layer)


def execution_device(model: nn.Module) -> torch.device:
    """Where ``model``'s inputs go: accelerate's execution device for a dispatched (offloaded) model,
    else the device of its first parameter that is not on the meta device."""
    for module in (model, getattr(model, "get_input_embeddings", lambda: None)()):
        hook = getattr(module, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for place in device_map.values():
            if place not in ("cpu", "disk", "meta"):
                return torch.device(f"cuda:{place}" if isinstance(place, int) else place)
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def remove_site(site: AttentionSite) -> None:
    """Give the module back its own config and drop the site."""
    module = site.module
    if isinstance(module.config, _SiteConfigView):
        module.config = object.__getattribute__(module.config, "_talora_base_config")
    if getattr(module, "_talora_site", None) is site:
        del module._talora_site
