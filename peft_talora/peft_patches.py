"""Every place where peft-talora touches PEFT internals, in one module.

PEFT 0.21 has no public plugin API for a tuner that lives outside its source tree, so a
few internals have to be touched. Each touch is a small function here with its own test in
``tests/test_peft_patches.py``, so that a PEFT upgrade that moves one of them fails
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
   method's call untouched. It also installs ``explain_missing_adapter`` (the
   ``active_peft_config`` property of a model whose last adapter was deleted).
5. ``export_tasks_through_save_and_push`` gives ``PeftModel.save_pretrained`` and ``push_to_hub`` a
   ``tasks=`` argument, for tuners with ``exporting_tasks``, and ``as_lora=True`` (one MTL-LoRA task
   written, or uploaded, as a plain LoRA adapter): inside the tuner's ``exporting_tasks`` context,
   ``PeftModel.peft_config`` (read by PEFT's save, in that context only) shows configs restricted to
   those tasks and the tuner's state dict holds only their rows; PEFT's own saving does the rest.
   Saves of this package's adapters (``push_to_hub`` saves through ``save_pretrained``) refuse NaN
   or inf weights and are atomic: PEFT writes into a new folder that replaces the target in one
   step (``_saving_atomically``, :mod:`peft_talora.multitask.atomic_save`).
6. ``complete_model_cards`` extends ``PeftModel.create_or_update_model_card`` with the tuner's
   ``update_model_card`` (method tag, task names), and re-applies both cards before a
   ``push_to_hub`` upload: transformers' ``push_to_hub`` replaces the README that
   ``save_pretrained`` wrote with a generic ``library_name: transformers`` card.
7. ``explain_unreadable_adapter_files`` wraps ``PeftModel.load_adapter``: when the weights file of
   one of this package's adapters is missing or cannot be read (truncated, not safetensors), or
   the loaded weights hold NaN or inf, a ``ValueError`` names the file and the fix. Other methods'
   errors pass through unchanged.
8. ``explain_mislabelled_configs`` wraps ``PeftConfig.from_json_file``: a ``peft_type`` no method
   registers, or one of this package's configs under another label (``LORA``), raises a
   ``ValueError`` naming the label to write instead of a ``KeyError`` or a silently empty adapter.

The state-dict hooks (``_get_adapter_state_dict`` and friends) are the supported extension point
and live on the tuner classes themselves. MTL-LoRA subclasses PEFT's ``BaseTuner``/``BaseTunerLayer``
as PEFT's own tuners do and overrides their injection, enabling, unloading and freezing hooks;
``tests/test_peft_patches.py::test_base_tuner_hooks_that_mtl_lora_overrides`` fails if PEFT
stops calling them.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import os
from types import SimpleNamespace
from typing import Optional

import torch
from peft import PeftModel, PeftModelForCausalLM
from peft.utils import PeftType, get_peft_model_state_dict, register_peft_method
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from .multitask.atomic_save import write_folder_atomically
from .multitask.routing import ROUTED_TASK_IDS_KWARG

#: The weights files PEFT saves an adapter as (safetensors, or torch.save with safe_serialization=False).
WEIGHT_FILES = (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)


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
    explain_missing_adapter()


def explain_missing_adapter() -> None:
    """``PeftModel.active_peft_config`` (read by ``forward``, ``generate`` and more) of a multi-task model whose last
    adapter was deleted raises a ``ValueError`` saying so, instead of ``KeyError: 'default'``."""
    original = PeftModel.active_peft_config
    if getattr(original.fget, "_peft_talora_explains", False):
        return

    @functools.wraps(original.fget)
    def active_peft_config(self):
        if not self.peft_config and _exports_tasks(self):
            raise ValueError(
                f"This model has no adapter left: {self.active_adapter!r} was its last one and was deleted. Add or "
                "load an adapter first (add_adapter / load_adapter), or use the base model (get_base_model())."
            )
        return original.fget(self)

    active_peft_config._peft_talora_explains = True
    PeftModel.active_peft_config = property(active_peft_config)


def _exports_tasks(peft_model) -> bool:
    return hasattr(peft_model.base_model, "exporting_tasks")


def export_tasks_through_save_and_push() -> None:
    """``PeftModel.save_pretrained(path, tasks=[...])`` and ``push_to_hub(repo, tasks=[...])``."""
    save, push = PeftModel.save_pretrained, PeftModel.push_to_hub
    if getattr(save, "_peft_talora_exports_tasks", False):
        return
    save = _saving_atomically(save)  # push_to_hub saves through PeftModel.save_pretrained, so it is atomic too

    def _check(self, tasks):
        if tasks is not None and not _exports_tasks(self):
            raise TypeError(
                f"`tasks=` selects tasks of a multi-task adapter (TA-LoRA, MTL-LoRA); this model's tuner "
                f"{type(self.base_model).__name__} has no tasks to select."
            )

    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, tasks=None, as_lora=False, **kwargs):
        if as_lora:  # one MTL-LoRA task as a plain PEFT LoRA adapter, for multi-LoRA servers
            from .mtl_lora.lora_export import save_task_as_lora

            return save_task_as_lora(self, save_directory, tasks, *args, **kwargs)
        _check(self, tasks)
        if tasks is None:
            return save(self, save_directory, *args, **kwargs)
        selected = _selected_adapters(self, save_directory, args, kwargs)
        if selected is None:  # arguments save_pretrained does not take: PEFT's own error
            return save(self, save_directory, *args, **kwargs)
        with self.base_model.exporting_tasks(tasks, selected):
            return save(self, save_directory, *args, **kwargs)

    @functools.wraps(push)
    def push_to_hub(self, repo_id, *args, tasks=None, as_lora=False, **kwargs):
        if as_lora:  # the folder save_pretrained(as_lora=True) writes, uploaded as it is
            return _push_task_as_lora(self, repo_id, tasks, *args, **kwargs)
        _check(self, tasks)
        if tasks is None:
            return push(self, repo_id, *args, **kwargs)
        with self.base_model.exporting_tasks(tasks, list(self.peft_config)):
            return push(self, repo_id, *args, **kwargs)

    save_pretrained._peft_talora_exports_tasks = True
    PeftModel.save_pretrained = save_pretrained
    PeftModel.push_to_hub = push_to_hub
    _show_exported_configs()


def _show_exported_configs() -> None:
    """``PeftModel.peft_config`` inside a tuner's ``exporting_tasks``, in that context only: the export's
    read-only configs (what PEFT's save writes). The tuner keeps its real configs for routing."""
    original = PeftModel.peft_config

    def peft_config(self):
        configs = original.fget(self)
        exported = getattr(self.base_model, "exported_configs", None)
        shown = exported() if callable(exported) else None
        return configs if shown is None else shown

    PeftModel.peft_config = property(peft_config, original.fset, original.fdel, original.__doc__)


#: What ``push_to_hub(..., as_lora=True)`` passes on to the upload (the rest of transformers' arguments are refused).
LORA_PUSH_ARGUMENTS = ("commit_message", "commit_description", "private", "token", "revision", "create_pr")


def _push_task_as_lora(model, repo_id: str, tasks, *args, **kwargs):
    """``push_to_hub(repo_id, tasks=[t], as_lora=True)``: one MTL-LoRA task as a plain LoRA adapter on the Hub.

    The task is exported into a temporary folder with ``save_pretrained(..., as_lora=True)`` (every check runs
    before anything is written or sent) and that folder's files are uploaded in one commit, so a multi-LoRA server can
    pull the repo with plain PEFT.
    """
    import tempfile

    from huggingface_hub import CommitOperationAdd, HfApi

    unsupported = sorted(kwargs.keys() - set(LORA_PUSH_ARGUMENTS))
    if args or unsupported:
        raise TypeError(
            f"push_to_hub(as_lora=True) takes repo_id, tasks= and the keywords {', '.join(LORA_PUSH_ARGUMENTS)}; "
            f"got {f'{len(args)} positional argument(s)' if args else ''}{', ' if args and unsupported else ''}"
            f"{f'unsupported {unsupported}' if unsupported else ''}."
        )
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, tasks=tasks, as_lora=True)
        api = HfApi(token=kwargs.get("token"))
        repo = api.create_repo(repo_id, private=kwargs.get("private"), exist_ok=True)
        files = sorted(
            os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names
        )
        return api.create_commit(
            repo_id=repo.repo_id,
            operations=[CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(folder, f)) for f in files],
            commit_message=kwargs.get("commit_message") or "Upload one MTL-LoRA task as a LoRA adapter",
            commit_description=kwargs.get("commit_description"),
            revision=kwargs.get("revision"),
            create_pr=bool(kwargs.get("create_pr", False)),
        )


