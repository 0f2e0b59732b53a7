"""Optuna's TPE sampler behind the ask/tell contract, with an optional dashboard mirror.

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
* **Dashboard mirror.** With ``storage_path`` set, each *finished* trial is also added to a
  study in a ``JournalStorage`` file, readable by ``optuna.load_study`` and
  optuna-dashboard. The sampler never sees the mirror, so mirroring cannot change asks.
  Each mirrored trial carries its evomerge trial id as a user attribute. An existing study
  in the file is reopened (the path belongs to one run directory), and trials it already
  holds, told before a crash and replayed on resume, are skipped, so it is never
  duplicated whether resume starts from a snapshot or from scratch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.storages import InMemoryStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from evomerge.optim.base import Optimizer

TRIAL_ID_ATTR = "evomerge_trial_id"


def param_names(dim: int) -> list[str]:
    """Optuna parameter names for genome coordinates; zero-padded so they sort in genome order."""
    return [f"x{i:04d}" for i in range(dim)]


class TPEOptimizer(Optimizer):
    """Tree-structured Parzen Estimator; x0 is the first trial, enqueued points follow."""

    name: ClassVar[str] = "tpe"
    default_settings: ClassVar[dict[str, Any]] = {
        "n_startup_trials": 10,  # random trials before TPE starts modelling
        "storage_path": None,  # optional JournalStorage file mirroring finished trials
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
        self._mirror = self._open_mirror()
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
        if self._mirror is not None:
            self._mirror.record(trial_id, self._params(x), self._distributions, score)

    def _params(self, x: np.ndarray) -> dict[str, float]:
        return {name: float(value) for name, value in zip(self._names, x, strict=False)}

    def _open_mirror(self) -> _JournalMirror | None:
        path = self.settings["storage_path"]
        if path is None:
            return None
        return _JournalMirror(str(path), self.settings["study_name"], int(self.settings["objectives"]))

    def __getstate__(self) -> dict[str, Any]:
        # The mirror holds a file backend and lock; it is reopened from settings on restore.
        state = self.__dict__.copy()
        state["_mirror"] = None
        return state

    def _reattach(self) -> None:
        self._mirror = self._open_mirror()


class _JournalMirror:
    """Copies finished trials into a JournalStorage study, at most once per trial id.

    An existing study of the same name is reopened rather than refused: a resume builds a
    fresh optimizer (and replays from scratch when no snapshot exists yet) against the
    mirror the interrupted process already wrote, and the trial-id check keeps it exact.
    """

    def __init__(self, path: str, study_name: str, objectives: int = 1):
        storage = JournalStorage(JournalFileBackend(path))
        self.study = optuna.create_study(
            storage=storage, study_name=study_name, directions=["maximize"] * objectives, load_if_exists=True
        )
        self._mirrored = {t.user_attrs.get(TRIAL_ID_ATTR) for t in self.study.get_trials(deepcopy=False)}

    def record(self, trial_id: int, params: dict[str, float], distributions: dict, score: float | None) -> None:
        if trial_id in self._mirrored:
            return
        trial = optuna.trial.create_trial(
            params=params,
            distributions=distributions,
            values=None if score is None else (score if isinstance(score, list) else [score]),
            state=TrialState.FAIL if score is None else TrialState.COMPLETE,
            user_attrs={TRIAL_ID_ATTR: trial_id},
        )
        self.study.add_trial(trial)
        self._mirrored.add(trial_id)


class NSGA2Optimizer(TPEOptimizer):
    """Optuna's NSGA-II for several objectives; same storage, snapshot and mirror as TPE."""

    name: ClassVar[str] = "nsga2"
    default_settings: ClassVar[dict[str, Any]] = {
        **{k: v for k, v in TPEOptimizer.default_settings.items() if k != "n_startup_trials"},
        "objectives": 2,
        "population_size": 16,
    }

    def _make_sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.NSGAIISampler(seed=self.seed, population_size=int(self.settings["population_size"]))
