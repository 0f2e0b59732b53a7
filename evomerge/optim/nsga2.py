"""Optuna's NSGA-II for several objectives, on the same in-memory study and snapshots as TPE
(`optuna_study.py`)."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import optuna

from evomerge.optim.base import Problem
from evomerge.optim.optuna_study import OptunaOptimizer
from evomerge.optim.settings import NSGA2Settings


class NSGA2Optimizer(OptunaOptimizer):
    """NSGA-II: generations of ``population_size`` individuals, told a list of values per trial."""

    name: ClassVar[str] = "nsga2"

    def __init__(self, settings: NSGA2Settings, problem: Problem):
        super().__init__(problem, settings.seed, {"population_size": settings.population})

    def _make_sampler(self) -> optuna.samplers.BaseSampler:
        return _SnapshotNSGAIISampler(seed=self.seed, population_size=int(self.settings["population_size"]))


def create(settings: NSGA2Settings, problem: Problem) -> NSGA2Optimizer:
    """NSGA-II as the spec's `optimizer:` section sets it."""
    return NSGA2Optimizer(settings, problem)


class _SnapshotNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II whose state pickles: Optuna's genetic samplers hold a thread lock that pickle refuses."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()
