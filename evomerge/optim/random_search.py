"""Uniform random search over the box: the baseline every smarter optimizer must beat.

With a method gene it draws the method uniformly, then that method's genes (`choice.py`).

It ignores scores entirely, so failed trials need no handling. The generator lives on the
instance, which puts its state into the snapshot and keeps it independent of numpy's
global RNG.
"""

from __future__ import annotations

from collections import deque
from typing import ClassVar

import numpy as np

from evomerge.optim.base import Optimizer, Problem
from evomerge.optim.settings import RandomSettings


class RandomSearchOptimizer(Optimizer):
    """x0 first, then enqueued points, then independent uniform samples."""

    name: ClassVar[str] = "random"

    def __init__(self, settings: RandomSettings, problem: Problem):
        super().__init__(problem, settings.seed, {})
        self._rng = np.random.default_rng(self.seed)
        self._queue: deque[np.ndarray] = deque([self.x0])

    def _enqueue_point(self, x: np.ndarray) -> None:
        self._queue.append(x)

    def _propose(self, trial_id: int) -> np.ndarray:
        if self._queue:
            return self._queue.popleft()
        if self.choice is not None:
            return self.choice.sample_uniform(self._rng, self.lower, self.upper, self.x0)
        return self._rng.uniform(self.lower, self.upper)

    def _observe(self, trial_id: int, x: np.ndarray, score: float | None) -> None:
        pass  # scores cannot change where uniform sampling goes next


def create(settings: RandomSettings, problem: Problem) -> RandomSearchOptimizer:
    """Random search as the spec's `optimizer:` section sets it."""
    return RandomSearchOptimizer(settings, problem)
