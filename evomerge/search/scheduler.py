"""Keeps every Ray worker busy, and survives workers that die.

Each worker gets up to `queue_depth` candidates at once, so the next one is already in its mailbox
when it finishes the current one and never waits on the driver. When a worker dies (its process
was killed, its node left the cluster), its candidates are re-queued and a fresh worker takes its
slot. Ray's ActorPool would silently drop the dead actor instead, so this is a plain `ray.wait`
loop.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

LOG = logging.getLogger(__name__)


@dataclass
class Job:
    trial_id: int
    merge_config: dict
    eval_set: str = "search"
    attempts: int = 0


@dataclass
class _Slot:
    actor: object
    in_flight: dict = field(default_factory=dict)  # ObjectRef -> Job


class WorkersExhausted(RuntimeError):
    pass


class Scheduler:
    def __init__(
        self, make_actor: Callable[[int], object], num_workers: int, queue_depth: int = 2, max_replacements: int = 20
    ):
        self.make_actor = make_actor
        self.queue_depth = queue_depth
        self.max_replacements = max_replacements
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
        reference = slot.actor.evaluate.remote(job.trial_id, job.merge_config, job.eval_set)
        slot.in_flight[reference] = job

    def poll(self, timeout: float) -> list[tuple[Job, dict]]:
        """Results that are ready within `timeout` seconds; dead workers are replaced on the way."""
        references = [ref for slot in self.slots for ref in slot.in_flight]
        if not references:
            return []
        # Wake on the first result, then take whatever else is already done: waiting for all of
        # them would idle every fast worker until the slowest finished.
        ready, rest = ray.wait(references, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        finished = []
        for reference in ready:
            slot = self._slot_of(reference)
            if slot is None:
                continue  # its worker was replaced while handling an earlier reference
            job = slot.in_flight.pop(reference)
            try:
                finished.append((job, ray.get(reference, timeout=0)))
            except (RayActorError, GetTimeoutError, RayError) as error:
                self._replace(slot, job, error)
        return finished

    def _slot_of(self, reference):
        for slot in self.slots:
            if reference in slot.in_flight:
                return slot
        return None

    def _replace(self, slot: _Slot, job: Job, error: Exception) -> None:
        lost = [job] + list(slot.in_flight.values())
        slot.in_flight.clear()
        self.replacements += 1
        if self.replacements > self.max_replacements:
            raise WorkersExhausted(
                f"workers died {self.replacements} times (last: {type(error).__name__}: {error}); giving up"
            ) from error
        LOG.warning(
            "worker died (%s); re-queueing %d candidate(s) and starting a replacement", type(error).__name__, len(lost)
        )
        with contextlib.suppress(Exception):  # it is already gone
            ray.kill(slot.actor, no_restart=True)
        slot.actor = self.make_actor(self.slots.index(slot))
        for lost_job in lost:
            lost_job.attempts += 1
            self.requeued.append(lost_job)

    def shutdown(self) -> None:
        for slot in self.slots:
            with contextlib.suppress(Exception):  # an actor that already died
                ray.kill(slot.actor, no_restart=True)
