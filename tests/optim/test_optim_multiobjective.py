"""Multi-objective optimizers (NSGA-II, multi-objective TPE): the same contract with lists of scores."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.optim import Optimizer, make_optimizer
from evomerge.rundir.pareto import dominates, pareto_front

DIM = 4


def objectives(x: np.ndarray) -> list[float]:
    # Two conflicting goals: be near the origin, be near the all-ones corner.
    return [-float(np.sum(x**2)), -float(np.sum((x - 1) ** 2))]


def build(name: str, seed: int = 0, **settings) -> Optimizer:
    return make_optimizer(name, np.zeros(DIM), np.ones(DIM), np.full(DIM, 0.5), seed, objectives=2, **settings)


def drive(optimizer: Optimizer, rounds: int, fail_every: int = 0) -> list[np.ndarray]:
    asked = []
    for round_index in range(rounds):
        ask = optimizer.ask()
        asked.append(ask.x)
        failed = fail_every and round_index % fail_every == fail_every - 1
        optimizer.tell(ask.trial_id, None if failed else objectives(ask.x))
    return asked


@pytest.mark.parametrize("name", ["nsga2", "tpe"])
def test_seeded_reproducible_and_restorable(name):
    first, second = build(name, seed=3), build(name, seed=3)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(drive(first, 20, fail_every=7), drive(second, 20, fail_every=7), strict=False)
    )
    restored = Optimizer.restore(first.snapshot())
    assert np.array_equal(restored.ask().x, first.ask().x)


def test_pareto_front_is_exactly_the_non_dominated_set():
    rng = np.random.default_rng(0)
    points = {i: list(rng.random(2)) for i in range(60)}
    front = set(pareto_front(points))
    for i, p in points.items():
        dominated = any(dominates(q, p) for j, q in points.items() if j != i)
        assert (i in front) == (not dominated)
