"""Evaluating a causal LM on a task: rank classification by label log-likelihood, or greedy generation.

Both work on any causal LM or ``PeftModel``. ``task_id`` routes multi-task adapters (TA-LoRA,
MTL-LoRA, PEFT's multitask prompt tuning and Poly): an int (every row), a task name (the adapter's
``task_names``), or one per row; ``None`` passes no ``task_ids`` at all, as the base model, LoRA or
prompt tuning need. A ``task_id`` for a model that does not route by task, and none for an adapter
of several tasks, are refused (either would be silently ignored or fail deep in the forward). The
model runs under ``torch.no_grad()`` in eval mode and every module's training flag is restored afterwards.
Forward passes are batched (right-padded, sorted by length, only the needed logits computed);
rank classification reads every one-token label word from one pass over the prompt, and the
other tokens of longer label words from one short pass that continues that prompt's key/value
cache (or, for models whose cache cannot be continued, a pass per (example, label) pair).
"""

from __future__ import annotations

import functools
import inspect
import re
import string
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Union

import datasets
import numpy as np
import torch
from peft import PeftType
from peft.tuners.tuners_utils import BaseTunerLayer

from ..multitask import MultiTaskConfig
from ..training.collator import TaskIdEncoder, encode_prompts
from .intervals import Interval, TaskRuns, bootstrap_interval
from .prompts import DEFAULT_MAX_TEXT_TOKENS, PromptFormatter, resolve_spec
from .tasks import TaskSpec, column_values, is_label_id

TaskId = Union[int, str, Sequence[Union[int, str]], torch.Tensor, None]


@dataclass
class EvalResult:
    """Predictions and scores of one task. ``predictions`` are label ids, ``-1`` where generation matched none.

    Macro-F1 is the lead metric (accuracy on an imbalanced test set mostly measures the label prior:
    see ``docs/data.md``); :meth:`interval` gives either one a percentile-bootstrap interval over the
    test rows (:mod:`peft_talora.suite.intervals`), :meth:`summary` prints both.
    """

    task: str
    method: str
    accuracy: float
    macro_f1: float
    predictions: list[int]
    references: list[int]
    scores: Optional[torch.Tensor] = None  # (examples, labels) log-likelihoods, rank classification
    answers: Optional[list[str]] = None  # generated text, generation
    num_labels: Optional[int] = None  # the task's label count (macro-F1 averages over all of them)

    @property
    def unmatched(self) -> int:
        return sum(p < 0 for p in self.predictions)

    @property
    def labels(self) -> int:
        """The number of classes macro-F1 averages over (``num_labels``, else the largest label id seen + 1)."""
        if self.num_labels is not None:
            return int(self.num_labels)
        return max([*self.predictions, *self.references]) + 1

    def interval(self, metric: str = "macro_f1", **kwargs) -> Interval:
        """``metric`` with its percentile-bootstrap interval over the test rows (``kwargs``: resamples, confidence, seed)."""
        return bootstrap_interval([TaskRuns(self.references, self.predictions, self.labels)], metric, **kwargs)

    def metrics(self) -> dict:
        """Macro-F1 and accuracy with their 95% row-bootstrap intervals, counts, and the per-row predictions
        and references (so averages over tasks and paired differences can be bootstrapped later)."""
        out = {}
        for metric in ("macro_f1", "accuracy"):
            out[metric] = getattr(self, metric)
            if self.references:  # no rows, nothing to resample
                interval = self.interval(metric)
                out[f"{metric}_interval"] = [interval.low, interval.high]
            else:
                out[f"{metric}_interval"] = None
        return {
            **out,
            "n": len(self.references),
            "unmatched": self.unmatched,
            "num_labels": self.labels,
            "predictions": [int(p) for p in self.predictions],
            "references": [int(r) for r in self.references],
        }

    def summary(self) -> str:
        """One line: macro-F1 and accuracy in points with 95% intervals, the test-set size and one row's worth."""
        n = len(self.references)
        return (
            f"macro-F1 {self.interval('macro_f1').format()}  accuracy {self.interval('accuracy').format()}  "
            f"({n} test rows: one row = {100 / n:.1f} accuracy points)"
        )


