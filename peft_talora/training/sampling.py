"""Multi-task sampling for imbalanced tasks, and a ``Trainer`` that uses it.

Each draw first picks a task ``t`` with probability ``p_t``, then an example of that task
uniformly. With ``n_t`` examples of task ``t``:

- ``"proportional"``: ``p_t = n_t / sum n``  (what uniform sampling over examples gives),
- ``"temperature"`` (T5): ``p_t ∝ n_t ** (1 / T)``; ``T = 1`` is proportional, large ``T`` tends to uniform,
- ``"uncertainty"`` (in the spirit of CA-MTL): ``p_t ∝ U_t``, the mean normalised prediction
  entropy ``H / log(num_classes)`` of task ``t``, fed with :meth:`MultiTaskSampler.update_uncertainties`.
  Before any update every task has ``U_t = 1`` (uniform over tasks). ``U_t`` is floored at
  ``min_uncertainty`` so that a task the model is sure about is still visited now and then.

:class:`MultiTaskSampler` is a ``torch.utils.data.Sampler`` (vectorised, seeded by ``seed`` and the
epoch); :class:`MultiTaskTrainer` is ``transformers.Trainer`` with a ``task_sampling=`` argument.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch.utils.data import Sampler

STRATEGIES = ("proportional", "temperature", "uncertainty")


def task_sampling_probabilities(
    task_counts: Union[Sequence[int], torch.Tensor],
    strategy: str = "temperature",
    *,
    temperature: float = 2.0,
    uncertainties: Optional[Union[Sequence[float], torch.Tensor]] = None,
    min_uncertainty: float = 1e-3,
) -> torch.Tensor:
    """Per-task sampling probabilities ``(T,)`` (float64) of ``strategy``; tasks with no examples get 0."""
    counts = torch.as_tensor(task_counts, dtype=torch.float64)
    if counts.dim() != 1 or (counts < 0).any():
        raise ValueError(f"task_counts must be a 1-d sequence of non-negative counts, got {task_counts}.")
    present = counts > 0
    if not present.any():
        raise ValueError("No task has any example.")
    if strategy == "proportional":
        weights = counts
    elif strategy == "temperature":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        weights = torch.where(present, counts.clamp(min=1) ** (1.0 / temperature), torch.zeros_like(counts))
    elif strategy == "uncertainty":
        u = torch.ones_like(counts) if uncertainties is None else torch.as_tensor(uncertainties, dtype=torch.float64)
        if u.shape != counts.shape:
            raise ValueError(
                f"uncertainties has shape {tuple(u.shape)}, expected one value per task {tuple(counts.shape)}."
            )
        weights = torch.where(present, u.clamp(min=min_uncertainty), torch.zeros_like(counts))
    else:
        raise ValueError(f"Unknown task sampling strategy {strategy!r}; choose one of {list(STRATEGIES)}.")
    return weights / weights.sum()


def _entropy(logits: Optional[torch.Tensor], probs: Optional[torch.Tensor]) -> torch.Tensor:
    """Entropy in nats over the last dim (float64) of ``softmax(logits)`` or of ``probs``."""
    if (logits is None) == (probs is None):
        raise ValueError("Pass exactly one of logits= or probs=.")
    if logits is not None:
        log_p = torch.log_softmax(logits.double(), dim=-1)
        return -(log_p.exp() * log_p).sum(-1)
    p = probs.double()
    return -torch.where(p > 0, p * p.clamp(min=1e-300).log(), torch.zeros_like(p)).sum(-1)


def normalized_entropy(
    logits: Optional[torch.Tensor] = None, *, probs: Optional[torch.Tensor] = None, num_classes: Optional[int] = None
) -> torch.Tensor:
    """Entropy of the predictive distribution over the last dim, divided by ``log(num_classes)`` (in ``[0, 1]``).

    ``num_classes`` defaults to the size of the last dim; pass the task's own number of classes
    when the distribution covers a larger space (e.g. a vocabulary).
    """
    entropy = _entropy(logits, probs)
    classes = num_classes if num_classes is not None else (logits if logits is not None else probs).shape[-1]
    if classes < 2:
        return torch.zeros_like(entropy)
    return entropy / math.log(classes)


class MultiTaskSampler(Sampler[int]):
    """Samples example indices task-first: task ``t`` with probability ``p_t``, then an example of ``t``.

    ``task_ids``: the task id of every example (ints ``0..T-1``). ``num_samples`` draws per epoch
    (default: the number of examples), with replacement. Epoch ``e`` draws with a generator seeded
    by ``seed + e``, so the order is reproducible (and identical on every process of a distributed
    run). ``Trainer`` calls :meth:`set_epoch`; iterating also advances the epoch.
    For ``"uncertainty"`` the probabilities are recomputed every ``refresh_every`` draws from the
    current uncertainties (default: at the start of every epoch).
    """

    def __init__(
        self,
        task_ids: Union[Sequence[int], torch.Tensor],
        strategy: str = "temperature",
        *,
        temperature: float = 2.0,
        num_tasks: Optional[int] = None,
        num_samples: Optional[int] = None,
        seed: int = 0,
        min_uncertainty: float = 1e-3,
        uncertainty_momentum: float = 0.0,
        refresh_every: Optional[int] = None,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown task sampling strategy {strategy!r}; choose one of {list(STRATEGIES)}.")
        task_ids = torch.as_tensor(task_ids, dtype=torch.long).flatten()
        if task_ids.numel() == 0:
            raise ValueError("MultiTaskSampler got no examples.")
        if (task_ids < 0).any():
            raise ValueError("task_ids must be non-negative ints.")
        self.num_tasks = int(num_tasks) if num_tasks is not None else int(task_ids.max()) + 1
        if int(task_ids.max()) >= self.num_tasks:
            raise ValueError(f"task_ids has id {int(task_ids.max())} but num_tasks={self.num_tasks}.")
        if not 0.0 <= uncertainty_momentum < 1.0:
            raise ValueError(f"uncertainty_momentum must be in [0, 1), got {uncertainty_momentum}.")
        if refresh_every is not None and (
            not isinstance(refresh_every, numbers.Integral) or isinstance(refresh_every, bool) or refresh_every < 1
        ):
            raise ValueError(
                f"refresh_every must be a number of draws >= 1, or None (refresh once per epoch); got {refresh_every!r}."
            )
        self.strategy = strategy
        self.temperature = temperature
        self.seed = int(seed)
        self.epoch = 0
        self.min_uncertainty = min_uncertainty
        self.uncertainty_momentum = uncertainty_momentum
        self.num_samples = int(num_samples) if num_samples is not None else task_ids.numel()
        self.refresh_every = refresh_every
        self.task_ids = task_ids
        self.task_counts = torch.bincount(task_ids, minlength=self.num_tasks)
        # examples grouped by task: indices of task t are _order[_starts[t] : _starts[t] + n_t]
        self._order = torch.argsort(task_ids, stable=True)
        self._starts = torch.cumsum(self.task_counts, 0) - self.task_counts
        self.uncertainties = torch.ones(self.num_tasks, dtype=torch.float64)
        # the chunks of the epoch in progress: how many were drawn, and (first chunk, uncertainties) wherever the
        # uncertainties they were drawn with changed (a checkpoint's replay; small however many chunks there are)
        self._drawn_epoch, self._drawn_chunks = 0, 0
        self._drawn_with: list[tuple[int, torch.Tensor]] = []
        self._replay: Optional[dict] = None  # a checkpoint's state_dict, replayed by the next __iter__ of its epoch
        task_sampling_probabilities(self.task_counts, strategy, temperature=temperature)  # validate early

    # ----------------------------------------------------------------- probabilities
    @property
    def probabilities(self) -> torch.Tensor:
        """The current per-task probabilities ``p_t`` (float64, sums to 1)."""
        return task_sampling_probabilities(
            self.task_counts,
            self.strategy,
            temperature=self.temperature,
            uncertainties=self.uncertainties,
            min_uncertainty=self.min_uncertainty,
        )

    @torch.no_grad()
    def update_uncertainties(
        self,
        task_ids: Union[Sequence[int], torch.Tensor],
        logits: Optional[torch.Tensor] = None,
        *,
        probs: Optional[torch.Tensor] = None,
        entropies: Optional[torch.Tensor] = None,
        num_classes: Optional[Union[int, Sequence[int]]] = None,
    ) -> torch.Tensor:
        """Set each task's uncertainty to the mean normalised entropy of its predictions in this call.

        Give per-example predictions as ``logits`` or ``probs`` ``(N, C)``, or already normalised
        ``entropies`` ``(N,)``; ``task_ids`` ``(N,)``. ``num_classes``: one int for all tasks, one per
        task, or ``None`` for ``C``. Tasks absent from the call keep their value. With
        ``uncertainty_momentum = m`` the stored value becomes ``m * old + (1 - m) * new``.
        Returns the uncertainties.
        """
        task_ids = torch.as_tensor(task_ids, dtype=torch.long).flatten().cpu()
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.num_tasks):
            raise ValueError(f"task_ids must be in 0..{self.num_tasks - 1}.")
        if entropies is None:
            if num_classes is None or isinstance(num_classes, int):
                entropies = normalized_entropy(logits, probs=probs, num_classes=num_classes)
            else:
                per_task = torch.as_tensor(list(num_classes), dtype=torch.float64)
                if per_task.numel() != self.num_tasks:
                    raise ValueError(f"num_classes has {per_task.numel()} entries for {self.num_tasks} tasks.")
                raw = _entropy(logits, probs).cpu()
                classes = per_task[task_ids]
                entropies = torch.where(classes > 1, raw / classes.clamp(min=2).log(), torch.zeros_like(raw))
        entropies = torch.as_tensor(entropies, dtype=torch.float64).flatten().cpu()
        if entropies.shape != task_ids.shape:
            raise ValueError(f"Got {entropies.numel()} predictions for {task_ids.numel()} task ids.")
        sums, counts = self.task_totals(task_ids, entropies)
        return self.update_from_totals(sums, counts)

    def task_totals(self, task_ids: torch.Tensor, entropies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task sums of ``entropies`` and counts of predictions, ``(T,)`` each: what several processes
        add up (all-reduce) so that every one of them applies the same update."""
        task_ids = torch.as_tensor(task_ids, dtype=torch.long).flatten()
        entropies = torch.as_tensor(entropies, dtype=torch.float64).flatten().to(task_ids.device)
        sums = torch.zeros(self.num_tasks, dtype=torch.float64, device=task_ids.device)
        counts = torch.zeros(self.num_tasks, dtype=torch.float64, device=task_ids.device)
        return sums.index_add_(0, task_ids, entropies), counts.index_add_(0, task_ids, torch.ones_like(entropies))

    @torch.no_grad()
    def update_from_totals(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Set each task with ``counts > 0`` to its mean entropy ``sums / counts`` (with the momentum), as
        :meth:`update_uncertainties` does; returns the uncertainties."""
        sums, counts = sums.detach().double().cpu(), counts.detach().double().cpu()
        if sums.shape != (self.num_tasks,) or counts.shape != (self.num_tasks,):
            raise ValueError(f"sums and counts must have shape ({self.num_tasks},), got {sums.shape}, {counts.shape}.")
        seen = counts > 0
        means = sums[seen] / counts[seen]
        m = self.uncertainty_momentum
        self.uncertainties[seen] = m * self.uncertainties[seen] + (1 - m) * means
        return self.uncertainties.clone()

    # ----------------------------------------------------------------- sampling
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """``num_samples`` example indices drawn with the current probabilities (vectorised)."""
        tasks = torch.multinomial(self.probabilities, num_samples, replacement=True, generator=generator)
        counts = self.task_counts[tasks]
        offsets = (torch.rand(num_samples, generator=generator, dtype=torch.float64) * counts).long()
        offsets = torch.minimum(offsets, counts - 1)
        return self._order[self._starts[tasks] + offsets]

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        chunk = self.num_samples
        if self.strategy == "uncertainty" and self.refresh_every:
            chunk = max(1, int(self.refresh_every))
        replay = self._replay if self._replay is not None and self._replay["epoch"] == self.epoch else None
        replayed = replay["chunks"] if replay else 0  # a resumed epoch draws these chunks as the first run did
        changes = dict(replay["drawn_with"]) if replay else {}
        self._replay, self._drawn_with, self._drawn_epoch, self._drawn_chunks = None, [], self.epoch, 0
        current, then = self.uncertainties, None
        remaining = self.num_samples
        while remaining > 0:
            size = min(chunk, remaining)
            chunk_index = self._drawn_chunks
            if chunk_index < replayed:
                then = changes.get(chunk_index, then)
                self.uncertainties = then.clone()
            if not self._drawn_with or not torch.equal(self._drawn_with[-1][1], self.uncertainties):
                self._drawn_with.append((chunk_index, self.uncertainties.clone()))
            self._drawn_chunks += 1
            indices = self.sample(size, generator).tolist()
            if self._drawn_chunks == replayed:  # the last replayed chunk: the checkpoint's own values from here on
                self.uncertainties = current
            yield from indices
            remaining -= size
        self.epoch += 1

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """What a resumed run needs to draw the same stream: the uncertainties, and for the epoch in progress the
        uncertainties each of its chunks was drawn with (the resumed run regenerates the batches it skips)."""
        return {
            "strategy": self.strategy,
            "num_tasks": self.num_tasks,
            "epoch": self._drawn_epoch,
            "uncertainties": self.uncertainties.clone(),
            "chunks": self._drawn_chunks,
            "drawn_with": [(index, u.clone()) for index, u in self._drawn_with],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the same strategy and tasks); the next ``__iter__`` of the saved epoch
        replays its chunks' draws."""
        if state.get("strategy") != self.strategy or state.get("num_tasks") != self.num_tasks:
            raise ValueError(
                f"The checkpoint's task sampler used strategy {state.get('strategy')!r} over {state.get('num_tasks')} "
                f"tasks; this run uses {self.strategy!r} over {self.num_tasks}. Resume with the same task_sampling and "
                "training set, or start a new run."
            )
        self.uncertainties = torch.as_tensor(state["uncertainties"], dtype=torch.float64).clone()
        drawn = [(int(index), torch.as_tensor(u, dtype=torch.float64)) for index, u in state.get("drawn_with", [])]
        # used only if that epoch is drawn again (it was unfinished)
        self._replay = {"epoch": int(state["epoch"]), "chunks": int(state.get("chunks", 0)), "drawn_with": drawn}
