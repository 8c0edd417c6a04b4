"""One task of an MTL-LoRA adapter as a standard PEFT LoRA adapter, for servers that load plain LoRA.

For task ``t`` every MTL-LoRA layer adds ``s * U_t A x`` with ``A`` ``(r, in)``,
``U_t = sum_i softmax(w_t / tau)_i B_i Lambda_t`` ``(out, r)`` (``MTLLoraLayer.up_projection``) and
``s = lora_alpha / r``. That is a rank-``r`` LoRA update: ``lora_A = A``, ``lora_B = U_t`` and the
LoRA config's ``lora_alpha = s * r`` (LoRA scales by ``lora_alpha / r`` too), so the export is exact
up to float rounding. The files are what PEFT writes for a ``LoraConfig``: ``adapter_config.json``
(``peft_type: LORA``, no field of this package), ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` keys, and a ``README.md``. Plain
PEFT, vLLM, TGI and LoRAX load them without this package. Used by
``peft_model.save_pretrained(path, tasks=[t], as_lora=True)``.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from .layer import MTLLoraLayer
from .model import MTLLoraModel

#: PEFT's ``save_pretrained`` arguments this export honours; any other raises a ``TypeError``.
SUPPORTED_SAVE_ARGUMENTS = ("selected_adapters", "safe_serialization", "is_main_process")


def save_task_as_lora(
    peft_model,
    save_directory,
    tasks=None,
    *,
    selected_adapters=None,
    safe_serialization=True,
    is_main_process=True,
    **unsupported,
) -> None:
    """Write task ``tasks`` (one id or name) of each selected MTL-LoRA adapter as a plain PEFT LoRA adapter.

    Folders follow PEFT's layout: ``save_directory`` for the adapter ``"default"``,
    ``save_directory/<name>`` for others. Everything is checked before anything is written.
    """
    if unsupported:
        raise TypeError(
            f"save_pretrained(as_lora=True) got unsupported argument(s) {sorted(unsupported)}; it takes tasks= and "
            f"{', '.join(SUPPORTED_SAVE_ARGUMENTS)}."
        )
    tuner = peft_model.base_model
    if not isinstance(tuner, MTLLoraModel):
        raise TypeError(
            f"as_lora=True writes one task of an MTL-LoRA adapter as a LoRA adapter; this model's tuner is "
            f"{type(tuner).__name__}. TA-LoRA has no LoRA form (its tasks are attention prefixes): serve it with "
            "generate(task_ids=...), see docs/mtl_lora.md."
        )
    names = list(selected_adapters) if selected_adapters else list(peft_model.peft_config)
    exports = {name: lora_state_and_config(peft_model, name, tasks) for name in names}  # validates everything
    if not is_main_process:
        return
    for name, (state, config) in exports.items():
        folder = str(save_directory) if name == "default" else os.path.join(str(save_directory), name)
        _write(folder, state, config, safe_serialization)


def lora_state_and_config(peft_model, adapter_name: str, task) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The LoRA state dict (PEFT's saved key names) and ``LoraConfig`` of ``task`` of MTL-LoRA adapter ``adapter_name``."""
    tuner = peft_model.base_model
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {list(tuner.peft_config)}.")
    config = tuner.peft_config[adapter_name]
    if task is None:
        if config.num_tasks != 1:
            labels = [config.task_label(i) for i in range(config.num_tasks)]
            raise ValueError(
                f"as_lora=True writes one task as a LoRA adapter; adapter {adapter_name!r} has {config.num_tasks} tasks "
                f"({labels}): pass tasks=[<one of them>] and save once per task."
            )
        task = 0
    ids = config.resolve_task_list(task, f"LoRA export of adapter {adapter_name!r}")
    if len(ids) != 1:
        raise ValueError(
            f"as_lora=True writes one task per LoRA adapter (got {len(ids)} tasks {task!r}); save once per task, "
            "each into its own folder."
        )
    if config.modules_to_save:
        raise ValueError(
            f"Adapter {adapter_name!r} also trains modules_to_save {sorted(config.modules_to_save)}, which a LoRA "
            "adapter for multi-LoRA servers cannot carry; export without them or merge instead (merge_and_unload(task=...))."
        )
    (task_id,) = ids
    prefix = "base_model.model."
    layers = {
        name[len(prefix) :]: module
        for name, module in peft_model.named_modules()
        if isinstance(module, MTLLoraLayer) and adapter_name in module.mtllora_A
    }
    state, scalings, conv1d = {}, set(), False
    with torch.no_grad():
        for name, layer in layers.items():
            down = layer.mtllora_A[adapter_name]  # (r, in)
            up = layer.up_projection(adapter_name, task_id).float()  # (out, r), in float32 whatever the adapter's dtype
            state[f"{prefix}{name}.lora_A.weight"] = down.detach().clone().contiguous()
            state[f"{prefix}{name}.lora_B.weight"] = up.to(down.dtype).contiguous()
            scalings.add(layer.scaling[adapter_name])
            conv1d |= isinstance(layer.get_base_layer(), Conv1D)
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} has no MTL-LoRA layers to export.")
    if len(scalings) != 1:
        raise ValueError(
            f"Adapter {adapter_name!r} has layers with different scalings {sorted(scalings)}; LoRA has one."
        )
    lora = LoraConfig(
        task_type=config.task_type,
        r=config.r,
        lora_alpha=scalings.pop() * config.r,  # LoRA scales by lora_alpha / r: the same factor as MTL-LoRA's
        lora_dropout=config.lora_dropout,
        target_modules=_target_modules(tuner.model, set(layers)),
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight (in, out); PEFT merges with the transpose
        bias="none",
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    return state, lora


def _target_modules(model, adapted: set[str]) -> list[str]:
    """Leaf names (``["q_proj", "v_proj"]``, what servers expect) when they match exactly the adapted modules;
    otherwise the modules' full names, which PEFT matches as suffixes."""
    leaves = {name.rsplit(".", 1)[-1] for name in adapted}
    inside = tuple(f"{name}." for name in adapted)  # the adapter layers' own submodules (base_layer, dropout)
    matched = {
        name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in leaves and not name.startswith(inside)
    }
    return sorted(leaves) if matched == adapted else sorted(adapted)


def _write(folder: str, state: dict[str, torch.Tensor], config: LoraConfig, safe_serialization: bool) -> None:
    """Write weights, config and card into ``folder`` atomically (see :mod:`peft_talora.multitask.atomic_save`):
    the folder holds either the previous adapter or the new one, never a mix; its other files survive."""
    from ..multitask.atomic_save import write_folder_atomically
    from ..peft_patches import _refuse_non_finite

    _refuse_non_finite(state, "The LoRA export", f"Nothing was written to {folder!r}")
    weights = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME

    def write(staging: str) -> None:
        if safe_serialization:
            save_file(state, os.path.join(staging, weights), metadata={"format": "pt"})
        else:
            torch.save(state, os.path.join(staging, weights))
        config.save_pretrained(staging)
        _write_card(staging, folder, config)

    owned = {SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, CONFIG_NAME, "README.md"}
    write_folder_atomically(folder, write, replaces=owned.__contains__)


def _write_card(staging: str, folder: str, config: LoraConfig) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    base = config.base_model_name_or_path
    data = ModelCardData(library_name="peft", base_model=base, tags=["lora", "peft", "mtl-lora-export"])
    text = "\n".join(
        [
            "---",
            data.to_yaml(),
            "---",
            "",
            "# LoRA adapter (one task of an MTL-LoRA adapter)",
            "",
            "A standard PEFT LoRA adapter, exported from one task of an MTL-LoRA adapter by "
            "`save_pretrained(path, tasks=[task], as_lora=True)` of peft-talora. It needs no `task_ids` and no "
            "peft-talora: plain PEFT and multi-LoRA servers (vLLM, TGI, LoRAX) load it.",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}")',
            "```",
            "",
        ]
    )
    ModelCard(text).save(os.path.join(staging, "README.md"))
