"""How ``task_ids`` travel from a user's call to the layers of a multi-task tuner (TA-LoRA, MTL-LoRA).

The routing of a call is an immutable :class:`CallRouting` object that travels *with the call*,
as the keyword argument ``talora_routing``: transformers 5 passes the keyword arguments of
``XForCausalLM.forward`` on to every decoder layer and from there to the attention interface.
Nothing about a call is stored on a module, so:

- a layer recomputed by gradient checkpointing gets the routing of the call that built it (the
  recompute re-runs the layer with the keyword arguments it was first called with);
- a layer computes what it needs inside its own forward, where FSDP, DeepSpeed ZeRO-3 and
  accelerate's offloading have materialised its weights;
- two threads, or a ``generate`` nested in another's ``LogitsProcessor``, never see each other's tasks.

A :class:`TaskRouter` puts the routing into the call: a forward pre-hook on the wrapped model
turns ``task_ids`` into a :class:`CallRouting` (a pure function of the call's arguments and the
tuner's active adapter), and ``generate`` builds one routing per ``generate`` call, with a cache
for what the layers compute once per call. Calling an inner module (``model.model``, a decoder
layer) without ``talora_routing`` raises a clear error in the adapted layers.

Layers that do not receive keyword arguments (MTL-LoRA's ``nn.Linear`` replacements) read the
routing of the innermost running layer from :func:`current_routing`, a ``ContextVar`` stack kept by
:func:`install_routing_scopes` around each decoder layer's forward from the layer's own keyword
arguments: per thread, per call, and set again when checkpointing recomputes the layer.

A tuner using the router provides ``routing_for_call(task_ids, batch_size, device, cache)`` ->
:class:`CallRouting`.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

#: Keyword argument that carries a call's :class:`CallRouting` through the model.
ROUTING_KWARG = "talora_routing"

#: Keyword under which the patched ``PeftModelForCausalLM.forward`` passes task ids to a tuner.
ROUTED_TASK_IDS_KWARG = "_peft_talora_task_ids"


class CallRouting:
    """The task routing of one forward or ``generate`` call.

    ``task_ids``: resolved ``LongTensor (batch,)``, or ``None`` when the adapters are off for this
    call. ``adapter``: what the tuner's layers need to serve the call, snapshot at its start (for
    TA-LoRA the prompt bank and its layer map; for MTL-LoRA the adapter name). ``cache``: a dict
    for values computed once per call (prefix keys/values inside ``generate``), or ``None`` where
    nothing may be reused (training: gradient checkpointing recomputes from the parameters).
    """

    __slots__ = ("task_ids", "adapter", "cache", "_unique")

    def __init__(self, task_ids: Optional[torch.Tensor], adapter: Any = None, cache: Optional[dict] = None):
        self.task_ids = task_ids
        self.adapter = adapter
        self.cache = cache
        self._unique: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def enabled(self) -> bool:
        return self.task_ids is not None

    def task_ids_for(self, batch_size: int) -> torch.Tensor:
        """The ids ``(batch_size,)`` of a layer's batch: ``generate`` grows the batch by whole groups
        (beams, ``num_return_sequences``), each example's copies next to each other."""
        given = self.task_ids.shape[0]
        if batch_size == given:
            return self.task_ids
        if given == 0 or batch_size % given:
            raise ValueError(
                f"A layer got a batch of {batch_size} rows for {given} task ids; task ids can only follow an "
                "expansion of each example into equal groups (beams, num_return_sequences). Pass one task id "
                "per example of the batch you call the model with."
            )
        return self.task_ids.repeat_interleave(batch_size // given)

    def unique_tasks(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tasks (U,), inverse (batch_size,))`` of :meth:`task_ids_for`, computed once per call and size.

        Depends on the ids only, never on parameters, so reusing it in a recompute is exact.
        """
        if batch_size not in self._unique:
            self._unique[batch_size] = torch.unique(self.task_ids_for(batch_size), return_inverse=True)
        return self._unique[batch_size]

    def __deepcopy__(self, memo):
        return self  # immutable for the call's lifetime; copying a model mid-call must not clone it

    def __repr__(self) -> str:
        ids = None if self.task_ids is None else self.task_ids.tolist()
        return f"CallRouting(task_ids={ids})"


#: Routings of the running routing scopes in this thread, innermost last (see ``install_routing_scopes``).
_SCOPES: contextvars.ContextVar[tuple] = contextvars.ContextVar("peft_talora_routing_scopes", default=())


def current_routing() -> Optional[CallRouting]:
    """The routing of the innermost running decoder layer (or wrapped model) in this thread, if any."""
    scopes = _SCOPES.get()
    return scopes[-1] if scopes else None


class TaskRouter:
    """Turns each call's ``task_ids`` into a :class:`CallRouting` keyword argument; holds no per-call state."""

    def __init__(self, model: nn.Module, tuner):
        refuse_adapted_base(model)
        self.model = model
        self.tuner = tuner
        self._hook = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        _declare_routing_parameters(model)
        model.generate = _GenerateRoutingTaskIds(self, model.__dict__.get("generate"))
        model._replicate_for_data_parallel = _RefuseDataParallel()

    def remove(self) -> None:
        """Take the hook and the declared parameters off the model."""
        self._hook.remove()
        if isinstance(self.model.__dict__.get("_replicate_for_data_parallel"), _RefuseDataParallel):
            del self.model._replicate_for_data_parallel
        if getattr(self.model.__dict__.get("forward"), "_talora_declares_task_ids", False):
            own = self.model.forward.own_forward
            del self.model.forward
            if own is not None:
                self.model.forward = own
        generate = self.model.__dict__.get("generate")
        if isinstance(generate, _GenerateRoutingTaskIds):
            del self.model.generate
            if generate.own_generate is not None:
                self.model.generate = generate.own_generate

    def for_generation(self, task_ids, args: tuple, kwargs: dict) -> CallRouting:
        """The routing of one ``generate(*args, **kwargs)`` call, with a per-call cache."""
        inputs = batch_inputs(args, kwargs, required=False)
        if inputs is None:  # transformers starts from BOS: one row per row of the first tensor argument, else one
            size = next((value.shape[0] for value in kwargs.values() if isinstance(value, torch.Tensor)), 1)
            return self.tuner.routing_for_call(task_ids, size, next(self.model.parameters()).device, cache={})
        return self.tuner.routing_for_call(task_ids, inputs.shape[0], inputs.device, cache={})

    def _pre_hook(self, module, args, kwargs):
        task_ids = kwargs.pop("task_ids", None)
        if kwargs.get(ROUTING_KWARG) is not None:  # generate's routing, or a caller that built its own
            if task_ids is not None:
                raise ValueError(
                    "Got task_ids and a routing of the call at once (inside generate(task_ids=...), the model is "
                    "called without task_ids); pass task_ids once, to the outermost call."
                )
            return args, kwargs
        inputs = batch_inputs(args, kwargs)
        kwargs[ROUTING_KWARG] = self.tuner.routing_for_call(task_ids, inputs.shape[0], inputs.device)
        return args, kwargs


def batch_inputs(args: tuple, kwargs: dict, required: bool = True) -> Optional[torch.Tensor]:
    """The ``input_ids`` (or ``inputs_embeds``) of a forward or ``generate`` call: ``(batch, ...)``.

    An empty batch is refused here: transformers' attention cannot reshape a batch of 0 rows. Without
    inputs: an error, or ``None`` where not ``required`` (``generate`` then starts from BOS).
    """
    inputs = kwargs.get("input_ids")
    for name in ("inputs", "inputs_embeds"):  # ``inputs``: the name of generate's first parameter
        if inputs is None:
            inputs = kwargs.get(name)
    if inputs is None and args:
        inputs = args[0]
    if inputs is None:
        if not required:
            return None
        raise ValueError("Call the model with input_ids or inputs_embeds so that task_ids can be matched to examples.")
    if inputs.shape[0] == 0:
        raise ValueError(
            f"The batch is empty (input shape {tuple(inputs.shape)}): call the model with at least one example, "
            "or skip the call when there is nothing to process."
        )
    return inputs


def refuse_adapted_base(model: nn.Module) -> None:
    """Raise before anything changes when ``model`` already carries one of this package's adapters."""
    if getattr(model.__dict__.get("forward"), "_talora_declares_task_ids", False):
        raise ValueError(
            f"This {type(model).__name__} already carries a peft-talora adapter (TA-LoRA or MTL-LoRA); a second "
            "get_peft_model on it would break the first. Add another adapter with peft_model.add_adapter(name, "
            "config), or call get_peft_model on a fresh base model (or on peft_model.unload())."
        )


def install_routing_scopes(model: nn.Module) -> list:
    """Keep :func:`current_routing` right around the forward of ``model`` and of each of its decoder layers.

    A decoder layer is a ``GradientCheckpointingLayer`` (every transformers 5 decoder's layers are);
    each one sets the routing from its own keyword arguments, and a layer called without one sees
    ``None`` (its adapted modules then raise). A layer's gradient-checkpointing function is wrapped
    (:class:`_ScopedCheckpoint`) so that a recompute at backward time, which runs without the
    layer's hooks, sees the routing of the call that built it. Returns the hook handles.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    scopes = [model, *(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))]
    handles = []
    for scope in scopes:
        handles.append(scope.register_forward_pre_hook(_enter_scope, with_kwargs=True))
        handles.append(scope.register_forward_hook(_leave_scope, always_call=True))
    return handles


def _enter_scope(module, args, kwargs):
    _SCOPES.set((*_SCOPES.get(), kwargs.get(ROUTING_KWARG)))
    checkpoint = module.__dict__.get("_gradient_checkpointing_func")
    if checkpoint is not None and not isinstance(checkpoint, _ScopedCheckpoint):
        module._gradient_checkpointing_func = _ScopedCheckpoint(checkpoint)


def _leave_scope(module, args, output):
    _SCOPES.set(_SCOPES.get()[:-1])


class _ScopedCheckpoint:
    """A decoder layer's checkpoint function whose (re)computations run in their call's routing scope.

    transformers checkpoints ``partial(forward, layer, **kwargs)`` and recomputes it at backward time
    without the layer's hooks; the routing is one of those ``kwargs``, so wrapping the function that
    is checkpointed makes the recompute see exactly the routing of the call that built it.
    """

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def __call__(self, function, *args, **kwargs):
        keywords = getattr(function, "keywords", None) or {}
        return self.checkpoint(_InScope(function, keywords.get(ROUTING_KWARG)), *args, **kwargs)


class _InScope:
    """``function`` run with ``routing`` as the innermost routing scope."""

    def __init__(self, function, routing: Optional[CallRouting]):
        self.function, self.routing = function, routing

    def __call__(self, *args, **kwargs):
        with routing_scope(self.routing):
            return self.function(*args, **kwargs)


@contextmanager
def routing_scope(routing: Optional[CallRouting]):
    """Make ``routing`` the innermost routing scope of this thread within the block."""
    token = _SCOPES.set((*_SCOPES.get(), routing))
    try:
        yield
    finally:
        _SCOPES.reset(token)


def remove_routing_scopes(model: nn.Module, handles: list) -> None:
    """Undo :func:`install_routing_scopes`: remove the hooks and unwrap the checkpoint functions."""
    for handle in handles:
        handle.remove()
    for module in model.modules():
        checkpoint = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(checkpoint, _ScopedCheckpoint):
            module._gradient_checkpointing_func = checkpoint.checkpoint


class _ForwardDeclaringTaskIds:
    """The model's own ``forward``, with a signature that also declares ``task_ids`` and ``talora_routing``.

    A callable object rather than a closure, so that ``copy.deepcopy`` of the model gives a copy
    whose ``forward`` runs the *copy* (a closure would keep calling the original model).
    """

    _talora_declares_task_ids = True

    def __init__(self, model: nn.Module, own_forward=None):
        self.model = model
        self.own_forward = own_forward  # an instance-level forward someone set before us, kept as is
        forward = own_forward or model.forward
        signature = inspect.signature(forward)
        parameters = list(signature.parameters.values())
        position = next((i for i, p in enumerate(parameters) if p.kind is p.VAR_KEYWORD), len(parameters))
        for name in (ROUTING_KWARG, "task_ids"):
            if name not in signature.parameters:
                parameters.insert(position, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
        self.__signature__ = signature.replace(parameters=parameters)
        self.__doc__ = forward.__doc__
        self.__name__ = "forward"

    def __call__(self, *args, **kwargs):
        if self.own_forward is not None:
            return self.own_forward(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)


class _GenerateRoutingTaskIds:
    """The wrapped model's own ``generate``, taking ``task_ids``: one routing per call (:meth:`TaskRouter.for_generation`).

    Whoever calls it, the tuner's ``generate``, PEFT's ``PeftModel.generate`` (a PEFT model without
    ``task_type``) or ``get_base_model().generate``, gets the same thing: ``task_ids`` as names or lists
    follow beams and ``num_return_sequences`` (transformers expands tensors only), and what the layers
    compute once per call is computed once. A callable object, so a deep copy of the model routes the copy.
    """

    def __init__(self, router: TaskRouter, own_generate=None):
        self.router = router
        self.own_generate = own_generate  # an instance-level generate someone set before us, kept as is
        self.__name__ = "generate"

    def __call__(self, *args, **kwargs):
        task_ids = kwargs.pop("task_ids", None)
        if kwargs.get(ROUTING_KWARG) is None:
            kwargs[ROUTING_KWARG] = self.router.for_generation(task_ids, args, kwargs)
        elif task_ids is not None:
            raise ValueError("Got task_ids and a routing of the call at once; pass task_ids once, to generate.")
        if kwargs.get("assistant_model") is not None:  # assisted generation: transformers hands the draft model
            kwargs["assistant_model"] = _draft_model(kwargs["assistant_model"], task_ids)  # every model kwarg
        if self.own_generate is not None:
            return self.own_generate(*args, **kwargs)
        model = self.router.model
        return type(model).generate(model, *args, **kwargs)


def _draft_model(draft, task_ids):
    """The draft model of one assisted ``generate`` call, as transformers sees it.

    transformers copies every model keyword of the main call to the draft's ``generate``, so there the main model's
    routing is dropped (a plain draft refuses unknown keywords; an adapted one would serve the main model's prompt
    bank), and a draft that carries a multi-task adapter itself is routed with the call's own ``task_ids``. The view
    is a shallow copy: the draft's class (transformers picks some draft generators by class name), weights, hooks
    and ``generation_config`` are the draft's own, and only this call sees the changed ``generate``.
    """
    view = copy.copy(draft)
    own_generate = draft.generate
    routed = isinstance(own_generate, _GenerateRoutingTaskIds)  # the transformers model itself (compiled or not)
    routed = routed or getattr(getattr(draft, "base_model", None), "routes_task_ids", False)  # or its PeftModel

    def generate(*args, **kwargs):
        kwargs.pop(ROUTING_KWARG, None)
        if task_ids is not None and routed:
            kwargs["task_ids"] = task_ids
        return own_generate(*args, **kwargs)

    view.__dict__["generate"] = generate
    return view


class _RefuseDataParallel:
    """``torch.nn.DataParallel`` copies a module's attributes as they are, so every GPU's copy would run the
    original model's ``forward`` wrapper and routing hook (the wrong weights, on the wrong device). Refuse it
    by name, with the fix, where it makes its copies."""

    def __call__(self):
        raise RuntimeError(
            "Multi-task adapters (TA-LoRA, MTL-LoRA) do not run under torch.nn.DataParallel, which Trainer uses when "
            "one process sees several GPUs. Launch one process per GPU instead (torchrun or accelerate launch: "
            "DistributedDataParallel), or show the process one GPU (CUDA_VISIBLE_DEVICES=0)."
        )


def _declare_routing_parameters(model: nn.Module) -> None:
    """Give the wrapped model's ``forward`` visible ``task_ids`` and ``talora_routing`` parameters.

    The pre-hook replaces ``task_ids`` before ``forward`` runs, but two callers decide by signature
    which inputs a model takes: ``Trainer(remove_unused_columns=True)`` (which inspects the *base*
    model of a PEFT model) and ``generate``'s check of model kwargs. Only the signature changes.
    """
    model.forward = _ForwardDeclaringTaskIds(model, model.__dict__.get("forward"))
