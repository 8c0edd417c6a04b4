"""Task specifications, the task registry, and reading a registered task's source into a checked pool.

A task is a :class:`TaskSpec` (name, instruction, label words) plus a *source*: a
``datasets.Dataset``, a ``.csv``/``.tsv``/``.jsonl``/``.json`` path, or a function returning a
``Dataset``. Built-in tasks and user tasks go through the same :meth:`RegisteredTask.read`, which
returns a ``Dataset`` with ``text`` (str) and ``label`` (int index into ``label_names``) and
raises a ``ValueError`` naming the task and the column for any bad input.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import datasets

Source = Union[datasets.Dataset, str, os.PathLike, Callable[[], datasets.Dataset]]

FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHOWN = 5  # how many offending values an error message lists


@dataclass(frozen=True)
class TaskSpec:
    """What a task asks and which words answer it.

    ``label_names`` are the label words the model is trained to emit, in label-id order
    (``label`` ``i`` is ``label_names[i]``). ``text_field`` names the text in the prompt
    ("Review: ..."). ``description`` says where the data comes from.
    """

    name: str
    instruction: str
    label_names: tuple[str, ...]
    text_field: str = "Text"
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if not isinstance(self.name, str) or not _NAME_PATTERN.match(self.name):
            raise ValueError(
                f"Task name {self.name!r} is not valid: use letters, digits, '_', '-' or '.', starting with a "
                "letter or digit (it names the task's cache folder)."
            )
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise ValueError(f"Task {self.name!r}: instruction must be a non-empty string.")
        words = self.label_names
        if len(words) < 2:
            raise ValueError(f"Task {self.name!r}: label_names needs at least 2 label words, got {list(words)}.")
        if not all(isinstance(w, str) and w.strip() and w == w.strip() for w in words):
            raise ValueError(
                f"Task {self.name!r}: every label name must be a non-empty string without surrounding spaces, "
                f"got {list(words)}."
            )
        folded = [w.casefold() for w in words]
        repeated = sorted({w for w in words if folded.count(w.casefold()) > 1})
        if repeated:
            raise ValueError(f"Task {self.name!r}: label_names must be distinct (ignoring case); repeated: {repeated}.")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class RegisteredTask:
    """A spec with its source and the columns holding the text and the label."""

    spec: TaskSpec
    source: Source
    text_column: str = "text"
    label_column: str = "label"
    label_map: Optional[Mapping[Any, str]] = field(default=None)

    @property
    def name(self) -> str:
        return self.spec.name

    def read(self) -> datasets.Dataset:
        """The source as a ``Dataset`` of ``text`` (str) and ``label`` (int), every value checked."""
        raw = _read_source(self.spec.name, self.source)
        return _checked_pool(self, raw)

    def source_key(self) -> str:
        """A short hash that changes when the source, its columns or the label words change (for the cache)."""
        parts = {
            "source": _source_identity(self.source),
            "text_column": self.text_column,
            "label_column": self.label_column,
            "label_names": list(self.spec.label_names),
            "label_map": sorted((repr(k), v) for k, v in (self.label_map or {}).items()),
        }
        if isinstance(self.source, (str, os.PathLike)) or self.label_map:
            parts["label_reading"] = LABEL_READING  # built before files were read as text: rebuilt

        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


_REGISTRY: dict[str, RegisteredTask] = {}
#: How raw labels are read (csv/tsv as text, ClassLabel names through ``label_map``); in the cache key of the
#: tasks it changed, so their caches built by an earlier reading are rebuilt.
LABEL_READING = 3


def column_values(dataset: datasets.Dataset, column: str) -> list:
    """A column as a Python list (fast: ``dataset[column]`` is a lazy ``Column`` in datasets >= 4)."""
    return dataset[column][:]


def register_task(
    spec: TaskSpec,
    source: Source,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_map: Optional[Mapping[Any, str]] = None,
    overwrite: bool = False,
) -> RegisteredTask:
    """Add a task to the registry; :func:`peft_talora.suite.load_task` then builds and caches it.

    ``source`` is a ``datasets.Dataset``, a path to a ``.csv``/``.tsv``/``.jsonl``/``.json`` file,
    or a function returning a ``Dataset``. ``label_column`` holds ints (indices into
    ``spec.label_names``) or strings (label words; ``label_map`` may translate raw values such as
    ``{"pos": "positive"}`` first). A ``Dataset`` is checked here, a file when it is read.
    The cache of a built task is keyed by its source: a ``Dataset``'s fingerprint, a file's path,
    size and modification time, a function's qualified name (after changing what a function
    returns, load with ``rebuild=True``). ``overwrite=True`` replaces a registered task.
    """
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"register_task needs a TaskSpec, got {type(spec).__name__}.")
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"Task {spec.name!r} is already registered; pick another name or pass overwrite=True.")
    if label_map is not None:
        unknown = sorted({str(v) for v in label_map.values() if v not in spec.label_names})
        if unknown:
            raise ValueError(
                f"Task {spec.name!r}: label_map maps to {unknown}, which are not in label_names "
                f"{list(spec.label_names)}."
            )
    if isinstance(source, (str, os.PathLike)):
        _check_path(spec.name, Path(source))
    elif not isinstance(source, datasets.Dataset) and not callable(source):
        raise TypeError(
            f"Task {spec.name!r}: source must be a datasets.Dataset, a file path or a function returning a Dataset, "
            f"got {type(source).__name__}."
        )
    task = RegisteredTask(spec, source, text_column, label_column, dict(label_map) if label_map else None)
    if isinstance(source, datasets.Dataset):
        task.read()  # fail now, not at the first load
    _REGISTRY[spec.name] = task
    return task


def unregister_task(name: str) -> None:
    """Remove a task from the registry (its cache, if any, stays on disk)."""
    registered_task(name)
    del _REGISTRY[name]


def registered_task(name: str) -> RegisteredTask:
    """The registered task called ``name``; a ``ValueError`` lists the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; registered tasks are {sorted(_REGISTRY)}.") from None


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of the registered task ``name``."""
    return registered_task(name).spec


def task_names() -> list[str]:
    """Names of every registered task, built-in and user-registered, in registration order."""
    return list(_REGISTRY)


# ----------------------------------------------------------------------------- reading a source
def _check_path(task: str, path: Path) -> None:
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ValueError(f"Task {task!r}: cannot read {str(path)!r}; supported files end in {list(FILE_SUFFIXES)}.")
    if not path.is_file():
        raise ValueError(f"Task {task!r}: the source file {str(path)!r} does not exist.")


def _read_file(task: str, path: Path) -> datasets.Dataset:
    """A csv/tsv/jsonl/json file as a ``Dataset``; csv/tsv cells are read verbatim, as text (no "NA" -> NaN,
    "1" -> 1 or "True" -> True guessing: a label ``1`` stays the string a ``label_map`` is written for)."""
    import pandas as pd

    _check_path(task, path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        frame = pd.read_csv(
            path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False, na_filter=False
        )
    else:
        frame = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _read_source(task: str, source: Source) -> datasets.Dataset:
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        return _read_file(task, Path(source))
    dataset = source()
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"Task {task!r}: the source function returned {type(dataset).__name__}, not a datasets.Dataset."
        )
    return dataset


def _source_identity(source: Source) -> str:
    if isinstance(source, datasets.Dataset):
        return f"dataset:{source._fingerprint}"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).resolve()
        stat = path.stat() if path.exists() else None
        return f"file:{path}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}"
    return f"function:{getattr(source, '__module__', '')}.{getattr(source, '__qualname__', repr(source))}"


def _shown(values) -> str:
    values = list(values)
    more = f" (and {len(values) - _SHOWN} more)" if len(values) > _SHOWN else ""
    return ", ".join(repr(v) for v in values[:_SHOWN]) + more


def _checked_pool(task: RegisteredTask, raw: datasets.Dataset) -> datasets.Dataset:
    """``text``/``label`` columns of ``raw`` with labels as ints; a ``ValueError`` for anything off."""
    name, spec = task.name, task.spec
    for role, column in (("text", task.text_column), ("label", task.label_column)):
        if column not in raw.column_names:
            raise ValueError(
                f"Task {name!r}: the {role} column {column!r} does not exist; columns are {raw.column_names}."
            )
    if len(raw) == 0:
        raise ValueError(f"Task {name!r}: the source dataset is empty (0 rows).")

    texts = column_values(raw, task.text_column)
    not_text = sorted({type(t).__name__ for t in texts if t is not None and not isinstance(t, str)})
    if not_text:
        raise ValueError(f"Task {name!r}: the text column {task.text_column!r} holds {not_text} values, not strings.")

    feature = raw.features[task.label_column]
    class_label = isinstance(feature, datasets.ClassLabel)
    if class_label and not task.label_map and feature.num_classes != spec.num_labels:
        raise ValueError(
            f"Task {name!r}: the label column {task.label_column!r} is a ClassLabel with {feature.num_classes} "
            f"classes {feature.names}, but label_names has {spec.num_labels}: {list(spec.label_names)} "
            "(label_map= can map its classes, by name, onto the label words)."
        )
    values = column_values(raw, task.label_column)
    label_map = dict(task.label_map or {})
    if class_label and not label_map:
        values = _class_ids_as_spec_ids(feature, spec, values)
    elif class_label:  # mapped by class: keys may be class names or class ids; every class must end as a label
        names = feature.names
        label_map = {(names[k] if is_label_id(k, len(names)) else k): word for k, word in label_map.items()}
        values = [feature.int2str(v) if is_label_id(v, feature.num_classes) else v for v in values]
    if label_map:
        _check_label_map_is_used(task, values, label_map)
    labels = _label_ids(task, values, label_map, class_ids=class_label and not label_map)
    return datasets.Dataset.from_dict(
        {"text": ["" if t is None else t for t in texts], "label": labels},
        features=datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")}),
    )


def _class_ids_as_spec_ids(feature: datasets.ClassLabel, spec: TaskSpec, values: list) -> list:
    """A ``ClassLabel`` column's ids in ``spec``'s label order: when its class names are the label words in
    another order (case aside), id ``i`` is the word ``feature.names[i]``, not ``label_names[i]``."""
    names = [name.strip().casefold() for name in feature.names]
    words = [word.casefold() for word in spec.label_names]
    if names == words or sorted(names) != sorted(words):
        return values  # the same order, or names that are not the label words: the ids are taken as they are
    order = [words.index(name) for name in names]
    return [order[v] if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(order) else v for v in values]


def is_label_id(label, num_labels: int) -> bool:
    """Whether ``label`` is an integer id (not a bool) of one of ``num_labels`` labels."""
    return isinstance(label, numbers.Integral) and not isinstance(label, bool) and 0 <= label < num_labels


def _map_keys(value, label_map: Mapping) -> list:
    """The ``label_map`` keys a raw label may be written as: itself, its text, the int a numeric text is, and the bool
    a text ``True``/``False`` is (csv/tsv cells are text; a map may be written for the values they spell)."""
    keys = [value, str(value)] if isinstance(value, (str, int)) else []
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        keys.append(int(value.strip()))
    if isinstance(value, str) and value.strip().casefold() in ("true", "false"):
        if any(isinstance(key, bool) for key in label_map):  # only then: True == 1 would match an int key
            keys.append(value.strip().casefold() == "true")
    return keys


_INT_TEXT = re.compile(r"[+-]?\d+")


def _check_label_map_is_used(task: RegisteredTask, values: Sequence, label_map: Mapping) -> None:
    """A ``label_map`` none of whose keys is a value of the label column translates nothing: refused."""
    keys = set(task.label_map)
    present = set(v for v in values if isinstance(v, (str, int)))
    if not any(key in label_map for value in present for key in _map_keys(value, label_map)):
        raise ValueError(
            f"Task {task.name!r}: no key of label_map ({_shown(keys)}) is a value of the label column "
            f"{task.label_column!r} (it holds {_shown(sorted(set(map(repr, values)))[:_SHOWN])}); write the keys as "
            "the column holds them."
        )


def _label_ids(task: RegisteredTask, values: Sequence, label_map: Mapping, class_ids: bool = False) -> list[int]:
    """Label ids for raw label values, after ``label_map`` (see :func:`_map_keys`): text is a label word, else
    numeric text is an id into ``label_names``, as ints are. Where the label words are numbers themselves, an int,
    or numeric text that is no label word, could be either and is refused (a ``ClassLabel``'s ids, ``class_ids``,
    are ids), so a csv and a json of the same labels never read differently."""
    spec, column = task.spec, task.label_column
    index = {word.strip().casefold(): i for i, word in enumerate(spec.label_names)}  # distinct ignoring case
    numeric_words = any(_INT_TEXT.fullmatch(word.strip()) for word in spec.label_names)
    ids, bad, ambiguous = [], {}, {}
    for value in values:
        value = next((label_map[key] for key in _map_keys(value, label_map) if key in label_map), value)
        label = None
        if isinstance(value, str):
            label = index.get(value.strip().casefold())
            if label is None and _INT_TEXT.fullmatch(value.strip()):
                if numeric_words:
                    ambiguous.setdefault(repr(value), value)
                value = int(value.strip())  # an id written as text (csv/tsv cells are text)
        elif isinstance(value, int) and not isinstance(value, bool) and numeric_words and not class_ids:
            ambiguous.setdefault(repr(value), value)
        if label is None and isinstance(value, int) and not isinstance(value, bool):
            label = value if 0 <= value < spec.num_labels else None
        if label is None:
            bad.setdefault(repr(value), value)
        ids.append(label)
    if ambiguous:
        raise ValueError(
            f"Task {spec.name!r}: the label column {column!r} holds {_shown(ambiguous.values())}, which could be the "
            f"label word or the id into label_names {list(spec.label_names)}; write the label words as text, or give "
            "label_map= from each raw label to its word (e.g. {0: '1'})."
        )
    if bad:
        raise ValueError(
            f"Task {spec.name!r}: the label column {column!r} holds {_shown(bad.values())}, which "
            f"{'is' if len(bad) == 1 else 'are'} not among label_names {list(spec.label_names)} "
            f"(give label words, or int ids 0..{spec.num_labels - 1}; label_map= can translate raw labels)."
        )
    return ids