@contextmanager
def evaluating(model: torch.nn.Module):
    """``model.eval()`` under ``torch.no_grad()``; every module's ``training`` flag is put back on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _task_config(model):
    """The active adapter's config when ``model`` routes examples by ``task_ids``, else ``None``."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    config = configs.get(getattr(model, "active_adapter", None))
    routes = isinstance(config, MultiTaskConfig)
    routes = routes or getattr(config, "peft_type", None) in (PeftType.MULTITASK_PROMPT_TUNING, PeftType.POLY)
    return config if routes else None


def _adapters_disabled(model) -> bool:
    """Inside ``with peft_model.disable_adapter():`` (the base model runs; no task is needed)."""
    if getattr(getattr(model, "base_model", None), "_enabled", True) is False:  # TA-LoRA's tuner
        return True
    return any(module.disable_adapters for module in model.modules() if isinstance(module, BaseTunerLayer))


def _row_task_ids(model, task_id: TaskId, rows: int) -> Optional[torch.Tensor]:
    """``task_id`` as a ``LongTensor`` of one id per row, or ``None`` (pass no ``task_ids``)."""
    config = _task_config(model)
    if task_id is None:
        if isinstance(config, MultiTaskConfig) and config.num_tasks > 1 and not _adapters_disabled(model):
            names = config.task_names or list(range(config.num_tasks))
            raise ValueError(
                f"This adapter routes each example to one of its {config.num_tasks} tasks: pass task_id= (a task "
                f"name or id for every row, or one per row), e.g. task_id={names[0]!r}."
            )
        return None
    if config is None:
        raise ValueError(
            f"task_id={task_id!r} was given, but {type(model).__name__} does not route by task (no TA-LoRA, MTL-LoRA, "
            "multitask prompt tuning or Poly adapter is active), so it would be ignored: drop task_id."
        )
    if isinstance(task_id, (torch.Tensor, np.ndarray)):
        values = task_id.reshape(-1).tolist()
    elif isinstance(task_id, (int, np.integer, str)):
        values = [task_id]
    else:
        values = list(task_id)
    if any(isinstance(v, str) for v in values):
        values = TaskIdEncoder.from_config(model).encode(values)
    if len(values) == 1:
        values = values * rows
    if len(values) != rows:
        raise ValueError(f"task_id must be one id or one per example ({rows}), got {len(values)}.")
    return torch.tensor(values, dtype=torch.long)


def _keeps_last_logits(model) -> bool:
    """Whether the (base) model's forward takes ``logits_to_keep``, so only the needed logits get computed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _batches(order: np.ndarray, batch_size: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield order[start : start + batch_size]


# ----------------------------------------------------------------------------- rank classification
def _prompt_continuation(model) -> Optional[str]:
    """Who continues a prompt's key/value cache with the label tokens: ``"model"`` (the model itself, task ids
    included), ``"base"`` (prompt tuning: its virtual tokens are in the cache, the base model goes on) or ``None``
    (other prompt-learning methods rebuild their prompt on every call: score pairs instead)."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return "model"
    if config.peft_type in (PeftType.PROMPT_TUNING, PeftType.MULTITASK_PROMPT_TUNING):
        return "base"
    return None


