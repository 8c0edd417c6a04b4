"""Data helpers for training TA-LoRA with the stock ``transformers.Trainer``.

- :class:`TaskIdEncoder` turns task names (or ids) into validated int ids of an adapter's tasks.
- :func:`tokenize_for_causal_lm` turns a ``datasets.Dataset`` of ``prompt``/``completion`` text into
  ``input_ids``/``attention_mask``/``labels``/``task_ids`` columns, prompt tokens masked from the loss.
- :class:`MultiTaskDataCollator` pads such rows (or tokenises raw text rows) into a batch.
- :func:`k_shot` picks ``k`` examples per label with a fixed seed.

``Trainer(remove_unused_columns=True)`` (the default) keeps only the columns named in the model's
``forward`` signature: ``input_ids``, ``attention_mask``, ``labels`` and ``task_ids`` survive, raw
text columns such as ``prompt``/``completion``/``prompt_length`` do not. ``MultiTaskTrainer`` (and so
``build_trainer``) keeps them too when its collator is this one; with a stock ``Trainer`` tokenise
first (:func:`tokenize_for_causal_lm`) or set ``remove_unused_columns=False``.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from ..multitask import MultiTaskConfig
from ..multitask.task_ids import resolve_task_ids, task_index

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- task ids
def _talora_config(source) -> MultiTaskConfig:
    """The multi-task config (TA-LoRA, MTL-LoRA) of a config, a ``PeftModel`` or a tuner (its active adapter)."""
    if isinstance(source, MultiTaskConfig):
        return source
    configs = getattr(getattr(source, "base_model", None), "peft_config", None)  # a PeftModel's tuner: its own
    if not isinstance(configs, dict):  # configs, not the view of an export running meanwhile (save with tasks=)
        configs = getattr(source, "peft_config", None)
    if isinstance(configs, dict):
        adapter = getattr(source, "active_adapter", None)
        config = configs.get(adapter) if adapter is not None else None
        if isinstance(config, MultiTaskConfig):
            return config
    raise TypeError(
        f"Expected a TALoraConfig/MTLLoraConfig or a model with an active multi-task adapter, got {type(source).__name__}."
    )


class TaskIdEncoder:
    """Maps task names or ids to the int ids of one adapter's tasks, validating both.

    Build it from the adapter's config or model (``TaskIdEncoder.from_config(model)``) or from
    ``task_names``/``num_tasks`` directly. Unknown names or out-of-range ids raise a
    ``ValueError`` that names the valid tasks (the messages of :mod:`peft_talora.multitask.task_ids`).
    """

    def __init__(self, task_names: Optional[Sequence[str]] = None, num_tasks: Optional[int] = None):
        self.task_names = list(task_names) if task_names is not None else None
        self.num_tasks = num_tasks if num_tasks is not None else len(self.task_names or [])
        if self.num_tasks < 1:
            raise ValueError("TaskIdEncoder needs task_names=[...] or num_tasks >= 1.")
        if self.task_names is not None and self.num_tasks != len(self.task_names):
            raise ValueError(
                f"TaskIdEncoder got num_tasks={self.num_tasks} and {len(self.task_names)} task_names; give one of "
                "them, or TaskIdEncoder.from_config(model) to take both from the adapter."
            )

    @classmethod
    def from_config(cls, source) -> "TaskIdEncoder":
        """From a ``TALoraConfig``, a ``PeftModel`` or a ``TALoraModel`` (active adapter)."""
        config = _talora_config(source)
        return cls(task_names=config.task_names, num_tasks=config.num_tasks)

    def encode_one(self, task: Union[int, str]) -> int:
        if isinstance(task, str):
            return task_index(task, self.task_names, self.num_tasks)
        return int(resolve_task_ids([task], batch_size=1, num_tasks=self.num_tasks, task_names=self.task_names)[0])

    def encode(self, tasks: Union[Sequence[Union[int, str]], torch.Tensor]) -> list[int]:
        """Ids for a sequence of task names and/or ids (one per example)."""
        if isinstance(tasks, np.ndarray):
            tasks = tasks.tolist()
        size = len(tasks)
        return resolve_task_ids(tasks, batch_size=size, num_tasks=self.num_tasks, task_names=self.task_names).tolist()

    __call__ = encode

    def encode_dataset(self, dataset, column: str = "task_ids", **map_kwargs):
        """A copy of ``dataset`` whose ``column`` holds int ids (``datasets.Dataset.map``, batched)."""
        if column not in dataset.column_names:
            raise ValueError(f"The dataset has no {column!r} column; columns are {dataset.column_names}.")
        return dataset.map(lambda batch: {column: self.encode(batch[column])}, batched=True, **map_kwargs)


def _encoder(task_names) -> Optional[TaskIdEncoder]:
    if task_names is None or isinstance(task_names, TaskIdEncoder):
        return task_names
    if isinstance(task_names, (list, tuple)):
        return TaskIdEncoder(task_names=task_names)
    return TaskIdEncoder.from_config(task_names)


def _encode_task_column(values: Sequence, encoder: Optional[TaskIdEncoder]) -> list[int]:
    if encoder is not None:
        return encoder.encode(values)
    if any(isinstance(v, str) for v in values):
        names = sorted({v for v in values if isinstance(v, str)})
        raise ValueError(
            f"task_ids holds task names {names[:5]}; pass task_names= (the adapter's TALoraConfig, the PEFT model "
            "or the list of names) so they can be mapped to ids."
        )
    if any(v is None for v in values):
        raise ValueError("Some examples have task_ids=None; every example needs a task.")
    bad = [v for v in values if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Integral, np.integer))]
    if bad:
        raise ValueError(
            f"task_ids must be int task ids (or task names, with task_names=); got {bad[0]!r} "
            f"({type(bad[0]).__name__}). Cast the column to int ids, e.g. TaskIdEncoder(...).encode_dataset(ds)."
        )
    return [int(v) for v in values]


# ----------------------------------------------------------------------------- tokenisation
def _pad_id(tokenizer, pad_token_id: Optional[int]) -> int:
    if pad_token_id is not None:
        return pad_token_id
    if tokenizer is not None:
        if tokenizer.pad_token_id is not None:
            return tokenizer.pad_token_id
        if tokenizer.eos_token_id is not None:
            return tokenizer.eos_token_id
    if tokenizer is None:
        raise ValueError(
            "No pad token: the collator has no tokenizer; pass the tokenizer (build_trainer(processing_class=...), "
            "MultiTaskDataCollator(tokenizer=...)) or pad_token_id=."
        )
    raise ValueError("No pad token: the tokenizer has neither pad_token_id nor eos_token_id; pass pad_token_id=.")


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's special tokens (BOS) unless the prompt already starts
    with the BOS text.

    Chat templates of Llama-3, Gemma and others write BOS themselves; tokenising such a prompt with
    ``add_special_tokens=True`` on a tokenizer that also adds BOS would start it with two, which the model
    never saw. ``apply_chat_template(tokenize=True)`` adds no special tokens for the same reason.
    """
    prompts = list(prompts)
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    bos = getattr(tokenizer, "bos_token", None)
    templated = [i for i, prompt in enumerate(prompts) if bos and prompt.startswith(bos)]
    if templated:
        plain = tokenizer([prompts[i] for i in templated], add_special_tokens=False)["input_ids"]
        for i, row in zip(templated, plain):
            ids[i] = row
    return [list(row) for row in ids]


