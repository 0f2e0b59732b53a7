"""What a journal line says: the event names, and the typed result of one evaluation.

`TrialResult` is what a worker returns for a candidate and what the journal holds for it: the
driver journals it as it is (`to_journal`: its fields, None left out) and `replay` reads it back
(`from_event`), so the worker, the journal and every reader agree on one set of fields. Readers
ignore fields they do not know, so a journal written by a newer version still reads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum


class EventName(str, Enum):
    """The `event` field of every journal line."""

    CREATED = "run_created"  # the frozen spec's hash, written right after the spec itself
    RUN_STARTED = "run_started"  # each search or resume: spec fingerprint, workers, input fingerprints
    ASKED = "asked"
    SEEDED = "seeded"
    COMPLETED = "completed"
    FAILED = "failed"
    HELDOUT = "heldout"
    SNAPSHOT = "snapshot"
    BUDGET_EXTENDED = "budget_extended"  # resume --max-evals/--time-limit-min: the budget from here on
    PHASE_CHANGED = "phase_changed"  # params_then_layers: the params winner (trial, config) and the layer phase's seeds
    RUN_FINISHED = "run_finished"

    # Written into messages and JSON as the bare name, like the string it replaces.
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


RESULT_EVENTS = (EventName.COMPLETED, EventName.FAILED)


@dataclass(frozen=True)
class TrialResult:
    """One evaluation of one candidate on one evaluation set (search or held-out).

    A failed evaluation has `ok` False and a `reason`; the timing fields say where a successful
    one spent its time. `objectives` is added by the driver for multi-objective runs.
    """

    trial: int
    ok: bool
    score: float | None = None
    metrics: dict[str, float] | None = None
    n_docs: dict[str, int] | None = None
    worker: str | None = None
    merge_s: float | None = None
    prepare_s: float | None = None
    merge_path: str | None = None
    eval_s: float | None = None
    subset: str | None = None  # digest of the documents scored, the same for every candidate of a run
    reason: str | None = None
    seconds: float | None = None
    objectives: list[float] | None = None
    rungs: int | None = None  # fidelity racing: the rungs (slices of the search docs) scored
    stopped_early: bool | None = None  # raced out before its last rung: `score` is a partial score
    rung_scores: list[float] | None = None  # fidelity racing: the partial score after each rung scored
    # Group and tag entries: their leaf tasks' scores and docs, and how they weigh (evaluation/scores.py).
    subtasks: dict[str, dict] | None = None

    @property
    def docs_scored(self) -> int:
        """The documents this result scored, over every task (0 when it scored none)."""
        return sum((self.n_docs or {}).values())

    @classmethod
    def failure(cls, trial: int, reason: str, **extra) -> TrialResult:
        return cls(trial=trial, ok=False, reason=reason, **extra)

    @classmethod
    def from_event(cls, event: dict) -> TrialResult:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in event.items() if key in known}
        values.setdefault("ok", event.get("event") != EventName.FAILED)
        return cls(**values)

    def to_journal(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    def non_finite(self) -> str | None:
        """Why a successful result cannot be kept (a NaN or infinite number in it), else None."""
        if not self.ok:
            return None
        if self.score is None or not math.isfinite(self.score):
            return f"score is not finite ({self.score})"
        for name, value in (self.metrics or {}).items():
            if not math.isfinite(value):
                return f"metric {name} is not finite ({value})"
        if self.objectives is not None and not all(math.isfinite(v) for v in self.objectives):
            return f"objectives are not finite ({self.objectives})"
        return None

    def as_failure(self, reason: str) -> TrialResult:
        """This result as a failed one: the numbers dropped (the journal holds no NaN), the reason kept."""
        return replace(self, ok=False, score=None, metrics=None, objectives=None, subtasks=None, reason=reason)