def _cache_argument(model) -> str:
    """The forward argument that takes a key/value cache: ``cache`` (recent transformers) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _plain_cache(cache) -> bool:
    """Whether ``cache`` holds every past key/value of every layer (right padding then only needs masking); a
    sliding-window or recurrent (linear-attention) layer would have folded the padding into its state."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _score_sharing_prompts(
    model, continuation: str, sequences, choice_ids, single, multi, row_tasks, pad: int, keep_logits: bool
):
    """Scores of one batch of prompts: ``(single (B, S), multi (B, M))``; ``multi`` is ``None`` when the cache
    cannot be continued (the one-token choices' scores are good either way).

    One pass over the right-padded prompts gives every choice's first token and the key/value cache; one pass
    over the multi-token choices' other tokens continues it, each prompt's cache repeated once per choice, with
    the padding masked and the position ids the choice tokens would have right after their prompt.
    """
    device = _device(model)
    rows = [torch.tensor(ids) for ids in sequences]
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad).to(device)
    batch, width = input_ids.shape
    lengths = torch.tensor([len(ids) for ids in sequences], device=device)
    attention_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True}
    if keep_logits:
        kwargs["logits_to_keep"] = int(width - lengths.min().item() + 1)
    if row_tasks is not None:
        kwargs["task_ids"] = row_tasks.to(device)
    output = model(**kwargs)
    cache = getattr(output, "cache", None)
    cache = getattr(output, "past_key_values", None) if cache is None else cache
    logit_index = lengths - 1 - width + output.logits.shape[1]
    first = output.logits[torch.arange(batch, device=device), logit_index].float().log_softmax(-1)  # (B, vocab)
    single_scores = first[:, torch.tensor([choice_ids[c][0] for c in single], dtype=torch.long, device=device)]
    if not _plain_cache(cache):
        return single_scores, None

    # every (example, multi-token choice) pair continues its example's cache with the choice's tokens but the last
    sizes = torch.tensor([len(choice_ids[c]) - 1 for c in multi], device=device)  # tokens fed, >= 1
    fed = int(sizes.max())
    steps = torch.arange(fed, device=device)
    valid = steps[None, :] < sizes[:, None]  # (M, fed)
    inputs = torch.tensor([choice_ids[c][:-1] + [pad] * (fed + 1 - len(choice_ids[c])) for c in multi], device=device)
    targets = torch.tensor([choice_ids[c][1:] + [pad] * (fed + 1 - len(choice_ids[c])) for c in multi], device=device)
    pairs = torch.arange(batch, device=device).repeat_interleave(len(multi))  # example of each pair
    cache.reorder_cache(pairs)
    virtual = cache.get_seq_length() - width  # prompt tuning's virtual tokens sit before the prompt
    past_mask = torch.cat([attention_mask.new_ones(batch, virtual), attention_mask], dim=1)[pairs]
    continued = {
        "input_ids": inputs.repeat(batch, 1),
        "attention_mask": torch.cat([past_mask, valid.long().repeat(batch, 1)], dim=1),
        "position_ids": (lengths[pairs] + virtual)[:, None] + steps[None, :],
        _cache_argument(model): cache,
    }
    if continuation == "base":
        logits = model.get_base_model()(**continued).logits
    else:
        if row_tasks is not None:
            continued["task_ids"] = row_tasks.to(device)[pairs]
        logits = model(**continued).logits
    token_scores = logits.float().log_softmax(-1).gather(-1, targets.repeat(batch, 1)[..., None]).squeeze(-1)
    rest = (token_scores * valid.repeat(batch, 1)).sum(-1).view(batch, len(multi))
    first_tokens = torch.tensor([choice_ids[c][0] for c in multi], device=device)
    return single_scores, first[:, first_tokens] + rest


def _log_probs_at(model, sequences, positions, row_tasks, pad: int, keep_logits: bool) -> torch.Tensor:
    """Next-token log-probabilities after ``positions`` of right-padded ``sequences``: ``(B, P, vocab)``.

    ``positions`` is ``(B, P)`` (input positions; the distribution *after* each). Only the logits
    from the earliest needed position on are computed when ``keep_logits`` (the model takes ``logits_to_keep``).
    """
    device = _device(model)
    rows = [torch.tensor(ids) for ids in sequences]
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad).to(device)
    width = input_ids.shape[1]
    lengths = torch.tensor([len(ids) for ids in sequences], device=device)
    attention_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    positions = positions.to(device)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if keep_logits:
        kwargs["logits_to_keep"] = int(width - positions.min().item())
    if row_tasks is not None:
        kwargs["task_ids"] = row_tasks.to(device)
    logits = model(**kwargs).logits
    # the logits end where the input ends (prompt tuning prepends virtual tokens, logits_to_keep drops the start)
    logit_index = positions - width + logits.shape[1]
    picked = logits[torch.arange(len(rows), device=device)[:, None], logit_index]
    return picked.float().log_softmax(-1)