def _selected_adapters(model, save_directory, args, kwargs) -> Optional[list[str]]:
    """The adapters a ``save_pretrained(save_directory, *args, **kwargs)`` call saves: its ``selected_adapters``, by
    keyword or position, or every adapter; ``None`` when the arguments do not fit PEFT's signature. A name the
    model does not have is refused here, with the names it has, before anything is written."""
    try:
        bound = inspect.signature(PeftModel.save_pretrained).bind(model, save_directory, *args, **kwargs).arguments
    except TypeError:
        return None
    selected = _adapters_to_save(model, bound)
    unknown = [name for name in selected if name not in model.peft_config]
    if unknown:
        raise ValueError(
            f"selected_adapters names {unknown}, which this model does not have; its adapters are "
            f"{list(model.peft_config)}. Nothing was written."
        )
    return selected


def _adapters_to_save(model, arguments: dict) -> list[str]:
    """``selected_adapters`` of a save's bound arguments, or every adapter when not given ([] saves none, as in PEFT)."""
    chosen = arguments.get("selected_adapters")
    return list(model.peft_config) if chosen is None else list(chosen)


def _saving_atomically(save):
    """``save`` for this package's adapters: checked for non-finite values, then written all or nothing.

    PEFT writes ``README.md``, and per adapter ``adapter_model.safetensors`` (or ``.bin``) and
    ``adapter_config.json``, into the folder (``<folder>/<name>/`` for a non-default adapter name).
    Here it writes into a new folder beside the target, which replaces the target in one step once
    every file is complete (:func:`peft_talora.multitask.atomic_save.write_folder_atomically`); the old folder's
    other files (a tokenizer, other adapters' subfolders) are carried over. Other methods' saves,
    and processes other than the main one (PEFT writes nothing there), are PEFT's own.
    """

    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        try:
            arguments = inspect.signature(save).bind(self, save_directory, *args, **kwargs).arguments
        except TypeError:
            return save(self, save_directory, *args, **kwargs)  # PEFT's own error
        selected = _adapters_to_save(self, arguments)
        if _exports_tasks(self) and not self.peft_config:
            raise ValueError(
                "This model has no adapter left to save (the last one was deleted); add or load an adapter first. "
                "Nothing was written."
            )
        if (
            not arguments.get("is_main_process", True)
            or os.path.isfile(save_directory)
            or any(name not in self.peft_config for name in selected)
            or not any(_is_ours(self.peft_config[name]) for name in selected)
        ):
            return save(self, save_directory, *args, **kwargs)
        from .multitask import base_model_shape

        state_dict = arguments.get("kwargs", {}).get("state_dict")
        for name in selected:
            tensors = get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=name)
            _refuse_non_finite(tensors, f"Adapter {name!r}", f"Nothing was written to {str(save_directory)!r}")
        for name in selected:  # checked on load, like PEFT's base_model_name_or_path but enforced
            self.peft_config[name].base_model_shape = base_model_shape(self.get_base_model())
        folders = ["" if name == "default" else name for name in selected]
        rewritten = {os.path.join(f, file) for f in folders for file in (CONFIG_NAME, *WEIGHT_FILES)}
        write_folder_atomically(
            str(save_directory),
            lambda folder: save(self, folder, *args, **kwargs),
            replaces=rewritten.__contains__,
            seed=("README.md",),  # PEFT updates an existing model card instead of replacing it
        )

    return save_pretrained


