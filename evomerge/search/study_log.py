"""runs/NAME/optuna.log: the run as Optuna studies, for optuna-dashboard and `optuna.load_study`.

Every optimizer gets one (CMA-ES, TPE, NSGA-II, random): the journal is the truth and this file a
view derived from it, written by the search loop, never read back by it.

* Study "evomerge": the optimizer's candidates. Parameters are named after the genes and valued in
  their own units (the decoded values, each a FloatDistribution over its gene's bounds), so the
  dashboard's slices and importances speak of weights and densities, not unit-box coordinates.
  Per-task metrics, the worker and its timings, and after the re-scoring the held-out score and
  per-task held-out metrics are user attributes; start and end are the journal's asked and
  finished times. A failed candidate is a FAIL trial with its reason.
* Study "evomerge-baselines": the base, the parents and the default merges, tagged with their kind
  and label. They have no genes: in the candidates' study they would empty Optuna's intersection
  search space, and with it the dashboard's parameter importances.
* A spec that lists several methods adds a categorical parameter "method" (and a "method" user
  attribute on every trial); each candidate carries only its method's genes.

Trials are appended as they finish, so a dashboard follows a live search. The whole file is
rebuilt from the journal when a search starts or resumes (so nothing is duplicated and a torn tail
is dropped) and once more after the held-out re-scoring, because Optuna cannot set attributes on a
finished trial. A rebuild is written beside the file and renamed over it, so a reader sees the old
file or the new one; a dashboard that was already open shows the held-out attributes once
restarted. The file failing to write is a warning, never a failed search.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from evomerge.files import write_bytes_atomic
from evomerge.optim.choice import METHOD_PARAM
from evomerge.preflight import Prepared
from evomerge.rundir.events import RESULT_EVENTS, EventName, TrialResult
from evomerge.rundir.layout import RunDir
from evomerge.rundir.trials import Trial

LOG = logging.getLogger(__name__)
STUDY = "evomerge"
BASELINE_STUDY = "evomerge-baselines"
TRIAL_ID_ATTR = "evomerge_trial_id"


@dataclass(frozen=True)
class GeneBounds:
    """A gene's name and the range of its decoded value."""

    name: str
    low: float
    high: float


@dataclass(frozen=True)
class StudyShape:
    """What the studies look like: parameters, objective names, run-level attributes."""

    genes: tuple[GeneBounds, ...]
    metric_names: tuple[str, ...]  # one per objective ("search score" for a single one)
    attrs: dict[str, object] = field(default_factory=dict)  # shown on the study's page
    methods: tuple[str, ...] = ()  # a method gene's choices: a categorical "method" parameter

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        genes: dict[str, BaseDistribution] = {gene.name: FloatDistribution(gene.low, gene.high) for gene in self.genes}
        return genes | ({METHOD_PARAM: CategoricalDistribution(self.methods)} if self.methods else {})


@dataclass(frozen=True)
class Timed:
    """A trial with the journal's times of its ask and of its result (seconds since the epoch)."""

    trial: Trial
    asked: float | None
    finished: float | None


