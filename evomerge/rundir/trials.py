"""What a run directory's journal says about each trial (no optimizer, no Ray: cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Baseline labels: written by preflight (scored) and genome (seeded), read by the seeding rule
# and the demo's margins, so they are defined once here.
BASE_LABEL = "base"
LINEAR_LABEL = "linear (equal weights)"
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
    status: str = "asked"  # asked | completed | failed
    result: dict = field(default_factory=dict)
    heldout: dict | None = None


def replay(events: list[dict]) -> dict[int, Trial]:
    """Trials as the journal tells them (the optimizer is replayed separately)."""
    trials: dict[int, Trial] = {}
    for event in events:
        kind = event["event"]
        if kind == "asked":
            trials[event["trial"]] = Trial(
                event["trial"], event["kind"], event["label"], event["merge_config"], event.get("params", {})
            )
        elif kind in ("completed", "failed") and event["trial"] in trials:
            trial = trials[event["trial"]]
            trial.status, trial.result = kind, event
        elif kind == "heldout" and event["trial"] in trials:
            trials[event["trial"]].heldout = event
    return trials


@dataclass
class Tally:
    """Running counts over a run's trials, so the driver's work per trial does not grow with the run."""

    asked: int = 0
    completed: int = 0
    failed: int = 0
    best_score: float | None = None
    baseline_labels: set[str] = field(default_factory=set)
    last_failure: str | None = None

    @classmethod
    def of(cls, trials: dict[int, Trial]) -> Tally:
        tally = cls()
        for trial in trials.values():
            tally.add_asked(trial)
            if trial.status != "asked":
                tally.add_finished(trial)
        return tally

    def add_asked(self, trial: Trial) -> None:
        self.asked += 1
        if trial.kind == "baseline":
            self.baseline_labels.add(trial.label)

    def add_finished(self, trial: Trial) -> None:
        if trial.status == "completed":
            self.completed += 1
            score = trial.result["score"]
            self.best_score = score if self.best_score is None else max(self.best_score, score)
        else:
            self.failed += 1
            self.last_failure = trial.result.get("reason", "unknown")
