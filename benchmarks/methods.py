"""The methods the benchmark compares: PEFT configs, task routing, unseen-task protocols, parameter counts.

Every method is built the way PEFT documents it, on a fresh copy of the same base model:

- ``ta-lora``: :class:`peft_talora.TALoraConfig` (10 virtual tokens, ``r=8``), shared warm-up then
  multi-task training; unseen tasks: ``add_tasks([name])`` (freeze mode, only the new ``u, v`` train).
- ``pt``: ``PromptTuningConfig`` (10 virtual tokens, TEXT init), one prompt for the task mixture.
- ``mpt``: ``MultitaskPromptTuningConfig`` (10 virtual tokens, TEXT init, ``num_ranks=1``, one task
  id per source task, routed by ``task_ids``); unseen tasks: PEFT's transfer recipe, a new
  one-task MPT initialised with ``AVERAGE_SOURCE_TASKS`` from the trained source prompt, all trained.
- ``adaption-prompt``: ``AdaptionPromptConfig(adapter_len=10, adapter_layers=all)`` (LLaMA-Adapter,
  single task, no ``task_ids``).
- ``lora``: ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=[q_proj, v_proj])``.
- ``poly``: ``PolyConfig(r=8, n_skills=4, n_splits=1, n_tasks=#sources)`` on q/v, routed by
  ``task_ids``; unseen tasks: a one-task copy whose router row is the mean of the source rows
  (the analogue of MPT's ``AVERAGE_SOURCE_TASKS``), skills and router trained.
- ``mtl-lora``: :class:`peft_talora.MTLLoraConfig` (``r=8``, q/v) when importable; unseen tasks:
  ``add_tasks([name])`` (freeze mode: the new task's ``Lambda`` and mixing logits train).

Single-task methods (PT, AdaptionPrompt, LoRA) learn unseen tasks by continuing to train the
multi-task adapter on the target task's data (a copy per target task).

Ablations are TA-LoRA variants (``ta-lora/...``): equal learning rates, a non-zero gate at
initialisation, no orthogonality penalty, no shared warm-up.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from peft import (
    AdaptionPromptConfig,
    LoraConfig,
    MultitaskPromptTuningConfig,
    MultitaskPromptTuningInit,
    PolyConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)

import peft_talora  # noqa: F401  (registers TA-LoRA with PEFT)
from peft_talora import TALoraConfig
from peft_talora.training.optim import DEFAULT_FAST_LR_RATIO

try:  # MTL-LoRA is optional: the row is skipped (with a note in the report) if the package lacks it
    from peft_talora import MTLLoraConfig
except ImportError:  # pragma: no cover - depends on the package version
    MTLLoraConfig = None

NUM_VIRTUAL_TOKENS = 10
RANK = 8
QV = ["q_proj", "v_proj"]
PROMPT_INIT_TEXT = "Classify the text into one of the given labels."


@dataclass(frozen=True)
class Method:
    """One row of the comparison."""

    key: str
    label: str
    family: str  # "prompt" or "lora": picks the default learning rate
    routes: Optional[str]  # how evaluation passes the task: "names", "ids" or None (no task_ids)
    unseen_tasks: str  # the unseen-task protocol, in words (for the report)
    ablation: dict = field(default_factory=dict)  # TA-LoRA variants only

    @property
    def is_talora(self) -> bool:
        return self.key.split("/")[0] == "ta-lora"


METHODS = {
    "ta-lora": Method(
        "ta-lora",
        "TA-LoRA",
        "prompt",
        "names",
        "`add_tasks([name])`, freeze mode: only the new task's `u, v` and gate scale `c` train; shared parts and source tasks frozen",
    ),
    "pt": Method(
        "pt",
        "Prompt tuning (PT)",
        "prompt",
        None,
        "single-task: the multi-task prompt is trained further on the target task (a copy per target)",
    ),
    "mpt": Method(
        "mpt",
        "MPT",
        "prompt",
        "ids",
        "PEFT's MPT transfer: a new one-task MPT initialised with `AVERAGE_SOURCE_TASKS` from the source "
        "prompt (shared prompt and task factors averaged over source tasks), all of it trained",
    ),
    "adaption-prompt": Method(
        "adaption-prompt",
        "LLaMA-Adapter (AdaptionPrompt)",
        "prompt",
        None,
        "single-task: the multi-task adapter is trained further on the target task (a copy per target)",
    ),
    "lora": Method(
        "lora",
        "LoRA (r=8, q/v)",
        "lora",
        None,
        "single-task: the multi-task LoRA is trained further on the target task (a copy per target)",
    ),
    "poly": Method(
        "poly",
        "Poly",
        "lora",
        "ids",
        "a one-task copy: router row = mean of the source tasks' rows, skills and router trained "
        "(the analogue of MPT's `AVERAGE_SOURCE_TASKS`)",
    ),
    "mtl-lora": Method(
        "mtl-lora",
        "MTL-LoRA",
        "lora",
        "names",
        "`add_tasks([name])`, freeze mode: only the new task's `Lambda` and mixing logits train",
    ),
}


def _talora_variant(key: str, label: str, **changes) -> Method:
    """TA-LoRA with one thing changed (``changes``: config fields, ``lr``, ``fast_lr_ratio``, ``gate_init``, ``warmup``)."""
    return Method(key, label, "prompt", "names", METHODS["ta-lora"].unseen_tasks, changes)


ABLATIONS = {
    m.key: m
    for m in (
        _talora_variant("ta-lora/equal-lr", "TA-LoRA, equal learning rates (fast_lr_ratio=1)", fast_lr_ratio=1.0),
        _talora_variant("ta-lora/no-zero-init", "TA-LoRA, gate initialised to 1.0 (no zero-init)", gate_init=1.0),
        _talora_variant(
            "ta-lora/no-orthogonality", "TA-LoRA, no orthogonality penalty (weight 0)", orthogonality_weight=0.0
        ),
        _talora_variant("ta-lora/no-warmup", "TA-LoRA, no shared warm-up", warmup=False),
    )
}

#: TA-LoRA hyperparameter variants, run only when named (``--methods ta-lora/prompt-std-0.25 ...``); the report
#: lists them with the ablations. The defaults follow LLaMA-Adapter (prompt rows drawn with std 1, fed to the
#: attention projections like normed hidden states); SmolLM2's attention inputs have an RMS of about 0.25.
HYPERPARAMETERS = {
    m.key: m
    for m in (
        _talora_variant(
            "ta-lora/prompt-std-0.25",
            "TA-LoRA, prompt init std 0.25 (SmolLM2's attention-input scale) instead of 1.0",
            prompt_init_std=0.25,
        ),
        _talora_variant("ta-lora/lr-3e-3", "TA-LoRA, learning rate 3e-3 instead of 1e-2", lr=3e-3),
        _talora_variant("ta-lora/lr-3e-2", "TA-LoRA, learning rate 3e-2 instead of 1e-2", lr=3e-2),
        _talora_variant(
            "ta-lora/paper-warmup",
            "TA-LoRA, the paper's warm-up (a shared prompt per source task, averaged) instead of the shared one",
            warmup="paper",
        ),
        _talora_variant("ta-lora/r-4", f"TA-LoRA, rank r=4 instead of {RANK}", r=4),
        _talora_variant("ta-lora/r-16", f"TA-LoRA, rank r=16 instead of {RANK}", r=16),
        _talora_variant(
            "ta-lora/tokens-5", f"TA-LoRA, 5 virtual tokens instead of {NUM_VIRTUAL_TOKENS}", num_virtual_tokens=5
        ),
        _talora_variant(
            "ta-lora/tokens-20", f"TA-LoRA, 20 virtual tokens instead of {NUM_VIRTUAL_TOKENS}", num_virtual_tokens=20
        ),
    )
}

ALL = {**METHODS, **ABLATIONS, **HYPERPARAMETERS}

#: Learning rates per family: prompt methods at the main job's 1e-2, LoRA-style methods at PEFT's usual 1e-3.
DEFAULT_LR = {"prompt": 1e-2, "lora": 1e-3}


def mtl_lora_available() -> bool:
    return MTLLoraConfig is not None


def available(keys) -> tuple[list[str], list[str]]:
    """``(runnable keys, notes)``: MTL-LoRA is dropped with a note when the package does not provide it."""
    keys, notes = list(keys), []
    unknown = [k for k in keys if k not in ALL]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {list(ALL)}.")
    if "mtl-lora" in keys and not mtl_lora_available():
        keys.remove("mtl-lora")
        notes.append("MTL-LoRA skipped: `peft_talora.MTLLoraConfig` is not importable in this checkout.")
    return keys, notes


def tokenizer_path() -> str:
    """The local tokenizer folder (for PT/MPT TEXT init); nothing is fetched from the Hub."""
    from peft_talora.smollm2 import smollm2_path

    return str(smollm2_path())


# ----------------------------------------------------------------------------- configs
def make_config(key: str, tasks: list[str], num_layers: int, *, counting: bool = False, tok_path: str = None):
    """The PEFT config of method ``key`` for the source ``tasks``.

    ``counting=True`` gives the same shapes with random prompt init (no tokenizer needed), for
    counting parameters on a meta-device model.
    """
    method = ALL[key]
    base_key = key.split("/")[0]
    text_init = (
        {}
        if counting
        else dict(
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=PROMPT_INIT_TEXT,
            tokenizer_name_or_path=tok_path,
        )
    )
    if base_key == "ta-lora":
        config = {"num_virtual_tokens": NUM_VIRTUAL_TOKENS, "r": RANK}
        fields = ("orthogonality_weight", "prompt_init_std", "r", "num_virtual_tokens")
        config.update({k: v for k, v in method.ablation.items() if k in fields})
        return TALoraConfig(task_type="CAUSAL_LM", task_names=list(tasks), **config)
    if base_key == "pt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS, **text_init)
    if base_key == "mpt":
        if counting:
            text_init = {"prompt_tuning_init": MultitaskPromptTuningInit.RANDOM}
        else:
            text_init = {**text_init, "prompt_tuning_init": MultitaskPromptTuningInit.TEXT}
        return MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=NUM_VIRTUAL_TOKENS, num_tasks=len(tasks), num_ranks=1, **text_init
        )
    if base_key == "adaption-prompt":
        return AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=NUM_VIRTUAL_TOKENS, adapter_layers=num_layers)
    if base_key == "lora":
        return LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=16, lora_dropout=0.05, target_modules=QV)
    if base_key == "poly":
        return PolyConfig(task_type="CAUSAL_LM", r=RANK, target_modules=QV, n_tasks=len(tasks), n_skills=4, n_splits=1)
    if base_key == "mtl-lora":
        if MTLLoraConfig is None:
            raise RuntimeError("MTL-LoRA is not available in this checkout of peft_talora.")
        return MTLLoraConfig(task_type="CAUSAL_LM", task_names=list(tasks), r=RANK, target_modules=QV)
    raise ValueError(f"Unknown method {key!r}.")


def build(key: str, base, tasks: list[str], seed: int, tok_path: str):
    """A trainable PEFT model of ``key`` on a copy of ``base`` (``base`` stays untouched)."""
    torch.manual_seed(seed)
    config = make_config(key, tasks, base.config.num_hidden_layers, tok_path=tok_path)
    model = get_peft_model(copy.deepcopy(base), config)
    gate = ALL[key].ablation.get("gate_init")
    if gate is not None:
        with torch.no_grad():
            for bank in model.base_model.talora_banks.values():
                bank.gate.fill_(gate)
    return model


def fast_lr_ratio(key: str) -> float:
    return ALL[key].ablation.get("fast_lr_ratio", DEFAULT_FAST_LR_RATIO)


def uses_warmup(key: str) -> bool:
    return ALL[key].is_talora and ALL[key].ablation.get("warmup", True)


def paper_warmup(key: str) -> bool:
    """The paper's warm-up: the shared prompt (and gates) trained on each source task alone, then averaged."""
    return ALL[key].is_talora and ALL[key].ablation.get("warmup") == "paper"


