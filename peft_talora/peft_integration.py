"""Every place where peft-talora touches PEFT internals, in one module.

PEFT 0.21 has no public plugin API for a tuner that lives outside its source tree, so a
few internals have to be touched. Each touch is a small function here with its own test in
``tests/test_peft_integration.py``, so that a PEFT upgrade that moves one of them fails
loudly in one place instead of silently in many.

The touches:

1. ``add_peft_type`` adds a member to the ``PeftType`` enum, because ``register_peft_method``
   refuses names that are not enum members.
2. ``register_tuner`` calls ``peft.utils.register_peft_method`` (public) once per method.
3. ``PeftModelDispatch`` makes ``PeftModel`` treat the config like AdaptionPrompt's (the peer with
   the same gated-prefix mechanism and a plain ``nn.Module`` tuner): ``disable_adapter``,
   ``add_adapter`` and ``load_adapter`` then call the tuner's own methods instead of
   ``BaseTuner``-only helpers such as ``get_model_status``.
4. ``route_task_ids_through_peft_forward`` wraps ``PeftModelForCausalLM.forward``: in PEFT 0.21
   it drops ``task_ids`` for every non-prompt method except Poly. The wrapper hands the ids to
   tuners that declare ``routes_task_ids = True`` under a private keyword and leaves every other
   method's call untouched.
5. ``export_tasks_through_save_and_push`` gives ``PeftModel.save_pretrained`` and ``push_to_hub`` a
   ``tasks=`` argument, for tuners with ``exporting_tasks``: inside that context the tuner swaps
   in a config and state dict restricted to those tasks, and PEFT's own saving does the rest.
6. ``complete_model_cards`` extends ``PeftModel.create_or_update_model_card`` with the tuner's
   ``update_model_card`` (method tag, task names), and re-applies both cards before a
   ``push_to_hub`` upload: transformers' ``push_to_hub`` replaces the README that
   ``save_pretrained`` wrote with a generic ``library_name: transformers`` card.
7. ``explain_unreadable_adapter_files`` wraps ``PeftModel.load_adapter``: when the weights file of
   one of this package's adapters cannot be read (truncated, not safetensors), the raw
   ``SafetensorError`` becomes a ``ValueError`` naming the file and the fix. Other methods' errors
   pass through unchanged.

The state-dict hooks (``_get_adapter_state_dict`` and friends) are the supported extension point
and live on the tuner classes themselves. MTL-LoRA subclasses PEFT's ``BaseTuner``/``BaseTunerLayer``
as PEFT's own tuners do and overrides their injection, enabling, unloading and freezing hooks;
``tests/test_peft_integration.py::test_base_tuner_hooks_that_mtl_lora_overrides`` fails if PEFT
stops calling them.
"""

from __future__ import annotations

import enum
import functools

from peft import PeftModel, PeftModelForCausalLM
from peft.utils import PeftType, register_peft_method

#: Keyword under which the wrapped ``PeftModelForCausalLM.forward`` passes task ids to a tuner.
ROUTED_TASK_IDS_KWARG = "_peft_talora_task_ids"


def add_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding the member to PEFT's ``str`` enum first if missing."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    # The enum metaclass blocks plain setattr on members, so write through ``type``.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    if not isinstance(PeftType[name], enum.Enum) or PeftType(name) is not member:
        raise RuntimeError(f"Could not add {name!r} to peft.utils.PeftType; this PEFT version is not supported.")
    return member


