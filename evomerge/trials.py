"""What a run directory's journal says about each trial (no optimizer, no Ray: cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
            trials[event["trial"]] = Trial(event["trial"], event["kind"], event["label"], event["merge_config"], event.get("params", {}))
        elif kind in ("completed", "failed") and event["trial"] in trials:
            trial = trials[event["trial"]]
            trial.status, trial.result = kind, event
        elif kind == "heldout" and event["trial"] in trials:
            trials[event["trial"]].heldout = event
    return trials
