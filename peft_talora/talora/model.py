"""``TALoraModel``: the PEFT tuner that adds TA-LoRA to any transformers causal LM.

Per call, the shared :class:`~peft_talora.multitask.routing.TaskRouter` turns ``task_ids`` into the
call's routing, which travels with the call's keyword arguments down to every attention call.
There, inside its own forward, each adapted layer forms the prompts of the tasks present in the
batch (the shared prompt plus a rank-1 update per task), projects them to prefix keys/values
through its own frozen attention, and gives each example its task's prefix
(:meth:`~peft_talora.talora.attention.AttentionSite.prefix`). Inside a ``generate`` call each layer
computes its prefix once, at the first forward, and reuses it at every decoding step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from ..multitask import MultiTaskTunerMixin, check_saved_shape, text_config
from ..multitask.routing import CallRouting, TaskRouter, refuse_adapted_base
from ..multitask.task_ids import TaskIds
from .attention import AttentionSite, PrefixSource, execution_device, install_sites, remove_site
from .config import TALoraConfig
from .layer import TALoraPromptBank

#: Training stages (see ``set_training_stage``): the shared ones plus the shared warm-up, where the task part
#: is off and only the shared prompt and the gates train (every example gets the shared prompt).
STAGES = ("shared_warmup", *MultiTaskTunerMixin.STAGES)


class TALoraModel(MultiTaskTunerMixin, nn.Module):
    """Adds one or more named TA-LoRA adapters to a causal LM; one is active at a time.

    ``model`` is a transformers ``PreTrainedModel``; ``peft_config`` maps adapter names to
    :class:`TALoraConfig`. Banks of parameters live in ``talora_banks[adapter_name]``.
    """

    prefix = "talora_"
    STAGES = STAGES
    routes_task_ids = True  # read by peft_patches.route_task_ids_through_peft_forward
    model_card_tags = ("ta-lora", "multi-task", "peft-talora")

    def __init__(self, model: nn.Module, peft_config: dict, adapter_name: str, low_cpu_mem_usage: bool = False):
        refuse_adapted_base(model)
        super().__init__()
        self.model = model
        self.peft_config: dict[str, TALoraConfig] = {}
        self.talora_banks = nn.ModuleDict()
        self.active_adapter: str = adapter_name
        self._enabled = True
        self._layer_positions: dict[str, dict[int, int]] = {}  # adapter -> {decoder layer: row in its bank}
        self._stages: dict[str, str] = {}  # adapter name -> training stage; "multi_task" when absent
        self._frozen_blocks: dict[str, int] = {}  # adapter -> leading task blocks frozen in the "new_tasks" stage
        self.orthogonality_log = RunningMean()  # read by OrthogonalityLogCallback

        text = text_config(model)
        self._num_layers = text.num_hidden_layers
        self._hidden_size = text.hidden_size
        config = peft_config[adapter_name]
        config.resolve_layers(self._num_layers)  # fail on bad layers before touching the model
        trainable = [p for p in model.parameters() if p.requires_grad]
        self._sites: list[AttentionSite] = install_sites(model, self._num_layers)
        try:
            self._router = TaskRouter(model, self)
        except Exception:
            self.unload()
            raise
        try:
            model.requires_grad_(False)
            self.peft_config[adapter_name] = config
            self.inject_adapter(model, adapter_name)
            self.set_adapter(adapter_name, inference_mode=config.inference_mode)
        except Exception:  # leave the user's model as it was
            self.unload()
            for param in trainable:
                param.requires_grad_(True)
            raise

    # ----------------------------------------------------------------- adapters
    def inject_adapter(self, model: nn.Module, adapter_name: str, low_cpu_mem_usage: bool = False, **kwargs) -> None:
        """Create the parameter bank of ``self.peft_config[adapter_name]`` (frozen until activated)."""
        config = self.peft_config[adapter_name]
        layers = config.resolve_layers(self._num_layers)
        heads = {self._sites[i].num_heads for i in layers}
        if len(heads) != 1:
            raise ValueError(f"TA-LoRA needs the same number of heads in every adapted layer, found {sorted(heads)}.")
        bank = TALoraPromptBank(
            num_layers=len(layers),
            num_tasks=config.num_tasks,
            num_virtual_tokens=config.num_virtual_tokens,
            hidden_size=self._hidden_size,
            r=config.r,
            num_heads=heads.pop(),
            scaling=config.scaling,
            prompt_init_std=config.prompt_init_std,
        ).to(execution_device(model))
        bank.requires_grad_(False)
        self.talora_banks[adapter_name] = bank
        self._layer_positions[adapter_name] = {layer: i for i, layer in enumerate(layers)}

    def add_adapter(self, adapter_name: str, config: TALoraConfig) -> None:
        """Add a new, inactive and frozen adapter (called by ``PeftModel.add_adapter``)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; pick another name or delete it first.")
        self.peft_config[adapter_name] = config
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise

    @contextmanager
    def _temporarily_active(self, adapter_name: str):
        """All banks always live in the model, so loading needs no swapping (PeftModel.load_adapter)."""
        yield

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter in self.peft_config else []

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter; it is trainable unless ``inference_mode``."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {list(self.peft_config)}.")
        self.active_adapter = adapter_name
        for bank in self.talora_banks.values():
            bank.requires_grad_(False)
        if not inference_mode:
            self._apply_stage(adapter_name)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if requires_grad:
                self._apply_stage(name)
            else:
                self.talora_banks[name].requires_grad_(False)

    # ----------------------------------------------------------------- stages and tasks (hooks of the mixin)
    @property
    def _active_name(self) -> Optional[str]:
        return self.active_adapter if self.active_adapter in self.peft_config else None

    def _task_block_sizes(self, adapter_name: str) -> list[int]:
        return [block.shape[1] for block in self.talora_banks[adapter_name].task_u_blocks]

    def _add_task_block(self, adapter_name: str, count: int) -> None:
        """New tasks' factors and gate scales; no existing task's output changes.

        Their gate scale ``c`` follows ``new_task_start``: 0 (``"base"``, the new tasks' output is
        the base model's) or 1 (``"shared_prompt"``, it is the shared prompt's).
        """
        start = self.peft_config[adapter_name].new_task_start
        self.talora_banks[adapter_name].add_task_block(count, gate_scale=0.0 if start == "base" else 1.0)

    def _copy_task_factors(self, adapter_name: str, sources: list[int]) -> None:
        """The tasks of the last block take the ``u, v, c`` of tasks ``sources`` (one per task)."""
        self.talora_banks[adapter_name].copy_into_last_block(sources)

    def _refresh_trainability(self, adapter_name: str) -> None:
        if not self.peft_config[adapter_name].inference_mode and adapter_name == self.active_adapter:
            self._apply_stage(adapter_name)
        else:  # an adapter that is not in use trains nothing (add_tasks creates its new block trainable)
            self.talora_banks[adapter_name].requires_grad_(False)

    def _apply_stage(self, adapter_name: str) -> None:
        """``shared_warmup``: only the shared prompt and the gates train (every example gets the shared
        prompt; ``task_ids`` are optional). ``multi_task``: everything. ``new_tasks``: the task blocks
        added since the stage began.

        The gate scales ``c`` of the first block (the tasks the adapter was created or loaded with) never
        train: those tasks learn through the shared gate ``g`` from ``g = 0``, as in the paper, and a
        per-task scale on top only duplicates it (on the DPO toy of tests/test_trl.py, training it slowed
        learning: loss 0.52 against 0.41 after 12 steps). The ``c`` of added tasks trains with their factors,
        which a task that starts at ``c = 0`` needs.
        """
        bank = self.talora_banks[adapter_name]
        stage = self.training_stage(adapter_name)
        bank.requires_grad_(stage == "multi_task")
        bank.task_gate_blocks[0].requires_grad_(False)
        if stage == "shared_warmup":
            bank.shared_prompt.requires_grad_(True)
            bank.gate.requires_grad_(True)
        elif stage == "new_tasks":  # earlier blocks stay bit-identical
            frozen = self._frozen_blocks.get(adapter_name, len(bank.task_u_blocks) - 1)
            for blocks in (bank.task_u_blocks, bank.task_v_blocks, bank.task_gate_blocks):
                for block in blocks[frozen:]:
                    block.requires_grad_(True)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {list(self.peft_config)}.")
        del self.peft_config[adapter_name]
        del self.talora_banks[adapter_name]
        del self._layer_positions[adapter_name]
        self._forget_adapter(adapter_name)
        if adapter_name == self.active_adapter:
            successor = next(iter(self.peft_config), None)
            self.active_adapter = successor
            if successor is not None:  # as PEFT does for its tuners: the adapter that takes over can train
                self.set_adapter(successor, inference_mode=self.peft_config[successor].inference_mode)

    def enable_adapter_layers(self) -> None:
        self._enabled = True

    def disable_adapter_layers(self) -> None:
        self._enabled = False

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Adapter weights on a half-precision base: float32 by default, as PEFT does for LoRA, or the
        base's dtype with ``autocast_adapter_dtype=False`` (``get_peft_model``, ``PeftModel.from_pretrained``)."""
        bank = self.talora_banks[adapter_name]
        half = (torch.float16, torch.bfloat16)
        if autocast_adapter_dtype:
            if bank.shared_prompt.dtype in half:
                bank.float()
            return
        base_dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        if base_dtype in half:
            bank.to(base_dtype)

    def unload(self) -> nn.Module:
        """Remove TA-LoRA from the model and return the untouched base model."""
        self._router.remove()
        for site in self._sites:
            remove_site(site)
        self._sites = []
        return self.model

    # ----------------------------------------------------------------- routing
    @property
    def active_bank(self) -> Optional[TALoraPromptBank]:
        """The bank used by the next call, or ``None`` when adapters are disabled."""
        if not self._enabled or self.active_adapter not in self.talora_banks:
            return None
        return self.talora_banks[self.active_adapter]

    def resolve_task_ids(self, task_ids: TaskIds, batch_size: int, device=None) -> torch.Tensor:
        """Validate ``task_ids`` against the active adapter's tasks; see :func:`routing.resolve_task_ids`.

        In the shared warm-up stage the task part is off, so ``task_ids`` may be omitted.
        """
        if task_ids is None and self.training_stage() == "shared_warmup":
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        return super().resolve_task_ids(task_ids, batch_size, device)

    def routing_for_call(
        self, task_ids: TaskIds, batch_size: int, device=None, cache: Optional[dict] = None
    ) -> CallRouting:
        """The routing of one call: validated ``task_ids`` ``(batch_size,)`` and the active adapter's bank.

        Everything the layers need is taken now, at the start of the call, so a later change (another
        call, ``disable_adapter``, a stage switch) cannot change what this call's backward sees.
        """
        bank = self.active_bank
        if bank is None:
            return CallRouting(None)
        resolved = self.resolve_task_ids(task_ids, batch_size, device)
        self._warn_if_nothing_trains(self.active_adapter, resolved)
        source = PrefixSource(
            bank=bank,
            rows=self._layer_positions[self.active_adapter],
            shared_only=self.training_stage() == "shared_warmup",
        )
        return CallRouting(resolved, adapter=source, cache=cache)

    # ----------------------------------------------------------------- calls
    def _after_forward(self, output, kwargs: dict):
        """In training, add the orthogonality penalty to the loss (once per optimizer step, see ``_share_of_items``)."""
        if getattr(output, "loss", None) is not None:
            term = self.orthogonality_term(kwargs.get("labels"), kwargs.get("num_items_in_batch"))
            if term is not None:
                output.loss = output.loss + term
        return output

    def orthogonality_term(self, labels=None, num_items_in_batch=None) -> Optional[torch.Tensor]:
        """``lambda * share * R`` of the active adapter in training, logged (``None`` when off or in eval).

        Added to the model's own loss by ``forward``; a trainer that computes the loss itself from the
        logits (label smoothing, ``compute_loss_func``) adds it with this. ``share``: see ``_share_of_items``.
        """
        bank = self.active_bank
        weight = self.peft_config[self.active_adapter].orthogonality_weight if bank is not None else 0.0
        if not (self.training and weight > 0):
            return None
        penalty = bank.orthogonality_penalty()
        if not torch.isfinite(penalty):
            raise FloatingPointError(
                f"The orthogonality penalty of adapter {self.active_adapter!r} is {float(penalty)}: some task "
                "factors (task_u/task_v) hold NaN or inf, which would spread to every task through the loss. "
                "Lower the learning rate or restore the adapter from a checkpoint."
            )
        if torch.is_grad_enabled():  # not a no-grad pass such as DPO's reference adapter: it trains nothing
            self.orthogonality_log.add(penalty.detach())
        return weight * _share_of_items(labels, num_items_in_batch) * penalty

    def merge_and_unload(self, *args, **kwargs):
        raise NotImplementedError(_NO_MERGE)

    def merge_adapter(self, *args, **kwargs):
        raise NotImplementedError(_NO_MERGE)

    def __getattr__(self, name: str):
        """Forward missing attributes to the wrapped model, as PEFT tuners do."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ------------------------------------------------- PEFT state-dict extension points
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The adapter's tensors with the task blocks joined into ``task_u``/``task_v``/``task_gate`` (only the
        exported tasks)."""
        marker = f"talora_banks.{adapter_name}."
        own = {k: v for k, v in state_dict.items() if marker in k}
        exported = getattr(model.base_model, "_exported_tasks", {}).get(adapter_name)
        result = {k: v for k, v in own.items() if k.split(marker, 1)[1].split(".", 1)[0] not in _TASK_BLOCKS}
        for factor, saved_name in _TASK_BLOCKS.items():
            blocks = _block_keys(own, f"{marker}{factor}.")
            if not blocks:
                continue
            joined = torch.cat([own[k] for k in blocks], dim=1)  # (L, T, r | d) or (L, T)
            if exported is not None:
                joined = joined[:, exported]
            result[blocks[0].split(marker)[0] + marker + saved_name] = joined.contiguous()
        return result

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key.replace(f"talora_banks.{adapter_name}.", "talora_banks.", 1)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Saved keys to this model's keys, splitting ``task_u``/``task_v``/``task_gate`` into the live task blocks.

        A file without ``task_gate`` (saved before per-task gate scales existed) loads with ``c = 1`` for
        every task: exactly what that adapter computed.
        """
        marker = f"talora_banks.{adapter_name}."
        live = {k: p for k, p in model.state_dict().items() if marker in k}
        remapped = {}
        for key, tensor in state_dict.items():
            key = key.replace("talora_banks.", marker, 1)
            stem, _, name = key.rpartition(".")
            block_factor = next((f for f, saved in _TASK_BLOCKS.items() if saved == name), None)
            if block_factor is None:
                _check_saved_shape(key, tensor, live, config)
                remapped[key] = tensor
                continue
            blocks = _block_keys(live, f"{stem}.{block_factor}.")
            first = live[blocks[0]].shape
            expected = (first[0], sum(live[k].shape[1] for k in blocks), *first[2:])
            _check_saved_shape(key, tensor, {key: torch.empty(expected, device="meta")}, config)
            sizes = [live[k].shape[1] for k in blocks]
            remapped.update(zip(blocks, torch.split(tensor, sizes, dim=1)))
        for key in _block_keys(live, f"{marker}task_gate_blocks."):
            remapped.setdefault(key, torch.ones_like(live[key], device="cpu"))
        missing = sorted({k.split(marker, 1)[1].split(".", 1)[0] for k in set(live) - set(remapped)})
        if missing:
            names = [_TASK_BLOCKS.get(m, m) for m in missing]
            raise ValueError(f"The TA-LoRA adapter file lacks {names}; it is incomplete or corrupt.")
        return remapped


_NO_MERGE = (
    "TA-LoRA adds gated prefix attention, not a weight update, so it cannot be merged into the base weights. "
    "Keep the PEFT model for inference (generation costs about what the base model costs), or call unload() "
    "to get the untouched base model back."
)

#: Task-factor blocks in the model and the single tensor each is saved as.
_TASK_BLOCKS = {"task_u_blocks": "task_u", "task_v_blocks": "task_v", "task_gate_blocks": "task_gate"}


def _block_keys(keys, prefix: str) -> list[str]:
    """The keys holding ``prefix`` (``...task_u_blocks.``), in block order ``0, 1, ...``."""
    return sorted((k for k in keys if prefix in k), key=lambda k: int(k.rsplit(".", 1)[-1]))


#: For each saved tensor, the config field (or base-model property) behind each dimension.
_SHAPE_MEANING = {
    "shared_prompt": ("adapted layers (adapter_layers)", "num_virtual_tokens", "hidden size of the base model"),
    "shared_basis": ("adapted layers (adapter_layers)", "num_virtual_tokens", "r"),
    "task_u": ("adapted layers (adapter_layers)", "tasks (num_tasks / task_names)", "r"),
    "task_v": ("adapted layers (adapter_layers)", "tasks (num_tasks / task_names)", "hidden size of the base model"),
    "task_gate": ("adapted layers (adapter_layers)", "tasks (num_tasks / task_names)"),
    "gate": ("adapted layers (adapter_layers)", "attention heads of the base model"),
}


def _check_saved_shape(key: str, tensor: torch.Tensor, live: dict, config) -> None:
    name = key.rsplit(".", 1)[-1]
    if key not in live:
        raise ValueError(
            f"The TA-LoRA adapter file has a tensor {name!r} that this model has no place for; "
            "it was not saved from a TA-LoRA adapter of this package."
        )
    check_saved_shape("TA-LoRA", name, tensor.shape, live[key].shape, _SHAPE_MEANING.get(name, ()), config)


class RunningMean:
    """Mean of the values added since the last ``pop`` (the orthogonality penalty between Trainer logs).

    Values are summed as tensors, so a training step never waits for the device; only ``pop``
    (once per log) reads the number.
    """

    def __init__(self):
        self.total, self.count = None, 0

    def add(self, value: torch.Tensor) -> None:
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def pop(self) -> Optional[float]:
        mean = float(self.total) / self.count if self.count else None
        self.total, self.count = None, 0
        return mean


def _share_of_items(labels: Optional[torch.Tensor], num_items_in_batch) -> float | torch.Tensor:
    """This micro-batch's share of the target tokens of one optimizer step (1 outside ``Trainer``).

    ``Trainer`` normalises the loss by ``num_items_in_batch``, the target tokens of all gradient
    accumulation steps (and, with ``average_tokens_across_devices``, of all processes, then
    multiplies by the process count). Weighting the penalty by each micro-batch's share of those
    tokens makes it count exactly once per optimizer step, whatever the accumulation or the number
    of processes.
    """
    if labels is None or num_items_in_batch is None:
        return 1.0
    return (labels[..., 1:] != -100).sum() / num_items_in_batch
