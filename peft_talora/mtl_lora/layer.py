"""The MTL-LoRA layer: a linear (or GPT-2 ``Conv1D``) projection plus a task-routed low-rank update.

Per adapter, with ``in``/``out`` the projection's features, ``r`` the rank, ``k`` up-projections
and ``T`` tasks:

- ``mtllora_A``       ``A``         ``(r, in)``       shared down-projection (Kaiming init, as LoRA's A)
- ``mtllora_B``       ``B_1..B_k``  ``(k, out, r)``   shared up-projections (zero init: exact base model)
- ``mtllora_lambda``  ``Lambda_t``  ``(T, r, r)``     per-task transform (identity init)
- ``mtllora_logits``  ``w_t``       ``(T, k)``        per-task mixing logits (uniform in +-1/sqrt(k), so the
  up-projections do not stay identical: with equal weights they would get equal gradients forever)

For example ``b`` of task ``t``: ``h = W x + s * sum_i softmax(w_t / tau)_i B_i Lambda_t A dropout(x)``
with ``s = lora_alpha / r``. The task ids come from the call's routing, made current around each
decoder layer (:func:`~peft_talora.multitask.routing.current_routing`). A batch is routed as a whole: the per-example ``Lambda`` ``(B, r, r)``
and mixing weights ``(B, k)`` are gathered by task id and applied with ``bmm`` and broadcasting, so
mixed batches need no loop over tasks or examples.

The per-task tensors are kept in blocks, one per ``add_tasks`` call (``mtllora_lambda[adapter][i]``
of shape ``(T_i, r, r)``), read as one ``(T, ...)`` tensor. Tasks added later are separate
parameters, so training only them (with any optimizer, weight decay included) cannot move a bit of
the earlier tasks. Saved adapters hold the concatenated tensors (see ``MTLLoraModel``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..multitask.routing import current_routing


class MTLLoraLayer(BaseTunerLayer):
    """State and math of the MTL-LoRA update; mixed into :class:`Linear` (see the module docstring)."""

    adapter_layer_names = ("mtllora_A", "mtllora_B", "mtllora_lambda", "mtllora_logits")
    other_param_names = ("r", "scaling", "temperature", "mtllora_dropout", "frozen_task_blocks")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.temperature: dict[str, float] = {}
        self.mtllora_A = nn.ParameterDict()
        self.mtllora_B = nn.ParameterDict()
        self.mtllora_lambda = nn.ModuleDict()  # adapter -> ParameterList of task blocks (T_i, r, r)
        self.mtllora_logits = nn.ModuleDict()  # adapter -> ParameterList of task blocks (T_i, k)
        self.mtllora_dropout = nn.ModuleDict()
        # adapter -> number of leading task blocks that stay frozen, together with A and B (the "new_tasks" stage)
        self.frozen_task_blocks: dict[str, int] = {}
        self.merged_tasks: dict[str, int] = {}  # adapter -> the task merged into the base weights
        self.merged_adapters: list[str] = []
        self._disable_adapters = False

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features, self.fan_in_fan_out = base.in_features, base.out_features, False
        elif isinstance(base, Conv1D):  # GPT-2 style: weight (in, out), y = x @ W + b
            (self.in_features, self.out_features), self.fan_in_fan_out = base.weight.shape, True
        else:
            raise TypeError(
                f"MTL-LoRA adapts torch.nn.Linear and transformers Conv1D layers, not {type(base).__name__}; "
                "leave this module out of target_modules."
            )

    # ----------------------------------------------------------------- parameters
    def update_layer(self, adapter_name: str, config, inference_mode: bool = False) -> None:
        """Create adapter ``adapter_name`` on this layer from an ``MTLLoraConfig``."""
        r, k = config.r, config.num_up_projections
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.scaling
        self.temperature[adapter_name] = config.temperature
        dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.mtllora_dropout[adapter_name] = dropout
        down = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # LoRA's init of A
        self.mtllora_A[adapter_name] = nn.Parameter(down)
        self.mtllora_B[adapter_name] = nn.Parameter(torch.zeros(k, self.out_features, r))
        self.mtllora_lambda[adapter_name] = nn.ParameterList()
        self.mtllora_logits[adapter_name] = nn.ParameterList()
        self.add_task_block(adapter_name, config.num_tasks)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def add_task_block(self, adapter_name: str, num_new_tasks: int) -> None:
        """Append ``Lambda`` (identity) and mixing logits for ``num_new_tasks`` tasks, frozen until the tuner says."""
        reference = self.mtllora_A[adapter_name]
        r, k = reference.shape[0], self.mtllora_B[adapter_name].shape[0]
        like = dict(device=reference.device, dtype=reference.dtype)
        lam = torch.eye(r, **like).expand(num_new_tasks, r, r).clone()
        bound = 1.0 / math.sqrt(k)  # the authors' kaiming_uniform_(a=sqrt(5)) on a (T, k) tensor
        logits = torch.empty(num_new_tasks, k, device=reference.device, dtype=torch.float32).uniform_(-bound, bound)
        self.mtllora_lambda[adapter_name].append(nn.Parameter(lam, requires_grad=False))
        self.mtllora_logits[adapter_name].append(nn.Parameter(logits.to(reference.dtype), requires_grad=False))

    @torch.no_grad()
    def copy_into_last_block(self, adapter_name: str, sources: list[int]) -> None:
        """Start the tasks of the last block with the ``Lambda`` and mixing logits of tasks ``sources``."""
        index = torch.as_tensor(sources, device=self.mtllora_A[adapter_name].device)
        self.mtllora_lambda[adapter_name][-1].copy_(self.task_lambdas(adapter_name)[index])
        self.mtllora_logits[adapter_name][-1].copy_(self.task_logits(adapter_name)[index])

    def task_lambdas(self, adapter_name: str) -> torch.Tensor:
        """``Lambda`` of every task, ``(T, r, r)``."""
        return _concat(self.mtllora_lambda[adapter_name])

    def task_logits(self, adapter_name: str) -> torch.Tensor:
        """Mixing logits ``w`` of every task, ``(T, k)``."""
        return _concat(self.mtllora_logits[adapter_name])

    def num_tasks(self, adapter_name: str) -> int:
        return sum(block.shape[0] for block in self.mtllora_lambda[adapter_name])

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        """PEFT calls this after every ``requires_grad`` change; keeps the ``new_tasks`` stage's frozen parts frozen."""
        super()._freeze_non_trainable_peft_weights(adapter_names)
        if adapter_names is None:
            names = list(self.frozen_task_blocks)
        else:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            frozen = self.frozen_task_blocks.get(name, 0)
            if not frozen or name not in self.mtllora_A:
                continue
            self.mtllora_A[name].requires_grad_(False)
            self.mtllora_B[name].requires_grad_(False)
            for block in (*list(self.mtllora_lambda[name])[:frozen], *list(self.mtllora_logits[name])[:frozen]):
                block.requires_grad_(False)

    # ----------------------------------------------------------------- math
    def mixing_weights(self, adapter_name: str, task_ids: torch.Tensor) -> torch.Tensor:
        """``softmax(w_t / tau)`` of each example's task ``t``: ``(B, k)`` from ``task_ids`` ``(B,)`` (in fp32)."""
        logits = self.task_logits(adapter_name)[task_ids].float() / self.temperature[adapter_name]
        return torch.softmax(logits, dim=-1).to(self.mtllora_B[adapter_name].dtype)

    def delta(self, adapter_name: str, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """``s * sum_i p_i B_i Lambda_t A x`` per example: ``x (B, n, in)``, ``task_ids (B,)`` -> ``(B, n, out)``.

        Evaluated token-side (``(B, n, r)``, then ``(B, n, k*r)``) rather than by building each example's
        ``(out, r)`` up-projection: the saved activations stay ``O(B n k r)`` instead of ``O(B out r)``.
        """
        up = self.mtllora_B[adapter_name]  # (k, out, r)
        k, out, r = up.shape
        low = x @ self.mtllora_A[adapter_name].T  # (B, n, r)
        low = torch.bmm(low, self.task_lambdas(adapter_name)[task_ids].transpose(1, 2))  # Lambda_t A x: (B, n, r)
        weights = self.mixing_weights(adapter_name, task_ids)  # (B, k)
        mixed = (low.unsqueeze(2) * weights[:, None, :, None]).flatten(2)  # p_i Lambda_t A x: (B, n, k*r)
        return (mixed @ up.transpose(0, 1).reshape(out, k * r).T) * self.scaling[adapter_name]

    def up_projection(self, adapter_name: str, task: int) -> torch.Tensor:
        """``sum_i p_i B_i Lambda_t`` of one task ``t``: ``(out, r)``."""
        ids = torch.tensor([task], device=self.mtllora_A[adapter_name].device)
        mixed = torch.einsum("k,kor->or", self.mixing_weights(adapter_name, ids)[0], self.mtllora_B[adapter_name])
        return mixed @ self.task_lambdas(adapter_name)[task]

    def get_delta_weight(self, adapter_name: str, task: int) -> torch.Tensor:
        """``s * sum_i p_i B_i Lambda_t A`` of task ``task``, shaped like the base weight (transposed for Conv1D)."""
        weight = self.get_base_layer().weight
        up = self.up_projection(adapter_name, task).float()  # (out, r)
        delta = self.scaling[adapter_name] * (up @ self.mtllora_A[adapter_name].float())  # (out, in)
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(device=weight.device, dtype=weight.dtype)

    def _routed_task_ids(self, adapter_name: str, batch_size: int, device: torch.device) -> torch.Tensor:
        """The task ids ``(batch_size,)`` of the call this layer runs in (the innermost decoder layer's routing)."""
        routing = current_routing()
        if routing is None or not routing.enabled:
            if self.num_tasks(adapter_name) == 1:
                return torch.zeros(batch_size, dtype=torch.long, device=device)
            raise RuntimeError(
                "An MTL-LoRA layer ran without the call's task routing: an inner module (e.g. model.model or a "
                "decoder layer) was called directly. Call the PEFT model, or the causal LM it wraps, with "
                "task_ids=...; to run the base model, use `with peft_model.disable_adapter():`."
            )
        try:
            return routing.task_ids_for(batch_size).to(device)
        except ValueError as err:
            raise RuntimeError(f"MTL-LoRA: {err} This layer needs inputs laid out (batch, ..., features).") from None

    # ----------------------------------------------------------------- merging
    def merge(
        self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None, tasks: Optional[dict] = None
    ) -> None:
        """Add one task's update to the base weight, per adapter: ``tasks`` maps adapter name -> task id.

        A single-task adapter needs no entry. ``safe_merge`` checks the merged weights for NaN/inf first.
        """
        plan = self._merge_plan(adapter_names, tasks)
        if safe_merge:
            self.check_merge_is_finite(plan)
        for name, task in plan:
            self.get_base_layer().weight.data += self.get_delta_weight(name, task)
            self.merged_adapters.append(name)
            self.merged_tasks[name] = task

    def _merge_plan(self, adapter_names: Optional[list[str]], tasks: Optional[dict]) -> list[tuple[str, int]]:
        """The (adapter, task) pairs a merge would add here: adapters not merged yet, with their task."""
        plan = []
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.mtllora_A:
                continue
            task = (tasks or {}).get(name)
            if task is None:
                count = self.num_tasks(name)
                if count != 1:
                    raise ValueError(
                        f"MTL-LoRA merges one task into the base weights; adapter {name!r} has {count} tasks: pass "
                        "task=<id or name> to merge_and_unload / merge_adapter."
                    )
                task = 0
            plan.append((name, task))
        return plan

    def check_merge_is_finite(self, plan: list[tuple[str, int]]) -> None:
        """Raise, changing nothing, if merging ``plan`` would put NaN or inf into the base weight."""
        merged = self.get_base_layer().weight.detach().clone()
        for name, task in plan:
            merged += self.get_delta_weight(name, task)
            if not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")

    def unmerge(self, keep: int = 0) -> None:
        """Subtract the merged tasks' updates from the base weight again, the latest first, all but the first
        ``keep`` merges (a merge that failed half-way undoes only its own)."""
        while len(self.merged_adapters) > keep:
            name = self.merged_adapters[-1]
            if name in self.mtllora_A:  # computed before the record changes: a failure here leaves both as they were
                self.get_base_layer().weight.data -= self.get_delta_weight(name, self.merged_tasks[name])
            self.merged_adapters.pop()
            self.merged_tasks.pop(name)


class Linear(nn.Module, MTLLoraLayer):
    """An ``nn.Linear`` or GPT-2 ``Conv1D`` with MTL-LoRA adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config) -> None:
        super().__init__()
        MTLLoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        batch_size = x.shape[0]
        routing = current_routing()
        # the adapter the call started with (a set_adapter during a generate, from a LogitsProcessor or another
        # thread, must not change the call in flight); the active ones where the routing names none
        named = routing is not None and routing.enabled and routing.adapter is not None
        names = [routing.adapter] if named else self.active_adapters
        for name in names:
            if name not in self.mtllora_A:
                continue
            down = self.mtllora_A[name]
            task_ids = self._routed_task_ids(name, batch_size, down.device)
            x_in = self._cast_input_dtype(self.mtllora_dropout[name](x), down.dtype)
            delta = self.delta(name, x_in.reshape(batch_size, -1, self.in_features), task_ids)  # (B, n, out)
            result = result + delta.reshape(result.shape).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "mtllora." + super().__repr__()


def _concat(blocks: nn.ParameterList) -> torch.Tensor:
    return blocks[0] if len(blocks) == 1 else torch.cat(list(blocks), dim=0)
