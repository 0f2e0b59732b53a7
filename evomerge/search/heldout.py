"""The held-out phase: re-scoring the baselines and the top trials on the disjoint held-out tasks.

It can take long on a real model (each re-scoring evaluates a whole model on every held-out
document), so it says how far it is: a line per re-scored trial, and one at least every
`log_seconds` while a slow one runs.
"""

from __future__ import annotations

from collections.abc import Callable

from evomerge.rundir.events import TrialResult
from evomerge.rundir.trials import Trial
from evomerge.search.progress import SearchProgress
from evomerge.search.scheduler import Job, Scheduler
from evomerge.search.selection import heldout_candidates


def rescore_heldout(
    trials: dict[int, Trial],
    top_k: int,
    scheduler: Scheduler,
    record: Callable[[Job, TrialResult], None],
    progress: SearchProgress,
    clock: Callable[[], float],
) -> dict | None:
    """Re-score what `heldout_candidates` picks and has no held-out score yet; the tie report, if any."""
    chosen, ties = heldout_candidates(trials, top_k)
    jobs = [Job(t.trial_id, t.merge_config, "heldout") for t in chosen if t.heldout is None]
    done, total = len(chosen) - len(jobs), len(chosen)
    started = said = clock()
    while jobs or scheduler.in_flight or scheduler.requeued:
        jobs.extend(scheduler.requeued)
        scheduler.requeued.clear()
        while jobs and scheduler.free_slots:
            scheduler.submit(jobs.pop(0))
        for job, result in scheduler.poll(timeout=1.0):
            record(job, result)
            done += 1
            score = trials[job.trial_id].heldout_score
            shown = "failed" if score is None else f"{score:.4f}"
            progress.say(f"held-out: {done}/{total} re-scored (trial {job.trial_id}: {shown})")
            said = clock()
        if clock() - said >= progress.settings.log_seconds:
            running = f", {scheduler.in_flight} running" if scheduler.in_flight else ""
            progress.say(f"held-out: {done}/{total} re-scored{running}, {clock() - started:.0f} s so far")
            said = clock()
    return ties
