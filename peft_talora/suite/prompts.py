"""Instruction prompts for a causal LM: chat template when the tokenizer has one, plain text otherwise.

The user turn is the task's instruction, the (middle-truncated) text and the list of label words;
the completion is the label word. With a chat template the completion follows the assistant
header directly (``"positive"``); in plain text it follows ``"Answer:"`` after a space
(``" positive"``). :func:`format_split` gives ``prompt``/``completion``/``task_ids`` rows for
:func:`peft_talora.training.collator.tokenize_for_causal_lm` (``task_ids`` holds task names: pass
``task_names=`` there, e.g. the TA-LoRA model or its config).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import datasets

from .tasks import TaskSpec, column_values, get_task, is_label_id

MIDDLE_MARKER = " [...] "
DEFAULT_MAX_TEXT_TOKENS = 256


def truncate_middle(
    texts: Sequence[str], tokenizer, max_tokens: Optional[int], marker: str = MIDDLE_MARKER
) -> list[str]:
    """Texts longer than ``max_tokens`` tokens keep their first and last tokens around ``marker``.

    Both halves are cut at token boundaries (character offsets with a fast tokenizer, decoding
    otherwise); the marker's own tokens are not counted. ``max_tokens=None`` leaves texts as they are.
    """
    texts = list(texts)
    if max_tokens is None or not texts:
        return texts
    if max_tokens < 2:
        raise ValueError(f"max_text_tokens must be at least 2 (a head and a tail), got {max_tokens}.")
    use_offsets = bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=use_offsets)
    head = (max_tokens + 1) // 2
    tail = max_tokens - head
    out = []
    for row, text in enumerate(texts):
        ids = encoded["input_ids"][row]
        if len(ids) <= max_tokens:
            out.append(text)
            continue
        if use_offsets:
            offsets = encoded["offset_mapping"][row]
            head_end = offsets[head - 1][1]
            tail_start = max(offsets[len(ids) - tail][0], head_end)
            first, last = text[:head_end], text[tail_start:]
        else:
            first, last = tokenizer.decode(ids[:head]), tokenizer.decode(ids[len(ids) - tail :])
        out.append(first.rstrip() + marker + last.lstrip())
    return out


class PromptFormatter:
    """Prompts and label completions of tasks for one tokenizer.

    ``use_chat_template=None`` uses the tokenizer's chat template when it has one.
    ``max_text_tokens`` truncates each text from the middle (``None``: never).
    ``system_prompt`` adds a system turn (otherwise the template's default, if any, applies).
    """

    def __init__(
        self,
        tokenizer,
        *,
        use_chat_template: Optional[bool] = None,
        max_text_tokens: Optional[int] = DEFAULT_MAX_TEXT_TOKENS,
        marker: str = MIDDLE_MARKER,
        system_prompt: Optional[str] = None,
    ):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True, but the tokenizer has no chat_template.")
        self.tokenizer = tokenizer
        self.use_chat_template = has_template if use_chat_template is None else bool(use_chat_template)
        self.max_text_tokens = max_text_tokens
        self.marker = marker
        self.system_prompt = system_prompt

    @staticmethod
    def user_message(spec: TaskSpec, text: str) -> str:
        options = ", ".join(spec.label_names)
        return f"{spec.instruction}\n\n{spec.text_field}: {text}\n\nAnswer with one of: {options}."

    def prompts(self, spec: TaskSpec, texts: Sequence[str]) -> list[str]:
        """One prompt per text, ready for the completion (the answer) to be appended."""
        texts = truncate_middle(texts, self.tokenizer, self.max_text_tokens, self.marker)
        messages = [self.user_message(spec, text) for text in texts]
        if not self.use_chat_template:
            return [f"{message}\nAnswer:" for message in messages]
        if not messages:
            return []
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        conversations = [[*system, {"role": "user", "content": message}] for message in messages]
        return list(self.tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True))

    def completion(self, word: str) -> str:
        """The completion text of a label word (a leading space after a plain-text "Answer:")."""
        return word if self.use_chat_template else f" {word}"

    def completions(self, spec: TaskSpec) -> list[str]:
        """The completion of every label of ``spec``, in label order."""
        return [self.completion(word) for word in spec.label_names]


def resolve_spec(dataset: datasets.Dataset, task: Union[str, TaskSpec, None]) -> TaskSpec:
    """The spec given as ``task``, or the one named by the dataset's single-valued ``task`` column."""
    if isinstance(task, TaskSpec):
        return task
    if isinstance(task, str):
        return get_task(task)
    if "task" not in dataset.column_names:
        raise ValueError("The dataset has no 'task' column; pass task= (a task name or TaskSpec).")
    names = sorted(set(column_values(dataset, "task")))
    if len(names) != 1:
        raise ValueError(
            f"The dataset holds {len(names)} tasks {names[:5]}; evaluate one task at a time or pass task=."
        )
    return get_task(names[0])


def format_split(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    task: Union[str, TaskSpec, None] = None,
    formatter: Optional[PromptFormatter] = None,
    **formatter_kwargs,
) -> datasets.Dataset:
    """``prompt``/``completion``/``task_ids`` (task name)/``label`` rows for a split of one or several tasks.

    Rows keep their order; each row is formatted with the spec named in its ``task`` column (or
    ``task`` for every row). ``formatter_kwargs`` go to :class:`PromptFormatter`.
    """
    formatter = formatter or PromptFormatter(tokenizer, **formatter_kwargs)
    if task is not None:
        spec = resolve_spec(dataset, task)
        row_tasks = [spec.name] * len(dataset)
        specs = {spec.name: spec}
    else:
        if "task" not in dataset.column_names:
            raise ValueError("The dataset has no 'task' column; pass task= (a task name or TaskSpec).")
        row_tasks = column_values(dataset, "task")
        specs = {name: get_task(name) for name in set(row_tasks)}
    texts, labels = column_values(dataset, "text"), column_values(dataset, "label")
    prompts: list[Optional[str]] = [None] * len(dataset)
    completions: list[Optional[str]] = [None] * len(dataset)
    for name, spec in specs.items():
        rows = [i for i, row_task in enumerate(row_tasks) if row_task == name]
        for i in rows:
            label = labels[i]
            if not is_label_id(label, len(spec.label_names)):
                raise ValueError(
                    f"Row {i} has label {label!r}, not an id of task {name!r}'s {len(spec.label_names)} labels "
                    f"(0..{len(spec.label_names) - 1}: {', '.join(spec.label_names)}); a completion cannot be made for "
                    "it (unlabelled rows are -1 in many datasets). Filter such rows out, or map the labels to these ids."
                )
        for i, prompt in zip(rows, formatter.prompts(spec, [texts[i] for i in rows])):
            prompts[i] = prompt
            completions[i] = formatter.completion(spec.label_names[labels[i]])
    return datasets.Dataset.from_dict(
        {"prompt": prompts, "completion": completions, "task_ids": list(row_tasks), "label": list(labels)}
    )
