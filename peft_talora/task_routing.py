"""How ``task_ids`` get from a user's call to a multi-task tuner, shared by TA-LoRA and MTL-LoRA.

A :class:`TaskRouter` installs a forward pre-hook on the wrapped transformers model. The hook
takes ``task_ids`` out of the call, validates them (``tuner.resolve_task_ids``) and hands the
resolved ``(batch,)`` tensor to ``tuner.route``, which prepares whatever the tuner's layers read
during that forward. Inside ``generate`` the ids are given once; decoding steps reuse the routes
of the first step, and when transformers grows the batch (beams, ``num_return_sequences``) the
ids are expanded the same way it expands every other per-example input.

A tuner using the router provides:

- ``routing_enabled`` (bool): ``False`` when its adapters are disabled;
- ``resolve_task_ids(task_ids, batch_size, device)`` -> ``LongTensor (batch,)``;
- ``route(task_ids)``: ``task_ids`` is a ``LongTensor (batch,)``, or ``None`` to switch routing off.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from .routing import TaskIds


class TaskRouter:
    """Forward pre-hook and ``generate`` bookkeeping that feed ``task_ids`` to ``tuner.route``."""

    def __init__(self, model: nn.Module, tuner):
        self.model = model
        self.tuner = tuner
        self._generation: Optional[_GenerationRouting] = None
        self._hook = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        _declare_task_ids_parameter(model)

    def remove(self) -> None:
        """Take the hook and the declared ``task_ids`` parameter off the model."""
        self._hook.remove()
        if getattr(self.model.__dict__.get("forward"), "_talora_declares_task_ids", False):
            del self.model.forward

    @contextmanager
    def generation(self, task_ids: TaskIds, inputs: torch.Tensor):
        """Route a whole ``generate`` call by the ids of its ``inputs`` ``(batch, ...)``."""
        resolved = self.tuner.resolve_task_ids(task_ids, inputs.shape[0], device=inputs.device)
        self._generation = _GenerationRouting(resolved)
        try:
            yield
        finally:
            self._generation = None

    def _pre_hook(self, module, args, kwargs):
        task_ids = kwargs.pop("task_ids", None)
        if not self.tuner.routing_enabled:
            self.tuner.route(None)
            return args, kwargs
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        batch_size = inputs.shape[0]
        generation = self._generation
        if task_ids is None and generation is not None:
            if generation.routed_batch_size == batch_size:
                return args, kwargs  # a decoding step: this generate call's routes are already set
            resolved = generation.expand_to(batch_size)
            generation.routed_batch_size = batch_size
        else:
            resolved = self.tuner.resolve_task_ids(task_ids, batch_size, device=inputs.device)
        self.tuner.route(resolved)
        return args, kwargs


class _GenerationRouting:
    """Task ids of one ``generate`` call, and the batch size they were last routed for."""

    def __init__(self, task_ids: torch.Tensor):
        self.task_ids = task_ids
        self.routed_batch_size: Optional[int] = None

    def expand_to(self, batch_size: int) -> torch.Tensor:
        given = self.task_ids.shape[0]
        if batch_size % given:
            raise ValueError(
                f"generate ran a batch of {batch_size} rows for {given} task ids; task ids can only follow an "
                "expansion of each example into equal groups (beams, num_return_sequences)."
            )
        return self.task_ids.repeat_interleave(batch_size // given)


class _ForwardDeclaringTaskIds:
    """The model's own ``forward``, with a signature that also declares ``task_ids``.

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
        parameters.insert(position, inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None))
        self.__signature__ = signature.replace(parameters=parameters)
        self.__doc__ = forward.__doc__
        self.__name__ = "forward"

    def __call__(self, *args, **kwargs):
        if self.own_forward is not None:
            return self.own_forward(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)


def _declare_task_ids_parameter(model: nn.Module) -> None:
    """Give the wrapped model's ``forward`` a visible ``task_ids`` parameter.

    The pre-hook removes ``task_ids`` before ``forward`` runs, but two callers decide by signature
    which inputs a model takes: ``Trainer(remove_unused_columns=True)`` (which inspects the *base*
    model of a PEFT model) and ``generate``'s check of model kwargs. Only the signature changes.
    """
    if getattr(model.__dict__.get("forward"), "_talora_declares_task_ids", False):
        return
    model.forward = _ForwardDeclaringTaskIds(model, model.__dict__.get("forward"))
