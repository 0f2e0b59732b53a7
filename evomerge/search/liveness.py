"""Noticing that the Ray cluster under a running search is gone, and ending the driver with one line.

With its raylet killed, the driver's `ray.wait` keeps returning "nothing ready" and the search
waited forever (stuck at 58 of 60, no message). With its GCS killed, Ray's own client aborts the
process after 60 s with a C++ log line. So every scheduler poll also asks the GCS, at most every
`interval_s` and with a timeout, whether the driver's own node is alive: a node reported dead ends
the search at once, a GCS that has not answered for `gcs_grace_s` ends it too. Either way the
message tells the user to resume: everything finished is in the journal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from evomerge.errors import UserError
from evomerge.search.scheduler import RayCalls

LOG = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 3.0


class Liveness(str, Enum):
    ALIVE = "alive"
    NODE_DEAD = "node dead"  # the GCS says the driver's node (its raylet) is dead
    GCS_UNREACHABLE = "gcs unreachable"  # the GCS itself does not answer


class ClusterLost(UserError):
    """The Ray cluster under the search is gone; the run can be resumed."""


class ClusterWatch:
    """Raises ClusterLost from `check()` once the cluster is gone; cheap to call on every poll."""

    def __init__(
        self,
        run_dir: Path,
        probe: Callable[[], Liveness],
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = 5.0,
        gcs_grace_s: float = 20.0,
    ):
        self.run_dir = run_dir
        self.probe = probe
        self.clock = clock
        self.interval_s = interval_s
        self.gcs_grace_s = gcs_grace_s
        self._probed_at: float | None = None
        self._unreachable_since: float | None = None

    def check(self) -> None:
        now = self.clock()
        if self._probed_at is not None and now - self._probed_at < self.interval_s:
            return
        self._probed_at = now
        state = self.probe()
        if state is Liveness.ALIVE:
            self._unreachable_since = None
            return
        if state is Liveness.NODE_DEAD:
            raise ClusterLost(
                f"the Ray node this search runs on died (its raylet is gone); every finished evaluation is journaled: run 'evomerge resume {self.run_dir}' to continue"
            )
        if self._unreachable_since is None:
            self._unreachable_since = now
            LOG.warning("the Ray cluster's GCS does not answer; waiting up to %.0f s for it", self.gcs_grace_s)
        if now - self._unreachable_since >= self.gcs_grace_s:
            raise ClusterLost(
                f"the Ray cluster's head (GCS) has not answered for {now - self._unreachable_since:.0f} s; every finished evaluation is journaled: run 'evomerge resume {self.run_dir}' once the cluster is back"
            )


class WatchedRayCalls(RayCalls):
    """The scheduler's Ray calls, with the cluster checked before each wait for results."""

    def __init__(self, watch: ClusterWatch):
        super().__init__()
        self.watch = watch

    def wait(self, references: list, timeout: float) -> list:
        self.watch.check()
        return super().wait(references, timeout)


def ray_liveness() -> Liveness:
    """Ask the GCS, with a timeout, whether the driver's own node is alive."""
    import ray

    # Ray 2.x has no public call with a timeout for this: ray.nodes() waits on the GCS without
    # one, and the state API needs the dashboard, which a local search runs without.
    worker = ray._private.worker.global_worker
    try:
        gcs_client, node_id = worker.gcs_client, worker.current_node_id
    except AttributeError:  # a Ray without these: nothing to check, assume alive
        return Liveness.ALIVE
    try:
        alive = gcs_client.check_alive([node_id], timeout=PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - any failure to answer is an unreachable GCS
        return Liveness.GCS_UNREACHABLE
    return Liveness.ALIVE if all(alive) else Liveness.NODE_DEAD
