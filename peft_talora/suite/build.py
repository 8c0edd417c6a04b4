"""Building a task: deduplicate, split (stratified, fixed seed) and cache on disk; plus stratified subsampling.

:func:`load_task` returns a ``DatasetDict`` with ``train``/``validation``/``test`` splits of
``text``, ``label`` (a ``ClassLabel`` over the task's label words), ``task`` and ``label_word``.
The first call builds it from the task's source and saves it under
``<cache>/<task>`` (``<cache>`` = ``cache_dir`` or ``$PEFT_TALORA_CACHE/suite/v2`` or
``~/.cache/peft_talora/suite/v2``); later calls read that folder without touching the source.
A build writes a temporary folder and renames it into place under a file lock, so an
interrupted build never leaves a half-written cache. The cache is rebuilt when the source, the
label words, the seed or the split fractions change (a key stored in ``suite_task.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import datasets
import numpy as np

from ..smollm2 import default_cache_dir
from .builtin import BUILTIN_TASKS
from .tasks import RegisteredTask, column_values, registered_task

logger = logging.getLogger(__name__)

SUITE_VERSION = "v2"  # bump when a reader or the build changes what a cached task holds
SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
DEFAULT_SEED = 0
META_FILE = "suite_task.json"

PathLike = Union[str, os.PathLike]


def suite_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """The folder holding one sub-folder per built task."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return default_cache_dir() / "suite" / SUITE_VERSION


def load_task(
    name: str,
    cache_dir: Optional[PathLike] = None,
    *,
    seed: int = DEFAULT_SEED,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    rebuild: bool = False,
    progress: bool = True,
) -> datasets.DatasetDict:
    """The ``train``/``validation``/``test`` splits of task ``name``, built once and then read from the cache.

    ``cache_dir`` replaces the suite's cache folder (see :func:`suite_cache_dir`). ``seed`` and
    ``split_fractions`` (train, validation, test) fix the stratified split; changing them, the
    task's source or its label words rebuilds the cached copy. ``rebuild=True`` always rebuilds
    (e.g. after changing what a function source returns). ``progress`` shows a bar while building.
    """
    task = registered_task(name)
    fractions = _checked_fractions(split_fractions)
    key = _build_key(task, seed, fractions)
    target = suite_cache_dir(cache_dir) / name
    if not rebuild and _cached_key(target) == key:
        return datasets.load_from_disk(str(target))

    from filelock import FileLock  # a dependency of huggingface_hub and datasets

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{name}.lock")):
        if not rebuild and _cached_key(target) == key:  # another process built it while we waited
            return datasets.load_from_disk(str(target))
        splits, stats = build_task(task, seed=seed, split_fractions=fractions, progress=progress)
        _write_atomically(
            target, splits, {"task": name, "key": key, "seed": seed, "split_fractions": fractions, **stats}
        )
    return datasets.load_from_disk(str(target))


def load_suite(
    names: Optional[Sequence[str]] = None, cache_dir: Optional[PathLike] = None, **kwargs
) -> dict[str, datasets.DatasetDict]:
    """``{name: load_task(name, ...)}`` for ``names`` (default: the 12 built-in tasks)."""
    names = list(BUILTIN_TASKS if names is None else names)
    for name in names:
        registered_task(name)  # unknown names fail before anything is built
    return {name: load_task(name, cache_dir, **kwargs) for name in names}


def task_stats(name: str, cache_dir: Optional[PathLike] = None) -> dict:
    """What the last build of ``name`` recorded: rows read, dropped as empty/duplicate/conflicting, split sizes."""
    meta = _read_meta(suite_cache_dir(cache_dir) / name)
    if meta is None:
        raise ValueError(f"Task {name!r} has not been built in {suite_cache_dir(cache_dir)}; call load_task first.")
    return meta


# ----------------------------------------------------------------------------- the build
def build_task(
    task: RegisteredTask,
    *,
    seed: int = DEFAULT_SEED,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    progress: bool = True,
) -> tuple[datasets.DatasetDict, dict]:
    """Read, deduplicate and split ``task`` (no caching); returns the splits and build statistics."""
    from tqdm.auto import tqdm

    spec = task.spec
    fractions = _checked_fractions(split_fractions)
    with tqdm(total=4, desc=f"building {spec.name}", unit="step", disable=not progress, leave=False) as bar:
        bar.set_postfix_str("reading")
        pool = task.read()
        bar.update()
        bar.set_postfix_str("deduplicating")
        texts, labels, stats = deduplicate(column_values(pool, "text"), column_values(pool, "label"))
        if not texts:
            raise ValueError(f"Task {spec.name!r}: no rows are left after dropping empty texts and conflicting labels.")
        bar.update()
        bar.set_postfix_str("splitting")
        indices = stratified_split(labels, fractions, seed, task_name=spec.name, label_names=spec.label_names)
        bar.update()
        bar.set_postfix_str("assembling")
        features = datasets.Features(
            {
                "text": datasets.Value("string"),
                "label": datasets.ClassLabel(names=list(spec.label_names)),
                "task": datasets.Value("string"),
                "label_word": datasets.Value("string"),
            }
        )
        splits = datasets.DatasetDict()
        for split, rows in indices.items():
            split_labels = labels[rows]
            splits[split] = datasets.Dataset.from_dict(
                {
                    "text": [texts[i] for i in rows],
                    "label": split_labels.tolist(),
                    "task": [spec.name] * len(rows),
                    "label_word": [spec.label_names[i] for i in split_labels],
                },
                features=features,
            )
        bar.update()
    missing = [word for i, word in enumerate(spec.label_names) if not np.any(labels == i)]
    if missing:
        logger.warning("Task %r has no examples of the label(s) %s.", spec.name, missing)
    stats["split_sizes"] = {split: len(ds) for split, ds in splits.items()}
    stats["label_counts"] = {word: int(np.sum(labels == i)) for i, word in enumerate(spec.label_names)}
    stats["label_names"] = list(spec.label_names)
    logger.info("Built task %r: %s", spec.name, stats)
    return splits, stats


