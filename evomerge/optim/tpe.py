"""Optuna's TPE and NSGA-II samplers behind the ask/tell contract.

Design choices:

* **Primary study in memory.** The study that drives sampling uses ``InMemoryStorage``,
  which pickles (it drops only its lock), so a snapshot carries every trial *and* the
  sampler's RNG state and the next ask after restore is bit-identical. A database or
  journal as the primary would hold state outside the snapshot.
* **Asynchronous.** ``ask`` never returns None; Optuna 5's TPE defaults to
  ``constant_liar=True``, which treats running trials as bad so concurrent asks spread out.
* **Failures are FAIL trials, not penalties.** Most failures here are infrastructure
  (an OOM, a lost worker) and say nothing about the recipe; TPE ignores FAIL trials,
  whereas a made-up penalty value would be fitted as real evidence, and would show up in
  the dashboard's plots and ``best_value`` as if it were measured.
* **No storage of its own.** The run's Optuna file for optuna-dashboard
  (runs/NAME/optuna.log) is written by the search for every optimizer, from the journal, in
  the genes' real units (``evomerge.search.study_log``). Snapshots taken while this class
  still mirrored to it restore as before: the old mirror's settings are ignored.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState

from evomerge.optim.base import Optimizer


def param_names(dim: int) -> list[str]:
    """Optuna parameter names for genome coordinates; zero-padded so they sort in genome order."""
    return [f"x{i:04d}" for i in range(dim)]


class TPEOptimizer(Optimizer):
    """Tree-structured Parzen Estimator; x0 is the first trial, enqueued points follow."""

    name: ClassVar[str] = "tpe"
    default_settings: ClassVar[dict[str, Any]] = {
        "n_startup_trials": 10,  # random trials before TPE starts modelling
        "study_name": "evomerge",
        "objectives": 1,  # several: multi-objective TPE, told a list of values per trial
    }

    def __init__(self, lower, upper, x0, seed: int, **settings):
        super().__init__(lower, upper, x0, seed, **settings)
        self._names = param_names(self.dim)
        self._distributions: dict[str, BaseDistribution] = {
            name: FloatDistribution(float(lo), float(hi))
            for name, lo, hi in zip(self._names, self.lower, self.upper, strict=False)
        }
        self._study = optuna.create_study(
            storage=InMemoryStorage(),
            sampler=self._make_sampler(),
            directions=["maximize"] * int(self.settings["objectives"]),
            study_name=self.settings["study_name"],
        )
        self._trial_numbers: dict[int, int] = {}
        self._enqueue_point(self.x0)

    def _make_sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=int(self.settings["n_startup_trials"]))

    @property
    def study(self) -> optuna.Study:
        """The in-memory study that drives sampling (read it; do not ask or tell on it)."""
        return self._study

    def _enqueue_point(self, x: np.ndarray) -> None:
        self._study.enqueue_trial(self._params(x))

    def _propose(self, trial_id: int) -> np.ndarray:
        trial = self._study.ask(fixed_distributions=self._distributions)
        self._trial_numbers[trial_id] = trial.number
        params = trial.params  # a deep copy per access, so read it once
        return np.array([params[name] for name in self._names], dtype=np.float64)

    def _observe(self, trial_id: int, x: np.ndarray, score: float | None) -> None:
        number = self._trial_numbers.pop(trial_id)
        if score is None:
            self._study.tell(number, state=TrialState.FAIL)
        else:
            self._study.tell(number, score)

    def _params(self, x: np.ndarray) -> dict[str, float]:
        return {name: float(value) for name, value in zip(self._names, x, strict=False)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Snapshots from before the search wrote the Optuna file itself carry a mirror (always
        # pickled as None); dropping it keeps them restorable.
        state.pop("_mirror", None)
        self.__dict__.update(state)


class NSGA2Optimizer(TPEOptimizer):
    """Optuna's NSGA-II for several objectives; same storage and snapshot as TPE."""

    name: ClassVar[str] = "nsga2"
    default_settings: ClassVar[dict[str, Any]] = {
        **{k: v for k, v in TPEOptimizer.default_settings.items() if k != "n_startup_trials"},
        "objectives": 2,
        "population_size": 16,
    }

    def _make_sampler(self) -> optuna.samplers.BaseSampler:
        return _SnapshotNSGAIISampler(seed=self.seed, population_size=int(self.settings["population_size"]))


class _SnapshotNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II whose state pickles: Optuna's genetic samplers hold a thread lock that pickle refuses."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()