def eval_task_id(key: str, task: str, task_list: list[str]):
    """What ``evaluate_task(task_id=...)`` gets: the name (TA-LoRA, MTL-LoRA), the int id (MPT, Poly) or None."""
    routes = ALL[key].routes
    if routes == "names":
        return task
    if routes == "ids":
        return task_list.index(task)
    return None


# ----------------------------------------------------------------------------- adapter state
def trainable_state(model) -> dict:
    """The trainable tensors (the adapter) by name, on the CPU: enough to rebuild the trained model."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_state(model, state: dict) -> None:
    missing = [name for name in state if name not in dict(model.named_parameters())]
    if missing:
        raise RuntimeError(f"Saved adapter state does not fit the model: {missing[:3]} ...")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# ----------------------------------------------------------------------------- unseen tasks
def for_target(key: str, state: dict, base, sources: list[str], target: str, seed: int, tok_path: str, scratch: Path):
    """``(model, task_list)`` ready to train on ``target``: the method's unseen-task protocol (see module doc).

    ``state`` is the trained multi-task adapter (:func:`trainable_state`); the model is rebuilt
    from it on a fresh copy of ``base`` (a deep copy of a TA-LoRA ``PeftModel`` would keep
    routing through the original's attention sites). ``task_list`` maps the ``task_ids`` of the
    target rows (the target's id is ``task_list.index(target)``).
    """
    base_key = key.split("/")[0]
    if base_key == "mpt":
        from safetensors.torch import save_file

        scratch.mkdir(parents=True, exist_ok=True)
        path = scratch / f"mpt_source_seed{seed}.safetensors"
        encoder = {
            name.split(".")[-1] if "prefix_task" in name else "prompt_embeddings": value
            for name, value in state.items()
            if "prompt_encoder" in name
        }
        save_file({k: v.contiguous() for k, v in encoder.items()}, str(path))  # the keys PEFT's MPT reads
        config = MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=NUM_VIRTUAL_TOKENS,
            num_tasks=1,
            num_ranks=1,
            prompt_tuning_init=MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS,
            prompt_tuning_init_state_dict_path=str(path),
        )
        torch.manual_seed(seed)
        return get_peft_model(copy.deepcopy(base), config), [target]
    model = build(key, base, sources, seed, tok_path)
    load_state(model, state)
    torch.manual_seed(seed)
    if base_key in ("ta-lora", "mtl-lora"):
        model.add_tasks([target])  # freeze mode
        return model, [*sources, target]
    if base_key in ("pt", "adaption-prompt", "lora"):
        return model, [target]
    if base_key == "poly":
        from peft.tuners.poly.router import PolyRouter

        for module in model.modules():
            if isinstance(module, PolyRouter):
                module.module_logits = torch.nn.Parameter(module.module_logits.detach().mean(0, keepdim=True))
                module.n_tasks = 1
        model.peft_config[model.active_adapter].n_tasks = 1
        return model, [target]
    raise ValueError(f"Unknown method {key!r}.")


# ----------------------------------------------------------------------------- parameter counts
def _count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(key: str, base_config, tasks: list[str]) -> dict:
    """Trainable parameters of ``key``, counted from models built with the base model's shapes.

    ``per_task`` is the growth of the trainable count when one more source task is configured;
    ``shared`` is the rest. Single-task methods do not grow, so by convention all their trainable
    parameters count as per task (one adapter per task) and ``shared`` is 0. ``per_unseen_task``
    is what trains for an unseen task under the method's protocol.
    """
    from transformers import AutoModelForCausalLM

    # Same attention shapes and layer count; a small vocabulary and MLP, which no method adapts.
    small = copy.deepcopy(base_config)
    small.vocab_size, small.intermediate_size = 256, 8
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(small, name, None), int) and getattr(small, name) >= 256:
            setattr(small, name, 0)

    def trainable(n_tasks: int):
        names = [f"task{i}" for i in range(n_tasks)]
        with torch.device("meta"):  # no random init: only the shapes matter
            model = AutoModelForCausalLM.from_config(small)
        model = model.to_empty(device="cpu")
        return get_peft_model(model, make_config(key, names, small.num_hidden_layers, counting=True))

    n = len(tasks)
    model_n = trainable(n)
    total = _count(model_n)
    grown = _count(trainable(n + 1)) - total
    base_key = key.split("/")[0]
    if grown == 0:
        per_task, shared, convention = total, 0, "single-task method: every trainable parameter is per task"
    else:
        per_task, shared, convention = grown, total - n * grown, "per task = growth per added task; shared = the rest"
    if base_key in ("ta-lora", "mtl-lora"):
        model_n.add_tasks(["unseen"])
        per_unseen = _count(model_n)
    elif base_key == "mpt":  # a one-task MPT, all trained
        per_unseen = _count(trainable(1))
    elif base_key == "poly":  # a one-task Poly copy, all trained
        per_unseen = _count(trainable(1))
    else:
        per_unseen = total
    return {
        "total": total,
        "per_task": per_task,
        "shared": shared,
        "per_unseen_task": per_unseen,
        "convention": convention,
    }
