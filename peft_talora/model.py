"""``TALoraModel``: the PEFT tuner that adds TA-LoRA to any transformers causal LM.

Per call, a forward pre-hook on the wrapped model takes ``task_ids``, builds the prompts of the
tasks present in the batch for every adapted layer at once, projects them to prefix keys/values
through each layer's own frozen attention, and hands each example its task's prefix. Inside a
``generate`` call the prefixes are computed once, at the first forward, and reused at every
decoding step.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from .attention import AttentionSite, install_sites, remove_site
from .config import TALoraConfig
from .layer import TALoraPromptBank
from .peft_integration import ROUTED_TASK_IDS_KWARG
from .routing import TaskIds, resolve_task_ids


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class TALoraModel(nn.Module):
    """Adds one or more named TA-LoRA adapters to a causal LM; one is active at a time.

    ``model`` is a transformers ``PreTrainedModel``; ``peft_config`` maps adapter names to
    :class:`TALoraConfig`. Banks of parameters live in ``talora_banks[adapter_name]``.
    """

    prefix = "talora_"
    routes_task_ids = True  # read by peft_integration.route_task_ids_through_peft_forward

    def __init__(self, model: nn.Module, peft_config: dict, adapter_name: str, low_cpu_mem_usage: bool = False):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, TALoraConfig] = {}
        self.talora_banks = nn.ModuleDict()
        self.active_adapter: str = adapter_name
        self._enabled = True
        self._generation: Optional[_GenerationRouting] = None  # set during a generate call
        self.orthogonality_log = RunningMean()  # read by OrthogonalityLogCallback

        text_config = _text_config(model)
        self._num_layers = text_config.num_hidden_layers
        self._hidden_size = text_config.hidden_size
        config = peft_config[adapter_name]
        config.resolve_layers(self._num_layers)  # fail on bad layers before touching the model
        trainable = [p for p in model.parameters() if p.requires_grad]
        self._sites: list[AttentionSite] = install_sites(model, self._num_layers)
        self._hook = model.register_forward_pre_hook(self._route_pre_hook, with_kwargs=True)
        _declare_task_ids_parameter(model)
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
        reference = next(model.parameters())
        bank = TALoraPromptBank(
            num_layers=len(layers),
            num_tasks=config.num_tasks,
            num_virtual_tokens=config.num_virtual_tokens,
            hidden_size=self._hidden_size,
            r=config.r,
            num_heads=heads.pop(),
            scaling=config.scaling,
            prompt_init_std=config.prompt_init_std,
        ).to(reference.device)
        bank.requires_grad_(False)
        self.talora_banks[adapter_name] = bank

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
        for name, bank in self.talora_banks.items():
            bank.requires_grad_(name == adapter_name and not inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self.talora_banks[name].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {list(self.peft_config)}.")
        del self.peft_config[adapter_name]
        del self.talora_banks[adapter_name]
        if adapter_name == self.active_adapter:
            self.active_adapter = next(iter(self.peft_config), None)

    def enable_adapter_layers(self) -> None:
        self._enabled = True

    def disable_adapter_layers(self) -> None:
        self._enabled = False

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Keep adapter weights in float32 when the base is half precision, as PEFT does for LoRA."""
        bank = self.talora_banks[adapter_name]
        if autocast_adapter_dtype and bank.shared_prompt.dtype in (torch.float16, torch.bfloat16):
            bank.float()

    def unload(self) -> nn.Module:
        """Remove TA-LoRA from the model and return the untouched base model."""
        self._hook.remove()
        if getattr(self.model.__dict__.get("forward"), "_talora_declares_task_ids", False):
            del self.model.forward
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
        """Validate ``task_ids`` against the active adapter's tasks; see :func:`routing.resolve_task_ids`."""
        config = self.peft_config[self.active_adapter]
        return resolve_task_ids(
            task_ids, batch_size=batch_size, num_tasks=config.num_tasks, task_names=config.task_names, device=device
        )

    def _route_pre_hook(self, module, args, kwargs):
        """Forward pre-hook of the wrapped model: take ``task_ids`` and set every site's prefix for this call."""
        task_ids = kwargs.pop("task_ids", None)
        bank = self.active_bank
        if bank is None:
            for site in self._sites:
                site.clear_prefix()
            return args, kwargs
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        batch_size = inputs.shape[0]
        generation = self._generation
        if task_ids is None and generation is not None:
            if generation.prefix_batch_size == batch_size:
                return args, kwargs  # a decoding step: this generate call's prefixes are already set
            task_ids = generation.expand_to(batch_size)
            generation.prefix_batch_size = batch_size
        else:
            task_ids = self.resolve_task_ids(task_ids, batch_size, device=inputs.device)
        self._set_prefixes(bank, task_ids)
        return args, kwargs

    def _set_prefixes(self, bank: TALoraPromptBank, task_ids: torch.Tensor) -> None:
        """Compute the prefix keys/values of the tasks in ``task_ids`` ``(B,)`` and give each example its own."""
        config = self.peft_config[self.active_adapter]
        tasks, inverse = torch.unique(task_ids, return_inverse=True)
        prompts = bank.task_prompts(tasks)  # (L, U, n, d)
        adapted = config.resolve_layers(self._num_layers)
        position = {layer: i for i, layer in enumerate(adapted)}
        for site in self._sites:
            if site.layer not in position:
                site.clear_prefix()
                continue
            i = position[site.layer]
            dtype = _module_dtype(site.module, prompts.dtype)
            key, value = site.project_prefix(prompts[i].to(dtype))  # (U, H_kv, n, hd)
            site.set_prefix(key[inverse], value[inverse], bank.gate[i])

    # ----------------------------------------------------------------- calls
    def forward(self, *args, task_ids: TaskIds = None, **kwargs):
        routed = kwargs.pop(ROUTED_TASK_IDS_KWARG, None)
        task_ids = routed if task_ids is None else task_ids
        if task_ids is not None:
            kwargs["task_ids"] = task_ids
        output = self.model(*args, **kwargs)
        bank = self.active_bank
        weight = self.peft_config[self.active_adapter].orthogonality_weight if bank is not None else 0.0
        if self.training and weight > 0 and getattr(output, "loss", None) is not None:
            penalty = bank.orthogonality_penalty()
            output.loss = output.loss + weight * penalty
            self.orthogonality_log.add(penalty.detach())
        return output

    def generate(self, *args, task_ids: TaskIds = None, **kwargs):
        """``model.generate`` with per-example tasks; ``task_ids`` expand with beams and return sequences."""
        if self.active_bank is None:
            return self.model.generate(*args, **kwargs)
        inputs = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs_embeds"))
        task_ids = self.resolve_task_ids(task_ids, inputs.shape[0], device=inputs.device)
        self._generation = _GenerationRouting(task_ids)
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self._generation = None

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
        marker = f"talora_banks.{adapter_name}."
        return {k: v for k, v in state_dict.items() if marker in k}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key.replace(f"talora_banks.{adapter_name}.", "talora_banks.", 1)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = {k.replace("talora_banks.", f"talora_banks.{adapter_name}.", 1): v for k, v in state_dict.items()}
        expected = {k: p for k, p in model.state_dict().items() if f"talora_banks.{adapter_name}." in k}
        for key, tensor in remapped.items():
            if key not in expected:
                raise ValueError(
                    f"The TA-LoRA adapter file has a tensor {key!r} that this model has no place for; "
                    "it was not saved from a TA-LoRA adapter of this package version."
                )
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"TA-LoRA adapter does not fit this base model: {key.rsplit('.', 1)[-1]} has shape "
                    f"{tuple(tensor.shape)} in the adapter but {tuple(expected[key].shape)} here "
                    "(layers, virtual tokens / tasks, hidden size / rank / heads). Load it onto the base model it was "
                    f"trained on ({config.base_model_name_or_path or 'see adapter_config.json'})."
                )
        missing = sorted(k.rsplit(".", 1)[-1] for k in set(expected) - set(remapped))
        if missing:
            raise ValueError(f"The TA-LoRA adapter file lacks {missing}; it is incomplete or corrupt.")
        return remapped


