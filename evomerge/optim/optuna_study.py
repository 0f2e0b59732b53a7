"""Optuna's samplers (TPE, NSGA-II) behind the ask/tell contract: the in-memory study they share.

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
* **A method gene is categorical.** With several methods (``Problem.choice``) each trial
  suggests ``method`` first and then only that method's genes, so the samplers model each
  method's genes from its own trials; the other methods' coordinates keep x0's values.
* **No storage of its own.** The run's Optuna file for optuna-dashboard
  (runs/NAME/optuna.log) is written by the search for every optimizer, from the journal, in
  the genes' real units (``evomerge.search.study_log``). Snapshots taken while these classes
  still mirrored to it restore as before: the old mirror's settings are ignored.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState

from evomerge.optim.base import Optimizer, Problem
from evomerge.optim.choice import METHOD_PARAM

STUDY_NAME = "evomerge"


def param_names(dim: int) -> list[str]:
    """Optuna parameter names for genome coordinates; zero-padded so they sort in genome order."""
    return [f"x{i:04d}" for i in range(dim)]


class OptunaOptimizer(Optimizer):
    """An Optuna sampler over an in-memory study; x0 is the first trial, enqueued points follow."""

    def __init__(self, problem: Problem, seed: int, settings: dict[str, Any]):
        super().__init__(problem, seed, {**settings, "study_name": STUDY_NAME, "objectives": problem.objectives})
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

    @abstractmethod
    def _make_sampler(self) -> optuna.samplers.BaseSampler:
        """The sampler that drives the study, seeded with ``self.seed``."""

    @property
    def study(self) -> optuna.Study:
        """The in-memory study that drives sampling (read it; do not ask or tell on it)."""
        return self._study

    def _enqueue_point(self, x: np.ndarray) -> None:
        self._study.enqueue_trial(self._params(x))

    def _propose(self, trial_id: int) -> np.ndarray:
        if self.choice is not None:
            return self._propose_method(trial_id)
        trial = self._study.ask(fixed_distributions=self._distributions)
        self._trial_numbers[trial_id] = trial.number
        params = trial.params  # a deep copy per access, so read it once
        return np.array([params[name] for name in self._names], dtype=np.float64)

    def _propose_method(self, trial_id: int) -> np.ndarray:
        """The method as a categorical parameter, then only its own genes (conditional on it)."""
        choice = self.choice
        assert choice is not None
        trial = self._study.ask()
        self._trial_numbers[trial_id] = trial.number
        index = choice.names.index(trial.suggest_categorical(METHOD_PARAM, list(choice.names)))
        start, stop = choice.spans[index]
        own = [trial.suggest_float(self._names[i], self.lower[i], self.upper[i]) for i in range(start, stop)]
        return choice.point(index, np.array(own, dtype=np.float64), self.x0)

    def _observe(self, trial_id: int, x: np.ndarray, score: float | None) -> None:
        number = self._trial_numbers.pop(trial_id)
        if score is None:
            self._study.tell(number, state=TrialState.FAIL)
        else:
            self._study.tell(number, score)

    def _params(self, x: np.ndarray) -> dict[str, float | str]:
        if self.choice is not None:  # the chosen method and its genes only
            index = self.choice.index_of(x[0])
            start, stop = self.choice.spans[index]
            return {METHOD_PARAM: self.choice.names[index]} | {self._names[i]: float(x[i]) for i in range(start, stop)}
        return {name: float(value) for name, value in zip(self._names, x, strict=False)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Snapshots from before the search wrote the Optuna file itself carry a mirror (always
        # pickled as None); dropping it keeps them restorable.
        state.pop("_mirror", None)
        self.__dict__.update(state)