def score_choices(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    task_id: TaskId = None,
    batch_size: int = 16,
    length_normalize: bool = False,
    share_prompt: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Log-likelihood of each choice after each prompt, shape ``(len(prompts), len(choices))``.

    Prompts are tokenised with the tokenizer's special tokens (one BOS, also after a chat template that
    writes it: :func:`~peft_talora.training.collator.encode_prompts`) and choices without, exactly as
    :func:`peft_talora.training.collator.tokenize_for_causal_lm` tokenises prompt and completion. A choice of
    several tokens scores the sum of their log-probabilities (the mean with ``length_normalize``).
    Choices of one token are all read from a single forward pass of the prompt. With ``share_prompt``, the
    other tokens of every longer choice come from one short pass that continues the prompt's key/value cache
    (about one prompt pass per example however many labels); without it, or for a model whose cache cannot be
    continued (prompt-learning methods other than prompt tuning, sliding-window or recurrent caches), each
    (example, choice) pair gets a forward pass of prompt + choice. Both give the same scores up to rounding.
    """
    prompt_ids = encode_prompts(tokenizer, prompts)
    choice_ids = tokenizer(list(choices), add_special_tokens=False)["input_ids"]
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("A prompt tokenises to no tokens; there is nothing to condition the label on.")
    empty = [c for c, ids in zip(choices, choice_ids) if not ids]
    if empty:
        raise ValueError(f"Choices {empty} tokenise to no tokens.")
    seen: dict[tuple, str] = {}
    for choice, ids in zip(choices, choice_ids):
        twin = seen.setdefault(tuple(ids), choice)
        if twin != choice:  # equal scores on every row: the first would always win
            raise ValueError(
                f"Choices {twin!r} and {choice!r} tokenise to the same tokens {list(ids)} (a tokenizer without "
                "byte fallback maps both to unknown tokens?), so no score can tell them apart; use label words "
                "the tokenizer knows, or method='generate'."
            )
    if not length_normalize:  # a longer choice adds log-probabilities <= 0 to a shorter one's: it could never win
        for short, short_ids in zip(choices, choice_ids):
            for long, long_ids in zip(choices, choice_ids):
                if len(long_ids) > len(short_ids) and long_ids[: len(short_ids)] == short_ids:
                    raise ValueError(
                        f"Choice {long!r} starts with the tokens of choice {short!r}, so its summed log-likelihood can "
                        f"never beat {short!r}'s: use label words that differ in their first tokens, "
                        "length_normalize=True, or method='generate'."
                    )
    n_examples, n_choices = len(prompt_ids), len(choice_ids)
    row_tasks = _row_task_ids(model, task_id, n_examples)
    pad, keep_logits = _pad_id(tokenizer), _keeps_last_logits(model)
    prompt_lengths = np.array([len(ids) for ids in prompt_ids])
    choice_lengths = np.array([len(ids) for ids in choice_ids])
    scores = torch.empty(n_examples, n_choices, dtype=torch.float32)

    def tasks_of(examples):
        return None if row_tasks is None else row_tasks[torch.as_tensor(examples)]

    with evaluating(model):
        single = np.flatnonzero(choice_lengths == 1)
        multi = np.flatnonzero(choice_lengths > 1)
        continuation = _prompt_continuation(model) if share_prompt and len(multi) else None
        pair_examples = np.arange(n_examples) if continuation is None else np.array([], dtype=int)
        if continuation is not None:  # one pass per example and one short continuation give every choice
            order = np.argsort(-prompt_lengths, kind="stable")
            need_single, unshared = [], []  # examples that still need the one-token pass, the pair passes
            for examples in _batches(order, batch_size, progress, "scoring labels"):
                if unshared:  # an earlier batch's cache could not be continued: neither can this one's
                    need_single.append(examples)
                    unshared.append(examples)
                    continue
                sequences = [prompt_ids[e] for e in examples]
                single_scores, multi_scores = _score_sharing_prompts(
                    model, continuation, sequences, choice_ids, single, multi, tasks_of(examples), pad, keep_logits
                )
                index = torch.as_tensor(examples)[:, None]
                scores[index, torch.as_tensor(single, dtype=torch.long)[None, :]] = single_scores.cpu()
                if multi_scores is None:  # sliding-window or recurrent cache: its pairs get passes of their own
                    unshared.append(examples)
                    continue
                scores[index, torch.as_tensor(multi)[None, :]] = multi_scores.cpu()
            pair_examples = np.concatenate(unshared) if unshared else np.array([], dtype=int)
            single_examples = np.concatenate(need_single) if need_single else np.array([], dtype=int)
        else:
            single_examples = np.arange(n_examples)
        if len(single) and len(single_examples):  # one pass per example gives every one-token choice
            single_tokens = torch.tensor([choice_ids[c][0] for c in single])
            order = single_examples[np.argsort(-prompt_lengths[single_examples], kind="stable")]  # similar lengths
            for examples in _batches(order, batch_size, progress, "scoring labels"):
                last = torch.as_tensor(prompt_lengths[examples] - 1)[:, None]
                sequences = [prompt_ids[e] for e in examples]
                log_probs = _log_probs_at(model, sequences, last, tasks_of(examples), pad, keep_logits)
                single_scores = log_probs[:, 0, single_tokens.to(log_probs.device)].cpu()
                scores[torch.as_tensor(examples)[:, None], torch.as_tensor(single)[None, :]] = single_scores

        if len(multi) and len(pair_examples):  # (example, choice) pairs, longest first
            pair_example = np.repeat(pair_examples, len(multi))
            pair_choice = np.tile(multi, len(pair_examples))
            order = np.argsort(-(prompt_lengths[pair_example] + choice_lengths[pair_choice]), kind="stable")
            for pairs in _batches(order, batch_size, progress, "scoring multi-token labels"):
                examples, options = pair_example[pairs], pair_choice[pairs]
                sizes = torch.as_tensor(choice_lengths[options])
                steps = torch.arange(int(sizes.max()))
                valid = steps[None, :] < sizes[:, None]
                # the token at prompt_length + k is predicted after position prompt_length + k - 1
                after = torch.as_tensor(prompt_lengths[examples] - 1)[:, None] + torch.where(valid, steps[None, :], 0)
                sequences = [prompt_ids[e] + choice_ids[c] for e, c in zip(examples, options)]
                targets = torch.tensor([choice_ids[c] + [pad] * (len(steps) - len(choice_ids[c])) for c in options])
                log_probs = _log_probs_at(model, sequences, after, tasks_of(examples), pad, keep_logits)
                token_scores = log_probs.gather(-1, targets.to(log_probs.device)[..., None]).squeeze(-1).cpu()
                scores[torch.as_tensor(examples), torch.as_tensor(options)] = (token_scores * valid).sum(-1)
    if length_normalize:
        scores = scores / torch.as_tensor(choice_lengths, dtype=torch.float32)[None, :]
    return scores


# ----------------------------------------------------------------------------- generation
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    task_id: TaskId = None,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens.

    PEFT's prompt tuning, P-tuning and multitask prompt tuning decode without a key/value cache: with one
    (PEFT 0.21, transformers 5) their greedy tokens differ from a forward per step. Prefix tuning is refused:
    its answers differ either way; score its labels with ``method="rank"``.
    """
    from transformers import GenerationConfig

    prompt_learning = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    if prompt_learning and model.active_peft_config.peft_type == PeftType.PREFIX_TUNING:
        raise ValueError(
            "Greedy generation with PEFT's prefix tuning does not match the model's own next-token choices in this "
            "PEFT/transformers pair, so its answers cannot be scored; use method='rank' (rank classification)."
        )
    prompt_ids = encode_prompts(tokenizer, prompts)
    row_tasks = _row_task_ids(model, task_id, len(prompt_ids))
    order = np.argsort(-np.array([len(ids) for ids in prompt_ids]), kind="stable")
    device, pad = _device(model), _pad_id(tokenizer)
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=model_eos if model_eos is not None else tokenizer.eos_token_id,
        use_cache=not prompt_learning,
    )
    answers: list[Optional[str]] = [None] * len(prompt_ids)
    with evaluating(model):
        for rows in _batches(order, batch_size, progress, "generating"):
            width = max(len(prompt_ids[r]) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids = prompt_ids[r]
                input_ids[i, width - len(ids) :] = torch.tensor(ids)
                attention_mask[i, width - len(ids) :] = 1
            kwargs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
            if row_tasks is not None:
                kwargs["task_ids"] = row_tasks[torch.as_tensor(rows)].to(device)
            output = model.generate(**kwargs, generation_config=config)
            for r, text in zip(rows, tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)):
                answers[r] = text
    return answers