def deduplicate(texts: Sequence[str], labels: Sequence[int]) -> tuple[list[str], np.ndarray, dict]:
    """Strip texts, drop empty ones, keep the first copy of each text, and drop texts seen with two labels.

    Texts are compared with whitespace collapsed and case folded. Returns the kept texts, their
    labels (an int array) and counts of what was dropped.
    """
    import pandas as pd

    frame = pd.DataFrame({"text": pd.Series(list(texts), dtype="string").str.strip(), "label": list(labels)})
    empty = frame["text"].eq("")
    frame = frame[~empty]
    key = frame["text"].str.split().str.join(" ").str.casefold()
    conflicting = frame.groupby(key)["label"].transform("nunique").gt(1)
    repeated = key.duplicated()
    kept = frame[~conflicting & ~repeated]
    stats = {
        "rows_read": int(len(empty)),
        "empty_dropped": int(empty.sum()),
        "duplicates_dropped": int((repeated & ~conflicting).sum()),
        "conflicting_texts_dropped": int(key[conflicting].nunique()),
        "conflicting_rows_dropped": int(conflicting.sum()),
        "rows_kept": int(len(kept)),
    }
    return kept["text"].tolist(), kept["label"].to_numpy(dtype=np.int64), stats


def stratified_split(
    labels: np.ndarray,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = DEFAULT_SEED,
    *,
    task_name: str = "?",
    label_names: Optional[Sequence[str]] = None,
) -> dict[str, np.ndarray]:
    """Row indices of ``train``/``validation``/``test``: each label is split by ``fractions`` on its own.

    Every label present gets at least one row in each split, so each needs 3 rows or more. The
    same labels, fractions and seed always give the same indices; rows are shuffled within a split.
    """
    labels = np.asarray(labels)
    _, fraction_validation, fraction_test = _checked_fractions(fractions)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rows = rows[rng.permutation(len(rows))]
        count = len(rows)
        if count < len(SPLITS):
            word = label_names[label] if label_names is not None else label
            raise ValueError(
                f"Task {task_name!r}: label {word!r} has {count} example(s) after deduplication; every label needs "
                f"at least {len(SPLITS)} so that train, validation and test each get one."
            )
        n_validation = min(max(1, int(count * fraction_validation + 0.5)), count - 2)
        n_test = min(max(1, int(count * fraction_test + 0.5)), count - 1 - n_validation)
        n_train = count - n_validation - n_test
        parts["train"].append(rows[:n_train])
        parts["validation"].append(rows[n_train : n_train + n_validation])
        parts["test"].append(rows[n_train + n_validation :])
    out = {}
    for split in SPLITS:
        rows = np.concatenate(parts[split]) if parts[split] else np.zeros(0, dtype=np.int64)
        out[split] = rows[rng.permutation(len(rows))]
    return out


def subsample(dataset: datasets.Dataset, n: int, seed: int = 0, label_column: str = "label") -> datasets.Dataset:
    """``n`` rows of ``dataset`` with label proportions kept (largest remainders), fixed by ``seed``.

    Each label present gets at least one row when ``n`` allows; ``n >= len(dataset)`` returns the
    dataset unchanged. Rows come out shuffled.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"subsample needs a positive int n, got {n!r}.")
    if label_column not in dataset.column_names:
        raise ValueError(f"The dataset has no {label_column!r} column; columns are {dataset.column_names}.")
    if n >= len(dataset):
        return dataset
    labels = np.asarray(column_values(dataset, label_column))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / counts.sum()
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(-(quota - take), kind="stable")[: n - take.sum()]] += 1
    if n >= len(classes):  # a label left out borrows a row from the most over-served label with rows to spare
        for empty in np.flatnonzero(take == 0):
            donor = np.argmax(np.where(take >= 2, take - quota, -np.inf))
            take[donor] -= 1
            take[empty] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take) if k]
    rows = np.concatenate(picked)
    return dataset.select(rows[rng.permutation(len(rows))].tolist())


# ----------------------------------------------------------------------------- the cache
def _checked_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLITS) or any(f <= 0 for f in values) or abs(sum(values) - 1) > 1e-6:
        raise ValueError(
            f"split_fractions must be 3 positive numbers (train, validation, test) summing to 1, got {fractions}."
        )
    return values


def _build_key(task: RegisteredTask, seed: int, fractions: Sequence[float]) -> str:
    parts = [SUITE_VERSION, task.source_key(), str(int(seed)), ",".join(f"{f:.6f}" for f in fractions)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _read_meta(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def _cached_key(folder: Path) -> Optional[str]:
    meta = _read_meta(folder)
    return meta.get("key") if meta else None


def _write_atomically(target: Path, splits: datasets.DatasetDict, meta: dict) -> None:
    """Save ``splits`` and ``meta`` to a temporary folder beside ``target``, then rename it to ``target``.

    Call with the task's lock held: leftovers of interrupted builds are removed first.
    """
    root, name = target.parent, target.name
    for stale in [*root.glob(f".{name}.tmp-*"), *root.glob(f".{name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        _save_quietly(splits, tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        tmp.chmod(0o755)  # mkdtemp makes the folder private
        old = None
        if target.exists():
            old = root / f".{name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)  # `target` only ever appears complete
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_quietly(splits: datasets.DatasetDict, folder: Path) -> None:
    """``save_to_disk`` without its per-split progress bars (the build has its own)."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        splits.save_to_disk(str(folder))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
