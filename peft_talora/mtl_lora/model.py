"""``MTLLoraModel``: MTL-LoRA as a PEFT ``BaseTuner``, routed by ``task_ids`` like TA-LoRA.

``BaseTuner`` gives target-module matching (names, regex, ``"all-linear"``, ``layers_to_transform``),
module replacement, ``disable_adapter``, adapter add/set/delete and unloading; this class adds what
is multi-task: the shared :class:`~peft_talora.multitask.routing.TaskRouter` puts each call's resolved
``task_ids`` ``(B,)`` into the call's routing, which each decoder layer makes current for the
MTL-LoRA layers inside it (:func:`~peft_talora.multitask.routing.install_routing_scopes`), ``add_tasks`` (new
per-task blocks), ``merge_and_unload(task=...)`` and the per-task state-dict layout (blocks
concatenated on save, only exported tasks kept, split again on load).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ..multitask import MultiTaskTunerMixin, check_saved_shape, text_config
from ..multitask.routing import (
    CallRouting,
    TaskRouter,
    install_routing_scopes,
    refuse_adapted_base,
    remove_routing_scopes,
)
from ..multitask.task_ids import TaskIds
from .config import MTLLoraConfig
from .layer import Linear, MTLLoraLayer

#: Training stages (see ``set_training_stage``): the shared ones.
STAGES = MultiTaskTunerMixin.STAGES

#: Default ``target_modules`` per ``model_type``: LoRA's (attention q/v), plus fused/missing families.
TARGET_MODULES = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    "phi3": ["qkv_proj"],
    "olmo2": ["q_proj", "v_proj"],
}

#: Per-task tensors: saved as one ``(T, ...)`` tensor, held as one block per ``add_tasks`` call.
TASK_TENSORS = ("mtllora_lambda", "mtllora_logits")

#: For each saved tensor, the config field (or base-layer property) behind each dimension.
_SHAPE_MEANING = {
    "mtllora_A": ("r", "input features of the adapted layer"),
    "mtllora_B": ("num_up_projections", "output features of the adapted layer", "r"),
    "mtllora_lambda": ("tasks (num_tasks / task_names)", "r", "r"),
    "mtllora_logits": ("tasks (num_tasks / task_names)", "num_up_projections"),
}


class MTLLoraModel(MultiTaskTunerMixin, BaseTuner):
    """Adds MTL-LoRA adapters (``peft_config``: adapter name -> :class:`MTLLoraConfig`) to a model.

    One adapter is active at a time; every call routes each example to its task by ``task_ids``.
    """

    prefix = "mtllora_"
    tuner_layer_cls = MTLLoraLayer
    target_module_mapping = TARGET_MODULES
    uses_shared_state = True  # layers read the routing the tuner's hooks make current; inject_adapter_in_model cannot
    routes_task_ids = True  # read by peft_integration.route_task_ids_through_peft_forward
    model_card_tags = ("mtl-lora", "multi-task", "peft-talora")

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, low_cpu_mem_usage: bool = False, **kwargs):
        refuse_adapted_base(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        try:
            super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
            self._router = TaskRouter(model, self)
        except Exception:  # leave the user's model as it was
            _unwrap_layers(model)
            model.__dict__.pop("peft_config", None)
            for param in trainable:
                param.requires_grad_(True)
            raise
        self._scopes = install_routing_scopes(model)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        self._check_layers_to_transform(model, self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _check_layers_to_transform(self, model: nn.Module, config: MTLLoraConfig) -> None:
        """Refuse, before anything changes, indices of ``layers_to_transform`` where no target module is: PEFT's
        matching adapts the layers that exist and skips the others without a word (it only fails when none match)."""
        layers = config.layers_to_transform
        if layers is None:
            return
        from peft.tuners.tuners_utils import check_target_module_exists

        prepared = self._prepare_adapter_config(copy.deepcopy(config), self.get_model_config(model))
        keys = [name for name, _ in model.named_modules()]

        def adapted(layer: int) -> bool:
            probe = copy.copy(prepared)
            probe.layers_to_transform = [layer]
            return any(check_target_module_exists(probe, key) for key in keys)

        missing = [layer for layer in ([layers] if isinstance(layers, int) else layers) if not adapted(layer)]
        if missing:
            count = getattr(text_config(model), "num_hidden_layers", None)
            has = f" (it has {count} decoder layers: 0..{count - 1})" if count else ""
            raise ValueError(
                f"MTLLoraConfig.layers_to_transform names layer(s) {missing}, where this {type(model).__name__} has no "
                f"target module {sorted(prepared.target_modules)}{has}; use layer indices that exist."
            )

    def _pre_injection_hook(self, model: nn.Module, config: MTLLoraConfig, adapter_name: str) -> None:
        """Tuner state; ``BaseTuner.__init__`` calls this once, after ``nn.Module.__init__`` and before injecting."""
        self._enabled = True
        self._stages: dict[str, str] = {}  # adapter name -> training stage; "multi_task" when absent
        self._frozen_blocks: dict[str, int] = {}  # adapter -> leading task blocks frozen in the "new_tasks" stage
        self._merged_tasks: dict[str, int] = {}  # adapter name -> task merged by merge_adapter

    # ----------------------------------------------------------------- injection
    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key=None, **kwargs):
        if isinstance(target, MTLLoraLayer):
            target.update_layer(adapter_name, config, inference_mode=config.inference_mode)
            return
        new_module = Linear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)

    def _layers(self, adapter_name: Optional[str] = None) -> list[MTLLoraLayer]:
        return [
            m
            for m in self.model.modules()
            if isinstance(m, MTLLoraLayer) and (adapter_name is None or adapter_name in m.mtllora_A)
        ]

    @property
    def _active_name(self) -> Optional[str]:
        active = self.active_adapters
        return active[0] if active else None

    # ----------------------------------------------------------------- adapters
    def set_adapter(self, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter (one at a time: each routes its own task list)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) > 1:
            raise ValueError(f"MTL-LoRA routes tasks through one adapter at a time; pass one name, not {names}.")
        for name in names:
            self._check_adapter(name)
        super().set_adapter(names[0] if names else [], inference_mode=inference_mode)
        if not any(layer.merged for layer in self._layers()):  # PEFT unmerges a merged model here
            self._merged_tasks.clear()
        if names and not inference_mode:  # PEFT made every part of it trainable: the stage decides again
            self._refresh_trainability(names[0])

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._forget_adapter(adapter_name)
        active = self.active_adapters
        self.active_adapter = active[0] if active else []  # PEFT's layers pick the next adapter, if any

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        if not enabled and self._merged_tasks:
            self.unmerge_adapter()  # the base model is the unmerged weights
        super()._enable_adapter_layers(enabled)
        self._enabled = enabled
        if enabled:  # PEFT's layers make the active adapter trainable again; respect inference mode and stage
            for name in self.active_adapters:
                self._refresh_trainability(name)

    def _refresh_trainability(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        trainable = self._enabled and adapter_name in self.active_adapters and not config.inference_mode
        self.set_requires_grad(adapter_name, trainable)  # the layers keep a stage's frozen parts frozen
        if self.training_stage(adapter_name) == "new_tasks":  # modules_to_save copies are shared by every task
            from peft.utils.other import AuxiliaryTrainingWrapper

            for module in self.model.modules():
                if isinstance(module, AuxiliaryTrainingWrapper):
                    for name, param in module.named_parameters():
                        if f".{adapter_name}." in f".{name}." and not name.startswith("original_module"):
                            param.requires_grad_(False)

    # ----------------------------------------------------------------- stages and tasks (hooks of the mixin)
    def _task_block_sizes(self, adapter_name: str) -> list[int]:
        layers = self._layers(adapter_name)
        config = self.peft_config[adapter_name]
        return [block.shape[0] for block in layers[0].mtllora_lambda[adapter_name]] if layers else [config.num_tasks]

    def _add_task_block(self, adapter_name: str, count: int) -> None:
        """Each new task gets ``Lambda = I`` and fresh mixing logits in its own block; no output changes."""
        for layer in self._layers(adapter_name):
            layer.add_task_block(adapter_name, count)

    def _copy_task_factors(self, adapter_name: str, sources: list[int]) -> None:
        """The tasks of the last block take the ``Lambda`` and mixing logits of tasks ``sources`` (one per task)."""
        for layer in self._layers(adapter_name):
            layer.copy_into_last_block(adapter_name, sources)

    def _apply_stage(self, adapter_name: str) -> None:
        """``multi_task``: everything trains. ``new_tasks``: ``A``, the ``B_i`` and the earlier task blocks
        stay frozen (the layers keep them frozen through PEFT's ``requires_grad`` changes)."""
        new_tasks = self.training_stage(adapter_name) == "new_tasks"
        frozen = self._frozen_blocks.get(adapter_name, 0) if new_tasks else 0
        for layer in self._layers(adapter_name):
            layer.frozen_task_blocks[adapter_name] = frozen
        self._refresh_trainability(adapter_name)

    # ----------------------------------------------------------------- routing
    def routing_for_call(
        self, task_ids: TaskIds, batch_size: int, device=None, cache: Optional[dict] = None
    ) -> CallRouting:
        """The routing of one call: validated ``task_ids`` ``(batch_size,)`` of the active adapter."""
        name = self._active_name
        if not self._enabled or name is None:
            return CallRouting(None)
        resolved = self.resolve_task_ids(task_ids, batch_size, device)
        self._warn_if_nothing_trains(name, resolved)
        merged = self._merged_tasks.get(name)
        if merged is not None and bool((resolved != merged).any()):
            label = self.peft_config[name].task_label(merged)
            raise ValueError(
                f"Task {label!r} is merged into the base weights, so the model serves only that task "
                f"(got task ids {resolved.tolist()}); call unmerge_adapter() to route other tasks."
            )
        return CallRouting(resolved, adapter=name, cache=cache)

    # ----------------------------------------------------------------- merging
    def _tasks_to_merge(self, adapter_names: Sequence[str], task: Union[int, str, None]) -> dict[str, int]:
        tasks = {}
        for name in adapter_names:
            config = self.peft_config[self._check_adapter(name)]
            if task is None:
                if config.num_tasks != 1:
                    labels = [config.task_label(i) for i in range(config.num_tasks)]
                    raise ValueError(
                        f"Adapter {name!r} has {config.num_tasks} tasks ({labels}) and a merged model serves one of "
                        "them: pass task=<id or name>, e.g. merge_and_unload(task=0)."
                    )
                tasks[name] = 0
                continue
            try:
                ids = config.resolve_task_list(task, f"merging adapter {name!r}")
            except ValueError as err:
                message = str(err)
                raise ValueError(message if "merging" in message else f"merging adapter {name!r}: {message}") from None
            if len(ids) != 1:
                raise ValueError(f"Merging adapter {name!r}: merge one task (got {task!r}).")
            tasks[name] = ids[0]
        return tasks

    def merge_adapter(
        self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False, task: Union[int, str, None] = None
    ) -> None:
        """Fold ``task`` (id or name) of the adapters into the base weights; the model then serves only that task."""
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        tasks = self._tasks_to_merge(names, task)  # raises before anything changes
        other = {
            name: self._merged_tasks[name] for name in tasks if self._merged_tasks.get(name, tasks[name]) != tasks[name]
        }
        if other:
            raise ValueError(
                f"Adapter(s) {sorted(other)} already have another task merged in ({other}); call unmerge_adapter() "
                "before merging another task."
            )
        self._check_merge_allowed()
        layers = list(self._layers())
        if safe_merge:  # every layer checked before any changes: a layer holding half a merge would serve other
            for layer in layers:  # tasks' calls, which the merge record would not refuse
                layer.check_merge_is_finite(layer._merge_plan(names, tasks))
        merged_before = [len(layer.merged_adapters) for layer in layers]
        try:
            for layer in layers:
                layer.merge(adapter_names=names, tasks=tasks)
        except BaseException:  # (out of memory ...) the layers merged so far are taken back
            for layer, count in zip(layers, merged_before):
                layer.unmerge(keep=count)
            raise
        self._merged_tasks.update(tasks)

    def unmerge_adapter(self) -> None:
        super().unmerge_adapter()
        self._merged_tasks.clear()

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
        task: Union[int, str, None] = None,
    ) -> nn.Module:
        """Return the base model with task ``task`` (id or name; optional for a single-task adapter) merged in.

        ``delta W = (lora_alpha / r) * sum_i softmax(w_t / tau)_i B_i Lambda_t A`` (transposed for Conv1D).
        """
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        self._tasks_to_merge(names, task)  # validate before anything changes
        if self._merged_tasks:
            self.unmerge_adapter()
        self.merge_adapter(names, safe_merge=safe_merge, task=task)
        return self._unload_and_optionally_merge(merge=False, progressbar=progressbar)

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None
    ):
        """PEFT's unloading (``unload``, ``merge_and_unload``), then the task router comes off the model too."""
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        self._router.remove()
        remove_routing_scopes(self.model, self._scopes)
        self._scopes = []
        return model

    # ------------------------------------------------- PEFT state-dict extension points
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection, with each layer's task blocks joined into one ``(T, ...)`` tensor (exported tasks only)."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        tuner = _tuner_of(model)
        exported = tuner._exported_tasks.get(adapter_name) if tuner is not None else None
        pattern = _block_key_pattern(adapter_name)
        result, blocks = {}, {}
        for key, tensor in selected.items():
            match = pattern.match(key)
            if match is None:
                result[key] = tensor
            else:
                blocks.setdefault(f"{match['stem']}.{adapter_name}", []).append((int(match["block"]), tensor))
        for key, parts in blocks.items():
            joined = torch.cat([tensor for _, tensor in sorted(parts, key=lambda part: part[0])], dim=0)
            if exported is not None:
                joined = joined[exported]
            result[key] = joined.contiguous()  # "<layer>.mtllora_lambda.<adapter>": saved as "<layer>.mtllora_lambda"
        return result

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Saved keys to this model's keys, splitting each ``(T, ...)`` task tensor into the live task blocks."""
        live = model.state_dict()
        pattern = _block_key_pattern(adapter_name)
        block_keys: dict[str, list[tuple[int, str]]] = {}  # checkpoint key -> [(block index, model key)]
        for key in live:
            match = pattern.match(key)
            if match is not None:
                for saved in {match["stem"], "base_model.model." + match["stem"]}:
                    block_keys.setdefault(saved, []).append((int(match["block"]), key))
        is_task_tensor = lambda key: key.rsplit(".", 1)[-1] in TASK_TENSORS  # noqa: E731
        remapped = super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, {k: v for k, v in state_dict.items() if not is_task_tensor(k)}
        )
        for key, tensor in state_dict.items():
            if not is_task_tensor(key):
                continue
            if key not in block_keys:
                raise ValueError(
                    f"The MTL-LoRA adapter file has a tensor {key!r} that this model has no place for; it was saved "
                    "with other target_modules or for another base model (see its adapter_config.json)."
                )
            targets = [model_key for _, model_key in sorted(block_keys[key])]
            sizes = [live[k].shape[0] for k in targets]
            expected = torch.empty((sum(sizes), *live[targets[0]].shape[1:]), device="meta")
            _check_saved_shape(key, tensor, expected, config)
            remapped.update(zip(targets, torch.split(tensor, sizes, dim=0)))
        own = re.compile(rf"\.mtllora_(?:A|B)\.{re.escape(adapter_name)}$|{pattern.pattern}")
        missing = sorted(k for k in live if own.search(k) and k not in remapped)
        if missing:
            raise ValueError(
                f"The MTL-LoRA adapter file lacks {len(missing)} tensor(s) of this model, e.g. {missing[0]!r}; "
                "it is incomplete or corrupt."
            )
        for key, tensor in remapped.items():
            if key in live and own.search(key):
                _check_saved_shape(key, tensor, live[key], config)
        return remapped


def _tuner_of(model) -> Optional[MTLLoraModel]:
    """The ``MTLLoraModel`` of a ``PeftModel`` (or the tuner itself)."""
    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, MTLLoraModel):
            return candidate
    return None


def _block_key_pattern(adapter_name: str) -> re.Pattern:
    """State-dict keys of task blocks: ``<layer>.mtllora_lambda.<adapter>.<block>`` (same for logits)."""
    names = "|".join(TASK_TENSORS)
    return re.compile(rf"^(?P<stem>.*\.(?:{names}))\.{re.escape(adapter_name)}\.(?P<block>\d+)$")


def _check_saved_shape(key: str, tensor: torch.Tensor, expected: torch.Tensor, config) -> None:
    name = next((part for part in key.split(".") if part in _SHAPE_MEANING), key.rsplit(".", 1)[-1])
    check_saved_shape(
        "MTL-LoRA", f"{name} of {key!r}", tensor.shape, expected.shape, _SHAPE_MEANING.get(name, ()), config
    )


def _unwrap_layers(model: nn.Module) -> None:
    """Put back the original modules of any MTL-LoRA layers (used to roll back a failed injection)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MTLLoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