def _encode_pairs(tokenizer, prompts, completions, add_eos: bool, max_length: Optional[int]):
    """``input_ids`` and ``labels`` (prompt masked) for prompt/completion texts tokenised separately.

    The prompt gets the tokenizer's special tokens (e.g. BOS; :func:`encode_prompts`), the completion none; EOS is
    appended to the completion when ``add_eos``. Truncation keeps the first ``max_length`` tokens;
    examples it leaves without a target token are counted in a warning (they would train nothing).
    """
    if tokenizer is None:
        raise ValueError(
            "Text features (prompt/completion) need a tokenizer: pass it as build_trainer(processing_class=...) or "
            "MultiTaskDataCollator(tokenizer=...)."
        )
    prompt_ids = encode_prompts(tokenizer, prompts)
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    all_ids, all_labels = [], []
    for p, c in zip(prompt_ids, completion_ids):
        ids = list(p) + list(c) + eos
        labels = [IGNORE_INDEX] * len(p) + list(c) + eos
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        all_ids.append(ids)
        all_labels.append(labels)
    emptied = sum(
        1 for c, labels in zip(completion_ids, all_labels) if (c or eos) and labels.count(IGNORE_INDEX) == len(labels)
    )
    if emptied:
        warnings.warn(
            f"{emptied} of {len(all_labels)} examples lost every target token to max_length={max_length}: their "
            "prompts fill it, so they train nothing (a batch of only such examples has a loss of 0/0). Raise "
            "max_length or shorten the prompts.",
            stacklevel=3,
        )
    return all_ids, all_labels


def _labels_from_prompt_length(input_ids, prompt_length: int) -> list[int]:
    return [IGNORE_INDEX] * min(prompt_length, len(input_ids)) + list(input_ids[prompt_length:])