def _is_our_type(peft_type) -> bool:
    """Whether ``peft_type`` (a ``PeftType`` or its string) is one of this package's methods."""
    return str(getattr(peft_type, "value", peft_type)) in OUR_PEFT_TYPES


def _is_ours(config) -> bool:
    return _is_our_type(config.peft_type)


def _refuse_non_finite(tensors: dict, owner: str, outcome: str) -> None:
    """Raise a ``ValueError`` naming the tensors of ``tensors`` that hold NaN or inf."""
    bad = [
        f"{key} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
        for key, t in tensors.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise ValueError(
            f"{owner} holds non-finite values (NaN or inf) in {', '.join(bad)}. {outcome}. Training has probably "
            "diverged: go back to the last good checkpoint and lower the learning rate (or find the NaN source)."
        )


def complete_model_cards() -> None:
    """Model cards of multi-task adapters: PEFT's card plus the tuner's, also on ``push_to_hub``."""
    create, upload = PeftModel.create_or_update_model_card, PeftModel._upload_modified_files
    if getattr(create, "_peft_talora_cards", False):
        return
    from .multitask import card_location  # the card's loading lines name the target, not a temporary folder

    save = PeftModel.save_pretrained

    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        with card_location(save_directory, _selected_adapters(self, save_directory, args, kwargs)):
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


def _layout_difference(name: str, saved, here) -> Optional[str]:
    """How a layout field differs between the file (JSON) and the live config, or ``None``. A set on either side
    (PEFT keeps ``target_modules`` as a set and saves it as a list, in no fixed order) compares as a set."""
    if isinstance(saved, (set, frozenset)) or isinstance(here, (set, frozenset)):
        if saved is None or here is None or isinstance(saved, str) or isinstance(here, str):
            return None if saved == here else f"{name}: {saved!r} in the file, {here!r} here"
        only_file, only_here = sorted(set(saved) - set(here)), sorted(set(here) - set(saved))
        if not (only_file or only_here):
            return None
        return f"{name}: {only_file} only in the file, {only_here} only here"
    here = list(here) if isinstance(here, tuple) else here
    return None if saved == here else f"{name}: {saved!r} in the file, {here!r} here"


def _hub_config_folder(repo_id: str, kwargs: dict) -> Optional[str]:
    """The local folder of ``repo_id``'s adapter config (downloaded, or from the cache PEFT then reads it from),
    for the checks of :func:`_refuse_another_adapter_file`; ``None`` where it cannot be had (PEFT's own load
    then says why)."""
    import huggingface_hub

    wanted = ("subfolder", "revision", "token", "cache_dir", "local_files_only")
    try:
        path = huggingface_hub.hf_hub_download(
            repo_id, CONFIG_NAME, **{k: kwargs[k] for k in wanted if kwargs.get(k) is not None}
        )
    except Exception:
        return None
    return os.path.dirname(path)


def _refuse_another_adapter_file(config, model, folder: str, source: str) -> None:
    """Loading into an existing adapter (``Trainer`` resuming a checkpoint, ``load_best_model_at_end``): the
    file must have been saved from this base model, for this adapter's tasks in the same order, with the same
    layout (``LAYOUT_FIELDS``: e.g. TA-LoRA's ``adapter_layers``). Tensor shapes catch another task count, not
    the same count under other names, or factors of other layers, whose weights would silently answer wrongly."""
    from .multitask import check_base_model_shape

    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        saved = json.load(handle)
    names, here = saved.get("task_names"), list(config.task_names or [])
    if names and here and len(names) == len(here) and list(names) != here:
        raise ValueError(
            f"The adapter in {source} was saved for other tasks (task_names: {list(names)} in the file, {here} here): "
            "its factors would answer for the wrong tasks. Nothing was loaded. Load or resume it into a model built "
            f"with the {type(config).__name__} it was saved with (its {CONFIG_NAME})."
        )
    if saved.get("base_model_shape") and saved["base_model_shape"] != config.base_model_shape:
        # (equal under from_pretrained, whose adapter is built from this file: the load's own checks explain more)
        file_config = SimpleNamespace(
            base_model_shape=saved["base_model_shape"], base_model_name_or_path=saved.get("base_model_name_or_path")
        )
        check_base_model_shape(file_config, model, source)
    differences = [
        text
        for name in getattr(config, "LAYOUT_FIELDS", ())
        if name in saved and (text := _layout_difference(name, saved[name], getattr(config, name)))
    ]
    if differences:
        raise ValueError(
            f"The adapter in {source} was saved with another layout ({'; '.join(differences)}): its weights would "
            f"land in the wrong places. Nothing was loaded. Load or resume it into a model built with the "
            f"{type(config).__name__} it was saved with (its {CONFIG_NAME})."
        )


def adapter_tensors(peft_model, adapter_name: str) -> dict:
    """The parameters and buffers of ``adapter_name`` (a path component of their name), by name."""
    tensors = {**dict(peft_model.named_parameters()), **dict(peft_model.named_buffers())}
    return {name: t for name, t in tensors.items() if adapter_name in name.split(".")}


def explain_unreadable_adapter_files() -> None:
    """Damaged or mislabelled files of a TA-LoRA/MTL-LoRA adapter get an error naming the problem and the fix.

    ``PeftModel.load_adapter`` (behind ``PeftModel.from_pretrained`` too) is wrapped: a local folder
    of ours without a weights file (PEFT would then ask the Hub for the local path:
    ``HFValidationError``), an unreadable weights file (``SafetensorError``), tensors the model has no
    place for, a base model other than the one saved from (``base_model_shape``: family, width,
    depth, heads, KV heads), loaded weights with NaN or inf, and a file saved for other task names,
    another base or another layout than the existing adapter it is loaded into (a resumed
    checkpoint) each raise a ``ValueError``; an adapter the failed call added is deleted again, and
    an existing one gets its values back (PEFT copies the weights in before they can be checked);
    other methods' loads are untouched. The config checks are in :func:`explain_mislabelled_configs`.
    """
    explain_mislabelled_configs()
    load = PeftModel.load_adapter
    if getattr(load, "_peft_talora_explains", False):
        return

    from .multitask import check_base_model_shape

    @functools.wraps(load)
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        folder = os.path.join(str(model_id), kwargs["subfolder"]) if kwargs.get("subfolder") else str(model_id)
        if (
            os.path.isdir(folder)
            and _is_our_adapter(folder)
            and not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES)
        ):
            raise ValueError(
                f"The adapter folder {folder!r} has {CONFIG_NAME} but no weights file ({' or '.join(WEIGHT_FILES)}), "
                "so nothing was loaded. Save the adapter again (save_pretrained), or copy its weights file next to "
                f"{CONFIG_NAME}."
            )
        new, source = adapter_name not in self.peft_config, repr(str(model_id))
        before = None  # an existing adapter's values, put back if the load fails after PEFT has copied weights in
        if not new and _is_ours(self.peft_config[adapter_name]):
            config_folder = folder if os.path.isdir(folder) else _hub_config_folder(str(model_id), kwargs)
            if config_folder is not None:
                _refuse_another_adapter_file(
                    self.peft_config[adapter_name], self.get_base_model(), config_folder, source
                )
            before = {name: t.detach().clone() for name, t in adapter_tensors(self, adapter_name).items()}

        def restore() -> None:
            if before is not None:
                with torch.no_grad():
                    for name, t in adapter_tensors(self, adapter_name).items():
                        if name in before and before[name].shape == t.shape:
                            t.copy_(before[name])

        try:
            result = load(self, model_id, adapter_name, *args, **kwargs)
        except Exception as error:
            restore()
            config = self.peft_config.get(adapter_name)
            other_base = None
            if config is not None and _is_ours(config):
                if isinstance(error, ValueError):  # the tensors did not fit: was it saved from another base?
                    try:
                        check_base_model_shape(config, self.get_base_model(), source)
                    except ValueError as mismatch:
                        other_base = mismatch
                if new:
                    _forget(self, adapter_name)
            if other_base is not None:
                raise ValueError(f"{other_base} What failed: {error}") from error
            if not _is_our_adapter(folder):
                raise
            if type(error).__name__ == "SafetensorError":
                damaged, kind = SAFETENSORS_WEIGHTS_NAME, "a safetensors file"
            elif _unreadable_pickle(folder):  # safe_serialization=False: torch.load's error would not say so
                damaged, kind = WEIGHTS_NAME, "a PyTorch weights file"
            else:
                raise
            raise ValueError(
                f"The adapter weights in {model_id!r} cannot be read: {damaged} is truncated or not {kind} "
                f"({type(error).__name__}: {error}). Nothing was loaded; save the adapter again (save_pretrained) or "
                "restore the file from where it came from."
            ) from error
        if _is_ours(self.peft_config[adapter_name]):
            try:
                check_base_model_shape(self.peft_config[adapter_name], self.get_base_model(), source)
                unexpected = sorted(getattr(result, "unexpected_keys", None) or [])
                if unexpected:
                    raise ValueError(
                        f"The adapter file in {source} has tensors this model has no place for: {unexpected}. "
                        "It was saved from another model or method, or it is damaged; nothing was loaded."
                    )
                tensors = get_peft_model_state_dict(self, adapter_name=adapter_name)
                _refuse_non_finite(
                    tensors,
                    f"The adapter in {source}",
                    "The load was stopped" + ("" if new else f" and adapter {adapter_name!r} keeps its values"),
                )
            except ValueError:
                restore()
                if new:
                    _forget(self, adapter_name)
                raise
        return result

    load_adapter._peft_talora_explains = True
    PeftModel.load_adapter = load_adapter


