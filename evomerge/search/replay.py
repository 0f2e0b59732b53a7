"""Resume is replay: the optimizer rebuilt from the journal, from its last snapshot or from scratch.

The optimizer's asks are a pure function of its settings and the sequence of ask/tell/enqueue
calls (the optimizer contract), so replaying the journaled calls in order reaches exactly the state
the interrupted process had; every replayed ask is checked against the journaled one. A snapshot
only saves replay time, so a snapshot that is missing, altered, unreadable, or whose replay
disagrees with the journal is skipped with a warning and the whole journal is replayed instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from evomerge.errors import UserError
from evomerge.rundir.events import RESULT_EVENTS, EventName
from evomerge.rundir.journal import SnapshotUnusable, load_snapshot
from evomerge.rundir.layout import RunDir
from evomerge.rundir.trials import Trial

LOG = logging.getLogger(__name__)


class ReplayMismatch(UserError):
    """Replaying the journal, the optimizer proposed something other than what was journaled."""


def restore_optimizer(
    run: RunDir, events: list[dict], trials: dict[int, Trial], new_optimizer: Callable, start: int = 0
):
    """The optimizer as the journal leaves it; `new_optimizer()` makes a fresh one of the run's settings.

    `start`: the position of the first event this optimizer saw (a params_then_layers run's layer
    phase starts a new one); a snapshot from before it is another optimizer's.
    """
    at = next((i for i in range(len(events) - 1, start - 1, -1) if events[i]["event"] == EventName.SNAPSHOT), None)
    if at is not None:
        try:
            optimizer = _restored(run, events[at], at, new_optimizer)
            return _replayed(optimizer, events[events[at]["after_events"] :], trials)
        except (SnapshotUnusable, ReplayMismatch) as problem:
            LOG.warning("%s; replaying the whole journal instead", problem)
    return _replayed(new_optimizer(), events[start:], trials)


def _restored(run: RunDir, event: dict, position: int, new_optimizer: Callable):
    after = event["after_events"]
    if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= position:
        raise SnapshotUnusable(f"{run.journal}: a snapshot event counts events the journal does not hold")
    blob = load_snapshot(run, event)
    try:
        return type(new_optimizer()).restore(blob)
    except Exception as error:  # noqa: BLE001 - whatever unpickling raises, the full replay needs no blob
        path = run.snapshot(str(event["file"]))
        raise SnapshotUnusable(f"{path}: optimizer snapshot cannot be restored ({type(error).__name__})") from None


def _replayed(optimizer, events: list[dict], trials: dict[int, Trial]):
    for event in events:
        _replay_event(optimizer, event, trials)
    return optimizer


def _replay_event(optimizer, event: dict, trials: dict[int, Trial]) -> None:
    kind = event["event"]
    if kind == EventName.ASKED and event["kind"] == "optimizer":
        ask = optimizer.ask()
        if ask is None or ask.trial_id != event["trial"] or not np.allclose(ask.x, event["x"], rtol=0, atol=1e-12):
            raise ReplayMismatch(
                f"journal: the optimizer no longer proposes trial {event['trial']} as journaled; the spec or the optimizer code changed, start a new run"
            )
    elif kind == EventName.SEEDED:
        for seed in event["seeds"]:
            optimizer.enqueue(np.asarray(seed["x"], dtype=float))
    elif kind in RESULT_EVENTS and event["trial"] in trials and trials[event["trial"]].kind == "optimizer":
        completed = kind == EventName.COMPLETED
        optimizer.tell(event["trial"], (event.get("objectives") or event.get("score")) if completed else None)
