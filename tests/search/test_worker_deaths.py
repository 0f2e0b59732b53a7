"""Workers that die: the real Scheduler and Search driven by in-process fake workers (no Ray).

A worker runs its candidates in order, so a death is charged to the oldest candidate it held; the
others go back in the queue uncharged. A candidate charged twice is a failed trial, told to the
optimizer as a penalty, and the search goes on; only deaths on every candidate stop the search,
with one line that says to fix the cause and resume.
"""

from __future__ import annotations

import pytest
from fake_workers import FakeCalls, FakeWorker, fake_scheduler, fake_spec_data, open_search

from evomerge.errors import UserError
from evomerge.rundir.journal import read_events
from evomerge.search.runs import create_run_dir
from evomerge.search.scheduler import Job, Scheduler
from evomerge.spec import parse_spec


def dies_on(trials: set[int], times: int = 99) -> FakeCalls:
    """Workers die on each of `trials`, the first `times` times each is evaluated."""
    left = dict.fromkeys(trials, times)

    def kills(trial: int) -> bool:
        if left.get(trial, 0) > 0:
            left[trial] -= 1
            return True
        return False

    return FakeCalls(kills)


def poll_all(scheduler: Scheduler) -> list:
    finished = []
    while scheduler.in_flight or scheduler.requeued:
        while scheduler.requeued and scheduler.free_slots:
            scheduler.submit(scheduler.requeued.popleft())
        finished += scheduler.poll(timeout=0)
    return finished


def test_a_death_is_charged_to_the_candidate_being_evaluated_not_to_those_queued_behind_it():
    calls = dies_on({0}, times=1)
    scheduler = Scheduler(lambda index: FakeWorker(f"w{index}"), 1, 2, calls)
    first, queued = Job(0, {"weight": 0.5}), Job(1, {"weight": 0.7})
    scheduler.submit(first)
    scheduler.submit(queued)
    assert scheduler.poll(timeout=0) == [] and scheduler.replacements == 1
    assert list(scheduler.requeued) == [first, queued] and (first.attempts, queued.attempts) == (1, 0)
    finished = poll_all(scheduler)
    assert [(job.trial_id, result.ok) for job, result in finished] == [(0, True), (1, True)]
    assert not scheduler.slots[0].actor.dead, "a fresh worker took the slot"


def test_a_candidate_whose_worker_dies_twice_comes_back_failed_and_is_not_requeued():
    scheduler = Scheduler(lambda index: FakeWorker(f"w{index}"), 1, 2, dies_on({0}))
    scheduler.submit(Job(0, {}))
    scheduler.submit(Job(1, {}))
    finished = poll_all(scheduler)
    (job, failed), (_, served) = finished
    assert (job.trial_id, job.attempts, job.gave_up, failed.ok) == (0, 2, True, False)
    assert failed.reason == "worker died twice on this candidate: ActorDiedError: the worker process died (SIGKILL)"
    assert served.ok and scheduler.replacements == 2


def test_a_lost_connection_to_the_worker_s_node_is_charged_to_no_candidate():
    """A node that leaves the cluster can cut the same candidate's worker twice; that is no crash of its."""
    left = {"deaths": 2}

    def node_drops(trial: int) -> bool:
        left["deaths"] -= trial == 0
        return trial == 0 and left["deaths"] >= 0

    scheduler = Scheduler(lambda index: FakeWorker(f"w{index}"), 1, 2, FakeCalls(node_drops, charged=False))
    scheduler.submit(Job(0, {}))
    finished = poll_all(scheduler)
    assert [(job.trial_id, job.attempts, result.ok) for job, result in finished] == [(0, 0, True)]
    assert scheduler.replacements == 2


def run_with_deaths(tmp_path, calls: FakeCalls, max_evals: int = 19):
    spec = parse_spec(fake_spec_data(tmp_path / "runs", "deaths", budget={"max_evals": max_evals}), "spec", tmp_path)
    run_dir = create_run_dir(spec)
    try:
        open_search(spec, run_dir).run_with(fake_scheduler(calls))
    finally:
        events = read_events(run_dir / "journal.jsonl")
    return events


def test_a_candidate_that_kills_its_worker_every_time_is_failed_and_the_search_goes_on(tmp_path):
    calls = dies_on({3})
    events = run_with_deaths(tmp_path, calls)
    failed = {e["trial"]: e["reason"] for e in events if e["event"] == "failed"}
    assert failed[3].startswith("worker died twice on this candidate: ") and calls.deaths == 2
    assert events[-1]["event"] == "run_finished"
    asked = {e["trial"] for e in events if e["event"] == "asked"}
    assert len(asked) == 19 and {4, 5, 6, 7} <= asked, "CMA-ES was told trial 3's penalty and moved on"


def test_workers_dying_on_every_candidate_stop_the_search_in_one_line(tmp_path):
    calls = FakeCalls(kills=lambda trial: True)
    with pytest.raises(UserError) as stopped:
        run_with_deaths(tmp_path, calls)
    message = str(stopped.value)
    assert "\n" not in message and message.startswith("the first 6 evaluations all failed (last: worker died twice")
    assert message.endswith(f"run 'evomerge resume {(tmp_path / 'runs' / 'deaths').resolve()}'")
    events = read_events(tmp_path / "runs" / "deaths" / "journal.jsonl")
    assert sum(e["event"] == "failed" for e in events) == 6 and calls.deaths == 12


def test_deaths_on_every_candidate_after_earlier_successes_stop_the_search_too(tmp_path):
    calls = FakeCalls(kills=lambda trial: trial >= 0)  # every baseline is scored, then every candidate kills
    with pytest.raises(UserError, match=r"workers died on each of the last 6 candidates \(last: worker died twice"):
        run_with_deaths(tmp_path, calls, max_evals=40)
    events = read_events(tmp_path / "runs" / "deaths" / "journal.jsonl")
    assert sum(e["event"] == "completed" for e in events) == 7 and sum(e["event"] == "failed" for e in events) == 6