def _unreadable_pickle(folder: str) -> bool:
    """Whether ``folder`` holds PyTorch-format adapter weights only (``safe_serialization=False``) and they cannot
    be read (truncated, empty or not a weights file)."""
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path) or os.path.isfile(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)):
        return False
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return True
    return False


def _forget(peft_model, adapter_name: str) -> None:
    """Delete the adapter a failed ``load_adapter`` added, so the model is as before the call."""
    if len(peft_model.peft_config) > 1:  # from_pretrained's only adapter: the model is never returned
        peft_model.delete_adapter(adapter_name)


def explain_mislabelled_configs() -> None:
    """``PeftConfig.from_json_file`` (every PEFT load of a config, local or Hub) refuses a mislabelled config.

    A ``peft_type`` that no installed method registers would be a ``KeyError`` deep in PEFT; a
    TA-LoRA or MTL-LoRA config relabelled as another type (``LORA``) would load as that type with
    its defaults and only warnings (an adapter that does nothing). Both raise a ``ValueError``
    naming the file, the label and, where the keys fit one of this package's methods, the label to
    write.
    """
    from peft.config import PeftConfigMixin

    original = PeftConfigMixin.__dict__["from_json_file"].__func__
    if getattr(original, "_peft_talora_checks_label", False):
        return

    @functools.wraps(original)
    def from_json_file(cls, path_json_file, **kwargs):
        try:
            loaded = original(cls, path_json_file, **kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path_json_file} is not valid JSON ({error}): the adapter config is damaged or truncated. Save the "
                "adapter again (save_pretrained) or restore the file from where it came from."
            ) from error
        _check_config_label(loaded, str(path_json_file))
        return loaded

    from_json_file._peft_talora_checks_label = True
    PeftConfigMixin.from_json_file = classmethod(from_json_file)


