"""Optuna's Tree-structured Parzen Estimator, one objective or several (`optuna_study.py`)."""

from __future__ import annotations

from typing import Any, ClassVar

import optuna

from evomerge.optim.base import Problem
from evomerge.optim.optuna_study import OptunaOptimizer
from evomerge.optim.settings import TPESettings


class TPEOptimizer(OptunaOptimizer):
    """TPE; with several objectives it is multi-objective TPE, told a list of values per trial."""

    name: ClassVar[str] = "tpe"

    def __init__(self, settings: TPESettings, problem: Problem):
        super().__init__(problem, settings.seed, {"n_startup_trials": settings.n_startup_trials})

    def _make_sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=int(self.settings["n_startup_trials"]))


def create(settings: TPESettings, problem: Problem) -> TPEOptimizer:
    """TPE as the spec's `optimizer:` section sets it."""
    return TPEOptimizer(settings, problem)


def __getattr__(name: str) -> Any:
    # NSGA-II lived in this module: snapshots pickled then name its classes here.
    if name in ("NSGA2Optimizer", "_SnapshotNSGAIISampler"):
        from evomerge.optim import nsga2

        return getattr(nsga2, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
