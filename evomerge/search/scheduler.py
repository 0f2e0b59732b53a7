"""Keeps every Ray worker busy, and survives workers that die.

Each worker gets up to `queue_depth` candidates at once, so the next one is already in its mailbox
when it finishes the current one and never waits on the driver. When a worker dies (its process
was killed, its node left the cluster), its candidates are re-queued and a fresh worker takes its
slot. Ray's ActorPool would silently drop the dead actor instead, so this is a plain `ray.wait`
loop.

A worker runs its calls in order, so the oldest candidate in its mailbox is the one it was
evaluating when it died: that candidate is charged with the death, the others go back in the queue
uncharged; a lost connection to the worker's node charges nobody. A candidate charged twice comes back as a failed result ("worker died twice on this
candidate"), so one candidate that crashes its worker every time (a merge that exhausts host memory,
a kernel fault) costs two restarts instead of ending the search. The driver decides when deaths on
every candidate mean the setup itself is broken.

The Ray calls sit behind `WorkerCalls`, so the bookkeeping runs without Ray in tests and benchmarks.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from evomerge.evaluation.fidelity import RaceTarget
from evomerge.rundir.events import TrialResult

LOG = logging.getLogger(__name__)
MAX_ATTEMPTS = 2  # a candidate whose worker died this many times is failed, not re-queued


@dataclass
class Job:
    trial_id: int
    merge_config: dict
    eval_set: str = "search"
    attempts: int = 0  # workers that died while evaluating it
    race: RaceTarget | None = None  # fidelity racing: what it must keep up with to get its next slice

    @property
    def gave_up(self) -> bool:
        """Its workers died MAX_ATTEMPTS times: it was returned as failed and is never re-queued."""
        return self.attempts >= MAX_ATTEMPTS


@dataclass
class _Slot:
    actor: object
    in_flight: dict = field(default_factory=dict)  # reference -> Job, in submission order


class WorkerDied(Exception):
    """A call whose worker process is gone (killed, out of memory, its node lost).

    `charged`: whether the candidate it was evaluating may have caused it. A connection lost to the
    worker's node (Ray's ActorUnavailableError, a lost object) says nothing about the candidate;
    a dead worker process or an exception out of the call does.
    """

    def __init__(self, message: str, charged: bool = True):
        super().__init__(message)
        self.charged = charged


class WorkerCalls(Protocol):
    """How the scheduler reaches its workers: Ray in a search, in-process fakes in tests."""

    def submit(self, actor: Any, job: Job) -> Any:
        """Start `actor.evaluate` on the job; returns a reference to its result."""

    def wait(self, references: list, timeout: float) -> list:
        """The references whose results are ready, waiting up to `timeout` for the first."""

    def result(self, reference: Any) -> TrialResult:
        """The ready result; raises WorkerDied when its worker is gone."""

    def kill(self, actor: Any) -> None:
        """Stop the actor for good; it may already be dead."""


class RayCalls:
    def submit(self, actor, job: Job):
        return actor.evaluate.remote(job.trial_id, job.merge_config, job.eval_set, job.race)

    def wait(self, references: list, timeout: float) -> list:
        import ray

        # Wake on the first result, then take whatever else is already done: waiting for all of
        # them would idle every fast worker until the slowest finished.
        ready, rest = ray.wait(references, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def result(self, reference) -> TrialResult:
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError, RayError, RayTaskError

        try:
            return ray.get(reference, timeout=0)
        except (GetTimeoutError, RayError) as error:
            raise WorkerDied(_first_line(error), charged=isinstance(error, (ActorDiedError, RayTaskError))) from error

    def kill(self, actor) -> None:
        import ray

        with contextlib.suppress(Exception):  # it is already gone
            ray.kill(actor, no_restart=True)


class Scheduler:
    def __init__(
        self,
        make_actor: Callable[[int], object],
        num_workers: int,
        queue_depth: int = 2,
        calls: WorkerCalls | None = None,
    ):
        self.make_actor = make_actor
        self.queue_depth = queue_depth
        self.calls: WorkerCalls = calls or RayCalls()
        self.replacements = 0
        self.slots = [_Slot(make_actor(i)) for i in range(num_workers)]
        self.requeued: collections.deque[Job] = collections.deque()

    @property
    def free_slots(self) -> int:
        return sum(self.queue_depth - len(s.in_flight) for s in self.slots)

    @property
    def in_flight(self) -> int:
        return sum(len(s.in_flight) for s in self.slots)

    def submit(self, job: Job) -> None:
        slot = min(self.slots, key=lambda s: len(s.in_flight))
        if len(slot.in_flight) >= self.queue_depth:
            raise RuntimeError("submit() called with no free slot")
        slot.in_flight[self.calls.submit(slot.actor, job)] = job

    def poll(self, timeout: float) -> list[tuple[Job, TrialResult]]:
        """Results that are ready within `timeout` seconds; dead workers are replaced on the way."""
        references = [ref for slot in self.slots for ref in slot.in_flight]
        if not references:
            return []
        finished = []
        for reference in self.calls.wait(references, timeout):
            slot = self._slot_of(reference)
            if slot is None:
                continue  # its worker was replaced while handling an earlier reference
            try:
                result = self.calls.result(reference)
            except WorkerDied as death:
                finished += self._replace(slot, str(death), death.charged)
                continue
            finished.append((slot.in_flight.pop(reference), result))
        return finished

    def _slot_of(self, reference) -> _Slot | None:
        for slot in self.slots:
            if reference in slot.in_flight:
                return slot
        return None

    def _replace(self, slot: _Slot, death: str, charged: bool = True) -> list[tuple[Job, TrialResult]]:
        """Start a new worker in the slot; re-queue its candidates, or fail the one charged twice."""
        evaluating, *waiting = slot.in_flight.values()
        slot.in_flight.clear()
        self.replacements += 1
        evaluating.attempts += int(charged)
        requeue = waiting if evaluating.gave_up else [evaluating, *waiting]
        LOG.warning(
            "worker died (%s) on trial %d; re-queueing %d candidate(s) and starting a replacement",
            death,
            evaluating.trial_id,
            len(requeue),
        )
        self.calls.kill(slot.actor)
        slot.actor = self.make_actor(self.slots.index(slot))
        self.requeued.extend(requeue)
        if not evaluating.gave_up:
            return []
        reason = f"worker died twice on this candidate: {death}"
        return [(evaluating, TrialResult.failure(evaluating.trial_id, reason))]

    def shutdown(self) -> None:
        for slot in self.slots:
            self.calls.kill(slot.actor)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