def _check_config_label(loaded, path: str) -> None:
    from dataclasses import fields

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds {type(loaded).__name__} where an adapter config (a JSON object) belongs.")
    label, keys = str(loaded.get("peft_type")), set(loaded)
    fits = sorted(
        t
        for t in OUR_PEFT_TYPES
        if t != label
        and keys & {"num_tasks", "task_names"}
        and keys <= {f.name for f in fields(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(t)])}
    )
    fix = " or ".join(f'"peft_type": "{t}"' for t in fits)
    if "peft_type" not in loaded:
        if fits:  # PEFT would fail with KeyError: 'peft_type'
            raise ValueError(
                f'{path} has no "peft_type"; its keys are those of a {" or ".join(fits)} adapter: '
                f"write {fix} in the file."
            )
        return
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(label)
    if config_cls is None:
        known = sorted(str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING)
        raise ValueError(
            f'{path} says "peft_type": {loaded["peft_type"]!r}, which no installed PEFT method registers. '
            + (
                f"Its keys are those of a {' or '.join(fits)} adapter: write {fix} in the file."
                if fits
                else f"Known types: {known}; for another method, install and import the package that adds it."
            )
        )
    unknown = sorted(keys - {f.name for f in fields(config_cls)})
    if fits and unknown:
        raise ValueError(
            f'{path} says "peft_type": {label!r}, but its keys {unknown} are not {config_cls.__name__}\'s: it is a '
            f"{' or '.join(fits)} adapter's config with another label. Write {fix} in the file (or save the adapter "
            "again with save_pretrained)."
        )


def _is_our_adapter(folder: str) -> bool:
    """Whether ``folder`` holds a readable config of one of this package's methods."""
    from peft.config import PeftConfig

    try:
        peft_type = PeftConfig._get_peft_type(folder)
    except Exception:  # noqa: BLE001 - no readable config: not ours to explain
        return False
    return _is_our_type(peft_type)