_LEADING_NOISE = string.whitespace + string.punctuation


def match_label(answer: str, label_names: Sequence[str]) -> int:
    """The label whose word the answer starts with (longest word first), else the first one found in it; -1 if none.

    Only the answer's first line counts (a base model may go on to invent another question).
    """
    text = answer.strip().split("\n", 1)[0].lower().lstrip(_LEADING_NOISE)
    words = [w.lower() for w in label_names]
    for i in sorted(range(len(words)), key=lambda i: -len(words[i])):
        w = words[i]
        if text.startswith(w) and (len(text) == len(w) or not text[len(w)].isalnum()):
            return i
    found = [
        (m.start(), -len(w), i) for i, w in enumerate(words) if (m := re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text))
    ]
    return min(found)[2] if found else -1  # the first found; at one position the longest word ("world news")


# ----------------------------------------------------------------------------- metrics and the task loop
@functools.lru_cache(maxsize=None)
def _metric(name: str):
    from ..metrics import load_metric

    return load_metric(name)


def classification_metrics(predictions: Sequence[int], references: Sequence[int], num_labels: int) -> dict:
    """Macro-F1 and accuracy over the ``num_labels`` classes (a ``-1`` prediction counts as wrong).

    References must be ids in ``[0, num_labels)`` and predictions in ``[-1, num_labels)``: an id outside would count
    as right for accuracy and be left out of macro-F1.
    """
    predictions, references = [int(p) for p in predictions], [int(r) for r in references]
    _check_ids(references, predictions, num_labels)
    accuracy = _metric("accuracy").compute(predictions=predictions, references=references)["accuracy"]
    macro_f1 = _metric("f1").compute(
        predictions=predictions, references=references, labels=list(range(num_labels)), average="macro"
    )["f1"]
    return {"accuracy": float(accuracy), "macro_f1": float(macro_f1)}