def _declare_task_ids_parameter(model: nn.Module) -> None:
    """Give the wrapped model's ``forward`` a visible ``task_ids`` parameter.

    The pre-hook removes ``task_ids`` before ``forward`` runs, but two callers decide by signature
    which inputs a model takes: ``Trainer(remove_unused_columns=True)`` (which inspects the *base*
    model of a PEFT model) and ``generate``'s check of model kwargs. Only the signature changes.
    """
    forward = model.forward

    @functools.wraps(forward)
    def forward_with_task_ids(*args, **kwargs):
        return forward(*args, **kwargs)

    signature = inspect.signature(forward)
    parameters = list(signature.parameters.values())
    position = next((i for i, p in enumerate(parameters) if p.kind is p.VAR_KEYWORD), len(parameters))
    parameters.insert(position, inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None))
    forward_with_task_ids.__signature__ = signature.replace(parameters=parameters)
    forward_with_task_ids._talora_declares_task_ids = True
    model.forward = forward_with_task_ids


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


class _GenerationRouting:
    """Task ids of one ``generate`` call, and the batch size its prefixes were last computed for.

    transformers expands every per-example input with ``repeat_interleave`` for beams and
    ``num_return_sequences``; the task ids are expanded the same way when the batch grows.
    """

    def __init__(self, task_ids: torch.Tensor):
        self.task_ids = task_ids
        self.prefix_batch_size: Optional[int] = None

    def expand_to(self, batch_size: int) -> torch.Tensor:
        given = self.task_ids.shape[0]
        if batch_size % given:
            raise ValueError(
                f"generate ran a batch of {batch_size} rows for {given} task ids; task ids can only follow an "
                "expansion of each example into equal groups (beams, num_return_sequences)."
            )
        return self.task_ids.repeat_interleave(batch_size // given)


def _module_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return default