def register_tuner(name: str, config_cls, model_cls) -> None:
    """Register a tuner with PEFT; importing or reloading the package again is a no-op."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = add_peft_type(name.upper())
    OUR_PEFT_TYPES.add(str(peft_type.value))
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    elif registered.__qualname__ == model_cls.__qualname__ and registered.__module__ == model_cls.__module__:
        # importlib.reload made new class objects: point PEFT at them
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    else:
        raise KeyError(f"PEFT already has a method {name!r} registered by {registered.__module__}.")


class PeftModelDispatch:
    """Mixin for a tuner config: ``PeftModel`` dispatches to the tuner as for AdaptionPrompt.

    The tuner must then provide ``add_adapter``, ``set_adapter``, ``delete_adapter``,
    ``enable_adapter_layers``, ``disable_adapter_layers`` and ``_temporarily_active``.
    """

    @property
    def is_adaption_prompt(self) -> bool:
        return True


def route_task_ids_through_peft_forward() -> None:
    """Make ``PeftModelForCausalLM.forward(task_ids=...)`` reach tuners that route task ids."""
    original = PeftModelForCausalLM.forward
    if getattr(original, "_peft_talora_routes_task_ids", False):
        return

    @functools.wraps(original)
    def forward(self, *args, task_ids=None, **kwargs):
        if task_ids is not None and getattr(self.base_model, "routes_task_ids", False):
            kwargs[ROUTED_TASK_IDS_KWARG] = task_ids
            task_ids = None
        return original(self, *args, task_ids=task_ids, **kwargs)

    forward._peft_talora_routes_task_ids = True
    PeftModelForCausalLM.forward = forward


def _exports_tasks(peft_model) -> bool:
    return hasattr(peft_model.base_model, "exporting_tasks")


def export_tasks_through_save_and_push() -> None:
    """``PeftModel.save_pretrained(path, tasks=[...])`` and ``push_to_hub(repo, tasks=[...])``."""
    save, push = PeftModel.save_pretrained, PeftModel.push_to_hub
    if getattr(save, "_peft_talora_exports_tasks", False):
        return

    def _check(self, tasks):
        if tasks is not None and not _exports_tasks(self):
            raise TypeError(
                f"`tasks=` selects tasks of a multi-task adapter (TA-LoRA, MTL-LoRA); this model's tuner "
                f"{type(self.base_model).__name__} has no tasks to select."
            )

    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, tasks=None, **kwargs):
        _check(self, tasks)
        if tasks is None:
            return save(self, save_directory, *args, **kwargs)
        selected = kwargs.get("selected_adapters") or list(self.peft_config)
        with self.base_model.exporting_tasks(tasks, selected):
            return save(self, save_directory, *args, **kwargs)

    @functools.wraps(push)
    def push_to_hub(self, repo_id, *args, tasks=None, **kwargs):
        _check(self, tasks)
        if tasks is None:
            return push(self, repo_id, *args, **kwargs)
        with self.base_model.exporting_tasks(tasks, list(self.peft_config)):
            return push(self, repo_id, *args, **kwargs)

    save_pretrained._peft_talora_exports_tasks = True
    PeftModel.save_pretrained = save_pretrained
    PeftModel.push_to_hub = push_to_hub


def complete_model_cards() -> None:
    """Model cards of multi-task adapters: PEFT's card plus the tuner's, also on ``push_to_hub``."""
    create, upload = PeftModel.create_or_update_model_card, PeftModel._upload_modified_files
    if getattr(create, "_peft_talora_cards", False):
        return
    from .multitask import card_location  # the card's loading lines name the target, not a temporary folder

    save = PeftModel.save_pretrained

    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        with card_location(save_directory):
            return save(self, save_directory, *args, **kwargs)

    @functools.wraps(create)
    def create_or_update_model_card(self, output_dir):
        create(self, output_dir)
        if hasattr(self.base_model, "update_model_card"):
            self.base_model.update_model_card(output_dir)

    @functools.wraps(upload)
    def _upload_modified_files(self, working_dir, *args, **kwargs):
        if hasattr(self.base_model, "update_model_card"):
            with card_location(args[0] if args else kwargs["repo_id"]):
                self.create_or_update_model_card(working_dir)
        return upload(self, working_dir, *args, **kwargs)

    create_or_update_model_card._peft_talora_cards = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel._upload_modified_files = _upload_modified_files
    PeftModel.save_pretrained = save_pretrained


#: PEFT types of this package's methods (filled by ``register_tuner``).
OUR_PEFT_TYPES: set[str] = set()


def explain_unreadable_adapter_files() -> None:
    """A corrupt weights file of a TA-LoRA/MTL-LoRA adapter gets an error that names it and the fix."""
    load = PeftModel.load_adapter
    if getattr(load, "_peft_talora_explains", False):
        return

    @functools.wraps(load)
    def load_adapter(self, model_id, *args, **kwargs):
        try:
            return load(self, model_id, *args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError" or not _is_our_adapter(model_id, kwargs.get("subfolder")):
                raise
            raise ValueError(
                f"The adapter weights in {model_id!r} cannot be read: adapter_model.safetensors is truncated or not a "
                f"safetensors file ({error}). Nothing was loaded; save the adapter again (save_pretrained) or restore "
                "the file from where it came from."
            ) from error

    load_adapter._peft_talora_explains = True
    PeftModel.load_adapter = load_adapter


def _is_our_adapter(model_id, subfolder=None) -> bool:
    import os

    from peft.config import PeftConfig

    folder = os.path.join(str(model_id), subfolder) if subfolder else str(model_id)
    try:
        peft_type = PeftConfig._get_peft_type(folder)
    except Exception:  # noqa: BLE001 - no readable config: not ours to explain
        return False
    return str(getattr(peft_type, "value", peft_type)) in OUR_PEFT_TYPES