def _check_ids(references: Sequence[int], predictions: Sequence[int], num_labels: int) -> None:
    """Refuse references outside ``[0, num_labels)`` and predictions outside ``[-1, num_labels)`` (``-1``: none)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; give one per row.")
    for kind, values, low in (("references", references, 0), ("predictions", predictions, -1)):
        outside = sorted({v for v in values if not low <= v < num_labels})
        if outside:
            raise ValueError(
                f"{kind} hold {outside[:5]}, outside [{low}, {num_labels}) for {num_labels} labels"
                + (" (-1: no label predicted)" if low < 0 else "")
                + "; pass label ids of the task."
            )


def _checked_references(dataset: datasets.Dataset, spec: TaskSpec) -> list[int]:
    """The ``label`` column as ids of ``spec``'s labels; a split that cannot be scored against them is refused
    (metrics over the spec's labels would silently drop the others)."""
    if len(dataset) == 0:
        raise ValueError(f"The {spec.name} split has no rows; there is nothing to evaluate.")
    if "task" in dataset.column_names:
        named = sorted(set(column_values(dataset, "task")) - {spec.name})
        if named:
            raise ValueError(
                f"The dataset's task column names {named}, but the rows are scored as task {spec.name!r}: pass the "
                "matching task= (or none, to take it from the column), or evaluate one task's rows at a time."
            )
    labels = column_values(dataset, "label")
    bad = sorted({repr(label) for label in labels if not is_label_id(label, len(spec.label_names))})
    if bad:
        raise ValueError(
            f"Labels {bad[:5]} are not ids of task {spec.name!r}'s {len(spec.label_names)} labels "
            f"(0..{len(spec.label_names) - 1}: {', '.join(spec.label_names)}); unlabelled rows (-1) or another "
            "task's labels cannot be scored. Filter them out, or map the labels to these ids."
        )
    return [int(label) for label in labels]


def evaluate_task(
    model,
    tokenizer,
    dataset: datasets.Dataset,
    *,
    task: Union[str, TaskSpec, None] = None,
    method: str = "rank",
    task_id: TaskId = None,
    batch_size: int = 16,
    length_normalize: bool = False,
    max_new_tokens: Optional[int] = None,
    max_text_tokens: Optional[int] = DEFAULT_MAX_TEXT_TOKENS,
    use_chat_template: Optional[bool] = None,
    system_prompt: Optional[str] = None,
    progress: bool = False,
) -> EvalResult:
    """Macro-F1 and accuracy of ``model`` on one task's split (``text``/``label`` rows).

        ``method="rank"`` picks the label word with the highest log-likelihood after the prompt;
        ``"generate"`` decodes greedily (``max_new_tokens``, default: the longest label + 12 tokens,
    room for an answer in a sentence)
        and matches the answer to a label word with :func:`match_label`. The task's spec comes from
        ``task`` or the dataset's ``task`` column; prompts are those of :class:`PromptFormatter`.
        The result keeps every row's prediction: ``result.summary()`` prints macro-F1 and accuracy
        with their bootstrap intervals over the test rows, ``result.metrics()`` is the JSON record.
    """
    if method not in ("rank", "generate"):
        raise ValueError(f"method must be 'rank' or 'generate', got {method!r}.")
    spec = resolve_spec(dataset, task)
    references = _checked_references(dataset, spec)
    formatter = PromptFormatter(
        tokenizer, use_chat_template=use_chat_template, max_text_tokens=max_text_tokens, system_prompt=system_prompt
    )
    prompts = formatter.prompts(spec, column_values(dataset, "text"))
    choices = formatter.completions(spec)
    scores, answers = None, None
    if method == "rank":
        scores = score_choices(
            model,
            tokenizer,
            prompts,
            choices,
            task_id=task_id,
            batch_size=batch_size,
            length_normalize=length_normalize,
            progress=progress,
        )
        predictions = scores.argmax(dim=1).tolist()
    else:
        if max_new_tokens is None:
            max_new_tokens = max(len(ids) for ids in tokenizer(choices, add_special_tokens=False)["input_ids"]) + 12
        answers = generate_answers(
            model,
            tokenizer,
            prompts,
            task_id=task_id,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        predictions = [match_label(answer, spec.label_names) for answer in answers]
    metrics = classification_metrics(predictions, references, spec.num_labels)
    return EvalResult(
        spec.name,
        method,
        metrics["accuracy"],
        metrics["macro_f1"],
        predictions,
        references,
        scores,
        answers,
        num_labels=spec.num_labels,
    )