def _pad_rows(rows: Sequence[Sequence[int]], value: int, width: int, side: str) -> list[list[int]]:
    out = []
    for row in rows:
        pad = [value] * (width - len(row))
        out.append(list(row) + pad if side == "right" else pad + list(row))
    return out


def _width(lengths, pad_to_multiple_of: Optional[int]) -> int:
    width = max(lengths) if lengths else 0
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return width


@dataclass
class MultiTaskDataCollator:
    """Collates causal-LM examples for TA-LoRA: prompt tokens masked out of the loss, padded, task ids kept.

    Each feature is either

    - text: ``prompt`` and ``completion`` strings (needs ``tokenizer``), or
    - tokenised: ``input_ids`` with ``labels`` (used as given) or ``prompt_length`` (the first
      ``prompt_length`` tokens are masked), or neither (every token is a target);

    plus an optional ``task_ids`` (int or task name; names need ``task_names``, which may be the
    list of names, the adapter's ``TALoraConfig`` or the PEFT model). Returns ``input_ids``,
    ``attention_mask``, ``labels`` (``-100`` on prompt and padding) and, when the features have
    them, ``task_ids`` as a ``LongTensor``. Pads on ``padding_side`` (right for training) with the
    tokenizer's pad token, falling back to its EOS token.
    """

    tokenizer: Any = None
    task_names: Any = None
    padding_side: str = "right"
    max_length: Optional[int] = None
    pad_to_multiple_of: Optional[int] = None
    pad_token_id: Optional[int] = None
    add_eos: bool = True
    task_column: str = "task_ids"
    return_tensors: str = "pt"

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}.")
        self._encoder = _encoder(self.task_names)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("MultiTaskDataCollator got an empty list of features.")
        first = features[0]
        if "input_ids" in first:
            input_ids = [list(f["input_ids"]) for f in features]
            if "labels" in first:
                labels = [list(f["labels"]) for f in features]
            elif "prompt_length" in first:
                labels = [
                    _labels_from_prompt_length(ids, int(f["prompt_length"])) for ids, f in zip(input_ids, features)
                ]
            else:
                labels = [list(ids) for ids in input_ids]
            masks = [
                list(f["attention_mask"]) if "attention_mask" in f else [1] * len(ids)
                for ids, f in zip(input_ids, features)
            ]
            if self.max_length is not None:
                cut = self.max_length
                input_ids, labels, masks = ([r[:cut] for r in rows] for rows in (input_ids, labels, masks))
        elif "prompt" in first and "completion" in first:
            prompts, completions = [f["prompt"] for f in features], [f["completion"] for f in features]
            input_ids, labels = _encode_pairs(self.tokenizer, prompts, completions, self.add_eos, self.max_length)
            masks = [[1] * len(ids) for ids in input_ids]
        else:
            raise ValueError(
                "MultiTaskDataCollator needs features with `input_ids` (and `labels` or `prompt_length`) or with "
                f"`prompt` and `completion` text; got keys {sorted(first)}. (With Trainer(remove_unused_columns=True) "
                "text columns are dropped before collation: tokenise first with tokenize_for_causal_lm.)"
            )
        for ids, lab in zip(input_ids, labels):
            if len(ids) != len(lab):
                raise ValueError(f"An example has {len(ids)} input_ids but {len(lab)} labels.")
        width = _width([len(ids) for ids in input_ids], self.pad_to_multiple_of)
        pad = _pad_id(self.tokenizer, self.pad_token_id)
        batch = {
            "input_ids": torch.tensor(_pad_rows(input_ids, pad, width, self.padding_side), dtype=torch.long),
            "attention_mask": torch.tensor(_pad_rows(masks, 0, width, self.padding_side), dtype=torch.long),
            "labels": torch.tensor(_pad_rows(labels, IGNORE_INDEX, width, self.padding_side), dtype=torch.long),
        }
        has_tasks = [self.task_column in f for f in features]
        if any(has_tasks):
            if not all(has_tasks):
                raise ValueError(
                    f"Some features have {self.task_column!r} and some do not; every example needs a task."
                )
            values = [f[self.task_column] for f in features]
            values = [v.item() if isinstance(v, (torch.Tensor, np.generic, np.ndarray)) else v for v in values]
            batch["task_ids"] = torch.tensor(_encode_task_column(values, self._encoder), dtype=torch.long)
        return batch


#: Where :func:`tokenize_for_causal_lm` moves an input ``task_ids`` column while it writes the ids.
_TASK_SOURCE = "_peft_talora_task_source"


