"""Multi-task sampling: the empirical task distributions match the formulas of each strategy."""

import math

import pytest
import torch

from peft_talora.training.sampling import MultiTaskSampler, normalized_entropy, task_sampling_probabilities

COUNTS = [600, 300, 100]  # an imbalanced 3-task set
DRAWS = 20_000
TOL = 0.015  # > 4 standard deviations of a frequency estimated from 20k draws


def task_ids():
    # interleaved so that a task's examples are not contiguous
    ids = torch.tensor([t for t, n in enumerate(COUNTS) for _ in range(n)])
    return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]


def frequencies(sampler):
    indices = torch.tensor(list(sampler))
    assert len(indices) == DRAWS
    return torch.bincount(sampler.task_ids[indices], minlength=len(COUNTS)).double() / DRAWS


def expected(weights):
    total = sum(weights)
    return torch.tensor([w / total for w in weights], dtype=torch.float64)


def test_proportional_matches_task_sizes():
    sampler = MultiTaskSampler(task_ids(), "proportional", num_samples=DRAWS, seed=1)
    assert torch.allclose(sampler.probabilities, expected([0.6, 0.3, 0.1]))
    assert torch.allclose(frequencies(sampler), expected([0.6, 0.3, 0.1]), atol=TOL)


@pytest.mark.parametrize("temperature", [2.0, 3.0])
def test_temperature_matches_t5_formula(temperature):
    sampler = MultiTaskSampler(task_ids(), "temperature", temperature=temperature, num_samples=DRAWS, seed=2)
    want = expected([n ** (1 / temperature) for n in COUNTS])
    assert torch.allclose(sampler.probabilities, want)
    assert torch.allclose(frequencies(sampler), want, atol=TOL)
    # flatter than proportional, still ordered by size
    freq = frequencies(sampler)
    assert freq[0] < 0.6 - 3 * TOL and freq[2] > 0.1 + 3 * TOL and freq[0] > freq[1] > freq[2]


def test_temperature_one_is_proportional_and_large_temperature_is_uniform():
    proportional = MultiTaskSampler(task_ids(), "proportional", num_samples=DRAWS, seed=3)
    t1 = MultiTaskSampler(task_ids(), "temperature", temperature=1.0, num_samples=DRAWS, seed=3)
    assert torch.equal(t1.probabilities, proportional.probabilities)
    assert list(t1) == list(proportional)  # same seed, same probabilities: the same draws
    hot = MultiTaskSampler(task_ids(), "temperature", temperature=1000.0, num_samples=DRAWS, seed=3)
    assert torch.allclose(hot.probabilities, torch.full((3,), 1 / 3, dtype=torch.float64), atol=2e-3)
    assert torch.allclose(frequencies(hot), torch.full((3,), 1 / 3, dtype=torch.float64), atol=TOL)


def binary_entropy(p):
    return -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)


def test_uncertainty_follows_mean_normalised_entropy():
    sampler = MultiTaskSampler(task_ids(), "uncertainty", num_samples=DRAWS, seed=4)
    # before any update every task is maximally uncertain: uniform over tasks
    assert torch.allclose(sampler.probabilities, torch.full((3,), 1 / 3, dtype=torch.float64))
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.7, 0.3], [0.99, 0.01]])
    sampler.update_uncertainties([0, 1, 1, 2], probs=probs)
    u = [1.0, (binary_entropy(0.9) + binary_entropy(0.7)) / 2, binary_entropy(0.99)]
    assert torch.allclose(sampler.uncertainties, torch.tensor(u, dtype=torch.float64))
    assert torch.allclose(sampler.probabilities, expected(u))
    assert torch.allclose(frequencies(sampler), expected(u), atol=TOL)
    # logits give the same entropies as their softmax; tasks absent from an update keep their value
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    sampler.update_uncertainties([2, 2], logits)
    p = torch.softmax(logits[1].double(), -1)
    u[2] = (1.0 + float(-(p * p.log()).sum() / math.log(4))) / 2
    assert torch.allclose(sampler.uncertainties, torch.tensor(u, dtype=torch.float64))


def test_uncertainty_per_task_num_classes_momentum_and_floor():
    sampler = MultiTaskSampler(task_ids(), "uncertainty", uncertainty_momentum=0.5, min_uncertainty=0.01)
    # a 4-way distribution of task 1 is scored against its own 2 classes... and 8 for task 0
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    sampler.update_uncertainties([0, 1], probs=probs, num_classes=[8, 2, 2])
    assert torch.allclose(sampler.uncertainties, torch.tensor([0.5 * 1 + 0.5 * (2 / 3), 1.0, 1.0], dtype=torch.float64))
    sampler.update_uncertainties([2], entropies=torch.tensor([0.0]))
    assert sampler.uncertainties[2] == 0.5
    certain = MultiTaskSampler(task_ids(), "uncertainty", min_uncertainty=0.01)
    certain.update_uncertainties([0, 1, 2], entropies=torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(certain.probabilities, expected([1.0, 0.01, 0.01]))
    assert torch.allclose(normalized_entropy(torch.zeros(3, 5)), torch.ones(3, dtype=torch.float64))


def test_examples_within_a_task_are_uniform_and_draws_are_seeded():
    ids = task_ids()
    sampler = MultiTaskSampler(ids, "temperature", temperature=2.0, num_samples=DRAWS, seed=5)
    first = torch.tensor(list(sampler))  # epoch 0; iterating advances to epoch 1
    small = torch.nonzero(ids == 2).flatten()
    hits = torch.bincount(first, minlength=len(ids))[small].double()
    mean = hits.mean()  # ~ 20k * 0.193 / 100 = 39 draws per example
    assert hits.min() > 0 and ((hits - mean) ** 2 / mean).sum() < 100 + 4 * math.sqrt(200)  # chi-square, 99 dof
    assert torch.equal(torch.tensor(list(MultiTaskSampler(ids, "temperature", num_samples=DRAWS, seed=5))), first)
    second = torch.tensor(list(sampler))
    assert sampler.epoch == 2 and not torch.equal(first, second)
    sampler.set_epoch(0)
    assert torch.equal(torch.tensor(list(sampler)), first)


def test_probability_edge_cases_and_errors():
    assert task_sampling_probabilities([5, 0, 5], "temperature", temperature=4.0).tolist() == [0.5, 0.0, 0.5]
    assert task_sampling_probabilities([5, 0, 5], "uncertainty").tolist() == [0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match=r"Unknown task sampling strategy 'random'; choose one of \['proportional'"):
        MultiTaskSampler([0, 1], "random")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        task_sampling_probabilities([1, 2], "temperature", temperature=0)
    with pytest.raises(ValueError, match="task_ids has id 3 but num_tasks=2"):
        MultiTaskSampler([0, 3], "proportional", num_tasks=2)
    for refresh in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match=r"refresh_every must be a number of draws >= 1, or None"):
            MultiTaskSampler([0, 1], "uncertainty", refresh_every=refresh)
