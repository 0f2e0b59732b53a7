"""What a run directory's journal says about each trial (no optimizer, no Ray: cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from evomerge.evaluation.fidelity import RaceTarget
from evomerge.merge.registry import LINEAR_AVERAGE_LABEL
from evomerge.rundir.events import RESULT_EVENTS, EventName, TrialResult

# Baseline labels: written by preflight (scored) and genome (seeded), read by the seeding rule
# and the demo's margins, so they are defined once here (a method's default merge: its registry entry).
BASE_LABEL = "base"
LINEAR_LABEL = LINEAR_AVERAGE_LABEL
PARENT_PREFIX = "parent:"


def parent_label(model_path: str) -> str:
    return f"{PARENT_PREFIX}{Path(model_path).name}"


def is_parent(label: str) -> bool:
    return label.startswith(PARENT_PREFIX)


def is_default_merge(label: str) -> bool:
    """A baseline that merges (linear, task arithmetic, TIES, DARE-TIES): neither the base nor a parent."""
    return label != BASE_LABEL and not is_parent(label)


@dataclass
class Trial:
    trial_id: int
    kind: str  # "optimizer" or "baseline"
    label: str
    merge_config: dict
    params: dict = field(default_factory=dict)
    status: str = EventName.ASKED  # asked | completed | failed
    result: TrialResult | None = None  # the search result, once there is one
    heldout: TrialResult | None = None
    race: RaceTarget | None = None  # fidelity racing: what it raced against, journaled when it was asked

    @property
    def stopped_early(self) -> bool:
        """Raced out on part of the search docs: its score is partial, so it is never a winner."""
        return bool(self.result and self.result.stopped_early)

    @property
    def score(self) -> float | None:
        """The search score of a completed trial, None otherwise."""
        return self.result.score if self.status == EventName.COMPLETED and self.result else None

    @property
    def whole_score(self) -> float | None:
        """The search score when it was scored on every search doc (not raced out early), else None."""
        return None if self.stopped_early else self.score

    @property
    def docs_scored(self) -> int:
        """The search documents its score cost (0 until it has one): the one rule every tally of
        documents scored, and `budget.max_docs`, count by."""
        return self.result.docs_scored if self.score is not None and self.result is not None else 0

    @property
    def heldout_score(self) -> float | None:
        """The held-out score of a trial re-scored successfully, None otherwise."""
        return self.heldout.score if self.heldout and self.heldout.ok else None


def replay(events: list[dict]) -> dict[int, Trial]:
    """Trials as the journal tells them (the optimizer is replayed separately)."""
    trials: dict[int, Trial] = {}
    for event in events:
        kind = event["event"]
        if kind == EventName.ASKED:
            trials[event["trial"]] = Trial(
                event["trial"],
                event["kind"],
                event["label"],
                event["merge_config"],
                event.get("params") or {},
                race=RaceTarget.from_journal(event),
            )
        elif kind in RESULT_EVENTS and event["trial"] in trials:
            trial = trials[event["trial"]]
            trial.status, trial.result = kind, TrialResult.from_event(event)
        elif kind == EventName.HELDOUT and event["trial"] in trials:
            trials[event["trial"]].heldout = TrialResult.from_event(event)
    return trials


def search_seconds(events: list[dict]) -> float:
    """The search's time so far, over every start and resume: each result journals it (`Ledger.search_seconds`)."""
    journaled = (e.get("search_s") for e in events if e["event"] in RESULT_EVENTS)
    return max((float(s) for s in journaled if isinstance(s, (int, float))), default=0.0)


@dataclass
class Tally:
    """Running counts over a run's trials, so the driver's work per trial does not grow with the run."""

    asked: int = 0
    completed: int = 0
    failed: int = 0
    best_score: float | None = None
    baseline_labels: set[str] = field(default_factory=set)
    last_failure: str | None = None
    docs_scored: int = 0  # search documents, what `budget.max_docs` bounds

    @classmethod
    def of(cls, trials: dict[int, Trial]) -> Tally:
        tally = cls()
        for trial in trials.values():
            tally.add_asked(trial)
            if trial.status != EventName.ASKED:
                tally.add_finished(trial)
        return tally

    def add_asked(self, trial: Trial) -> None:
        self.asked += 1
        if trial.kind == "baseline":
            self.baseline_labels.add(trial.label)

    def add_finished(self, trial: Trial) -> None:
        self.docs_scored += trial.docs_scored
        if trial.score is not None:
            self.completed += 1
            if trial.whole_score is not None:
                self.best_score = (
                    max(self.best_score, trial.whole_score) if self.best_score is not None else trial.whole_score
                )
        else:
            self.failed += 1
            self.last_failure = (trial.result.reason if trial.result else None) or "unknown"