def tokenize_for_causal_lm(
    dataset,
    tokenizer,
    *,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    task_column: Optional[str] = "task_ids",
    task_names: Any = None,
    max_length: Optional[int] = None,
    padding: Union[bool, str] = False,
    add_eos: bool = True,
    remove_columns: bool = True,
    pad_token_id: Optional[int] = None,
    **map_kwargs,
):
    """Tokenise a ``datasets.Dataset`` of prompt/completion text for causal-LM training.

    Returns a dataset with ``input_ids``, ``attention_mask``, ``labels`` (prompt tokens ``-100``)
    and, when ``task_column`` is present, ``task_ids`` as ints (names are mapped with
    ``task_names``: a list, the adapter's ``TALoraConfig`` or the PEFT model). Other columns are
    dropped when ``remove_columns``. ``padding=False`` leaves rows ragged (use
    :class:`MultiTaskDataCollator`); ``"longest"`` pads every row to the longest one and
    ``"max_length"`` to ``max_length`` (right side), so transformers' ``default_data_collator``
    works too.
    """
    if padding not in (False, "longest", "max_length"):
        raise ValueError(f"padding must be False, 'longest' or 'max_length', got {padding!r}.")
    if padding == "max_length" and max_length is None:
        raise ValueError("padding='max_length' needs max_length=.")
    for column in (prompt_column, completion_column):
        if column not in dataset.column_names:
            raise ValueError(f"The dataset has no {column!r} column; columns are {dataset.column_names}.")
    encoder = _encoder(task_names)
    has_tasks = task_column is not None and task_column in dataset.column_names
    if has_tasks:  # fail on unknown names before tokenising anything
        _encode_task_column(list(dataset[task_column]), encoder)
    if has_tasks and task_column == "task_ids":
        # datasets keeps an input column's type for an output column of its name: names read as (large) strings
        # would turn the ids back into text ("0"), which the collator would then read as a task name
        dataset = dataset.rename_column("task_ids", _TASK_SOURCE)
        task_column = _TASK_SOURCE

    def encode(batch):
        input_ids, labels = _encode_pairs(
            tokenizer, batch[prompt_column], batch[completion_column], add_eos, max_length
        )
        out = {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}
        if has_tasks:
            out["task_ids"] = _encode_task_column(batch[task_column], encoder)
        return out

    drop = list(dataset.column_names) if remove_columns else [c for c in (task_column,) if has_tasks]
    drop = [c for c in drop if c in dataset.column_names]
    result = dataset.map(encode, batched=True, remove_columns=drop, **map_kwargs)
    if padding:
        width = max_length if padding == "max_length" else max(len(ids) for ids in result["input_ids"])
        pad = _pad_id(tokenizer, pad_token_id)

        def pad_batch(batch):
            return {
                "input_ids": _pad_rows(batch["input_ids"], pad, width, "right"),
                "attention_mask": _pad_rows(batch["attention_mask"], 0, width, "right"),
                "labels": _pad_rows(batch["labels"], IGNORE_INDEX, width, "right"),
            }

        result = result.map(pad_batch, batched=True, **map_kwargs)
    return result


# ----------------------------------------------------------------------------- few-shot
def k_shot(dataset, k: int, label_column: str = "label", seed: int = 0):
    """``k`` examples of every label, picked with a fixed seed (same inputs, same rows).

    Works on a ``datasets.Dataset`` (returns ``dataset.select(...)``) or a list of dicts (returns
    a list). Rows come out grouped by label (labels in sorted order), shuffled within a label.
    Raises a ``ValueError`` naming every label with fewer than ``k`` examples.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    if isinstance(dataset, list):
        labels = [row[label_column] for row in dataset]
    else:
        if label_column not in dataset.column_names:
            raise ValueError(f"The dataset has no {label_column!r} column; columns are {dataset.column_names}.")
        labels = list(dataset[label_column])
    by_label: dict[Any, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    short = {label: len(rows) for label, rows in by_label.items() if len(rows) < k}
    if short:
        raise ValueError(
            f"k_shot(k={k}) needs {k} examples of every label, but these labels have fewer: "
            + ", ".join(f"{label!r} ({n})" for label, n in sorted(short.items(), key=lambda kv: str(kv[0])))
            + "."
        )
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for label in sorted(by_label, key=lambda x: (str(type(x)), x)):
        rows = by_label[label]
        picked.extend(rows[j] for j in rng.permutation(len(rows))[:k])
    if isinstance(dataset, list):
        return [dataset[i] for i in picked]
    return dataset.select(picked)


#: The collator's name before 0.2.0 (it serves every multi-task tuner of the package, not only TA-LoRA).
TALoraDataCollator = MultiTaskDataCollator