class StudyLog:
    """Appends finished trials to runs/NAME/optuna.log; rebuilds it whole from the journal."""

    def __init__(self, path: Path, shape: StudyShape):
        self.path = Path(path)
        self.shape = shape
        self._distributions = shape.distributions
        self._asked: dict[int, float] = {}
        self._studies: dict[str, optuna.Study] | None = None
        self._broken = False

    def rebuild(self, events: list[dict], trials: dict[int, Trial]) -> None:
        """Write the file afresh from the journal: every finished trial once, in the order it finished."""
        self._asked = {e["trial"]: e["time"] for e in events if e["event"] == EventName.ASKED and "time" in e}
        finished = [
            Timed(trials[e["trial"]], self._asked.get(e["trial"]), e.get("time"))
            for e in events
            if e["event"] in RESULT_EVENTS and e["trial"] in trials
        ]
        self._studies = None
        self._safely(self._write_whole, finished)

    def asked(self, trial_id: int, time: float) -> None:
        self._asked[trial_id] = time

    def finished(self, trial: Trial, time: float) -> None:
        """Append a trial whose search result was just journaled."""
        if self._studies is None and not self._broken:
            self._studies = self._safely(self._open, self.path)
        if self._studies is not None:
            self._safely(self._add, self._studies, Timed(trial, self._asked.get(trial.trial_id), time))

    def _write_whole(self, finished: Iterable[Timed]) -> None:
        with tempfile.TemporaryDirectory(prefix="optuna-log-") as folder:
            built = Path(folder) / self.path.name
            studies = self._open(built)
            for timed in finished:
                self._add(studies, timed)
            write_bytes_atomic(self.path, built.read_bytes())

    def _open(self, path: Path) -> dict[str, optuna.Study]:
        with _quiet_optuna():
            return self._open_studies(path)

    def _open_studies(self, path: Path) -> dict[str, optuna.Study]:
        storage = JournalStorage(JournalFileBackend(str(path)))
        directions = ["maximize"] * len(self.shape.metric_names)
        studies = {}
        for name in (STUDY, BASELINE_STUDY):
            study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)
            if study.metric_names is None:  # a new study: describe it once
                study.set_metric_names(list(self.shape.metric_names))
                for key, value in self.shape.attrs.items():
                    study.set_user_attr(key, value)
            studies[name] = study
        return studies

    def _add(self, studies: dict[str, optuna.Study], timed: Timed) -> None:
        trial = timed.trial
        evolved = trial.kind == "optimizer"
        params = (
            {
                name: min(max(float(trial.params[name]), bounds.low), bounds.high)
                for name, bounds in self._distributions.items()
                if name in trial.params and isinstance(bounds, FloatDistribution)
            }
            if evolved
            else {}
        )
        method = trial.merge_config.get("merge_method")
        # The method gene, named like the optimizer's study names it (a layer phase's passthrough is none of its choices).
        if evolved and method in self.shape.methods:
            params[METHOD_PARAM] = method
        score = trial.score
        values = None
        if score is not None and trial.result is not None:
            values = trial.result.objectives or [score]
        attrs = trial_attrs(trial)
        if self.shape.methods and "merge_method" in trial.merge_config:
            attrs[METHOD_PARAM] = trial.merge_config["merge_method"]
        frozen = optuna.trial.create_trial(
            state=TrialState.COMPLETE if values is not None else TrialState.FAIL,
            values=values,
            params=params,
            distributions={name: self._distributions[name] for name in params},
            user_attrs=attrs,
        )
        if timed.asked is not None:
            frozen.datetime_start = datetime.fromtimestamp(timed.asked)
        if timed.finished is not None:
            frozen.datetime_complete = datetime.fromtimestamp(timed.finished)
        studies[STUDY if evolved else BASELINE_STUDY].add_trial(frozen)

    def _safely(self, action, *args):
        """Run `action`; an OSError (a full disk, a read-only run directory) warns once and stops the log."""
        if self._broken:
            return None
        try:
            return action(*args)
        except OSError as error:
            self._broken = True
            LOG.warning(
                "%s: cannot write the Optuna study (%s); the search goes on, the journal stays complete",
                self.path,
                error.strerror or error,
            )
            return None


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna announces each study it opens on stderr and calls metric names experimental: not news here."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def trial_attrs(trial: Trial) -> dict[str, object]:
    """The user attributes of one trial: who it is, its per-task metrics, timings and held-out scores."""
    attrs: dict[str, object] = {TRIAL_ID_ATTR: trial.trial_id, "kind": _kind(trial), "label": trial.label}
    attrs.update(_result_attrs("search", trial.result))
    if trial.result is not None:
        timings = {"worker": trial.result.worker, "merge_s": trial.result.merge_s, "eval_s": trial.result.eval_s}
        attrs.update({key: value for key, value in timings.items() if value is not None})
        if not trial.result.ok:
            attrs["failure"] = trial.result.reason or "unknown"
    attrs.update(_result_attrs("heldout", trial.heldout))
    return attrs


def _kind(trial: Trial) -> str:
    return "evolved" if trial.kind == "optimizer" else "baseline"


def _result_attrs(prefix: str, result: TrialResult | None) -> dict[str, float]:
    if result is None or not result.ok or result.score is None:
        return {}
    return {f"{prefix}_score": float(result.score)} | {
        f"{prefix}/{task}": float(value) for task, value in (result.metrics or {}).items()
    }


def study_shape(prepared: Prepared, run: RunDir, layer_phase: Prepared | None = None) -> StudyShape:
    """The studies of a run: its genes' bounds, its objectives' names, what the run is; a
    params_then_layers run's `layer_phase` adds its layer genes (each trial sets one phase's)."""
    spec = prepared.spec
    objectives = tuple(objective.name for objective in spec.evaluation.objectives) or ("search score",)
    attrs: dict[str, object] = {
        "run": str(run),
        "method": spec.merge.method,
        "optimizer": spec.optimizer.name,
        "base": spec.models.base,
        "experts": {f"m{index}": path for index, path in enumerate(spec.models.experts)},
        "search tasks": [task.name for task in spec.evaluation.tasks],
        "held-out tasks": [task.name for task in spec.evaluation.heldout_tasks],
    }
    genomes = [prepared.genome] + ([layer_phase.genome] if layer_phase else [])
    genes = tuple(GeneBounds(gene.name, gene.low, gene.high) for genome in genomes for gene in genome.genes)
    choice = getattr(prepared.genome, "choice", None)
    return StudyShape(genes, objectives, attrs, choice.names if choice else ())
