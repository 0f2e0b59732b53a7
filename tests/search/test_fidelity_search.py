"""Fidelity racing in the real Search and Scheduler, with in-process fake workers that race with the
real `fidelity.race` (tests/fake_workers.py): what a raced run journals, that a partial score never
wins, that the incumbent and successive halving's rung cutoffs follow the block rule, that a
document budget (`budget.max_docs`) ends a raced run after a whole generation, and that a run killed
anywhere resumes to the very asks, scores and held-out scores of the uninterrupted run."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from fake_workers import FakeCalls, FakeWorker, fake_score, fake_spec_data, open_search

from evomerge.evaluation.fidelity import RaceTarget
from evomerge.evaluation.scores import standard_error
from evomerge.rundir.journal import read_events
from evomerge.rundir.results import load_trials, status
from evomerge.rundir.verdict import build_verdict
from evomerge.search.runs import create_run_dir, open_run
from evomerge.search.scheduler import Scheduler
from evomerge.spec import parse_spec

RUNGS = (0.25, 1.0)
POPSIZE = 4


def spread_score(trial: int, config: dict, eval_set: str) -> float:
    """The fake's pure score, spread out so that most candidates are clearly beaten."""
    return round(fake_score(config, eval_set) ** 12, 6)


def close_score(trial: int, config: dict, eval_set: str) -> float:
    """The fake's pure score: candidates close together, as around a good CMA-ES mean."""
    return fake_score(config, eval_set)


def raced_scheduler(workers: int = 1, score=spread_score, z: float = 1.0) -> Scheduler:
    ids = itertools.count()
    return Scheduler(lambda index: FakeWorker(f"w{index}@fake:{next(ids)}", score, RUNGS, z=z), workers, 2, FakeCalls())


def raced_run(
    root: Path, name: str, keep: float | None = None, score=spread_score, z: float = 1.0, budget: dict | None = None
) -> Path:
    fidelity = {"rungs": list(RUNGS), "z": z} | ({"keep": keep} if keep else {})
    evaluation = fake_spec_data(root, name)["evaluation"] | {"fidelity": fidelity}
    data = fake_spec_data(root, name, evaluation=evaluation, budget=budget or {"max_evals": 40})
    data["optimizer"] = data["optimizer"] | {"popsize": POPSIZE, "overlap": False}
    spec = parse_spec(data, "spec", root)
    run_dir = create_run_dir(spec)
    open_search(spec, run_dir).run_with(raced_scheduler(score=score, z=z))
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return raced_run(tmp_path_factory.mktemp("raced"), "raced")


# Enough for the baselines and about ten raced generations, never a round number of them.
MAX_DOCS = 1000


@pytest.fixture(scope="module")
def docs_budgeted(tmp_path_factory) -> Path:
    budget = {"max_evals": None, "max_docs": MAX_DOCS}
    return raced_run(tmp_path_factory.mktemp("docs"), "docs", budget=budget)


@pytest.fixture(scope="module")
def halved(tmp_path_factory) -> Path:
    return raced_run(tmp_path_factory.mktemp("halved"), "halved", keep=0.5, score=close_score, z=3.0)


def state(run_dir: Path) -> dict:
    events = read_events(run_dir / "journal.jsonl")
    results = {e["trial"]: (e.get("score"), e.get("n_docs")) for e in events if e["event"] in ("completed", "failed")}
    return {
        "asked": {
            e["trial"]: (e["x"], RaceTarget.from_journal(e), results.get(e["trial"]))
            for e in events
            if e["event"] == "asked"
        },
        "heldout": {e["trial"]: e["score"] for e in events if e["event"] == "heldout"},
    }


def test_a_raced_run_stops_beaten_candidates_after_their_first_slice_and_never_picks_them(reference):
    _, trials = load_trials(reference)
    stopped = [t for t in trials.values() if t.stopped_early]
    whole = [t for t in trials.values() if t.kind == "optimizer" and t.score is not None and not t.stopped_early]
    assert stopped and whole
    assert all(t.result.n_docs == {"tiny_add": 8} and t.result.rungs == 1 for t in stopped)
    assert all(t.result.n_docs == {"tiny_add": 32} and t.result.rungs == 2 for t in whole)
    assert all(t.race is not None and t.race.incumbent is not None and t.score < t.race.incumbent for t in stopped)
    assert all(t.race is None for t in trials.values() if t.kind == "baseline")
    assert not any(t.heldout for t in stopped)  # a partial score is never re-scored as a top-k candidate
    verdict = build_verdict(reference, [], trials)
    racing = verdict.racing
    assert racing is not None and racing.stopped_early == len(stopped)
    assert any(line.startswith(f"fidelity racing: {len(stopped)} of ") for line in verdict.lines())
    assert racing.docs_scored == 8 * len(stopped) + 32 * (racing.candidates - len(stopped))


def test_each_candidate_races_against_the_best_whole_score_of_the_baselines_and_earlier_generations(reference):
    _, trials = load_trials(reference)
    whole = {t.trial_id: t.score for t in trials.values() if t.score is not None and not t.stopped_early}
    for trial in trials.values():
        if trial.kind == "optimizer":
            generation_start = trial.trial_id // POPSIZE * POPSIZE
            earlier = [score for other, score in whole.items() if other < generation_start]
            assert trial.race is not None and trial.race.incumbent == max(earlier)


def resume_cut(reference: Path, copy: Path, keep: int, scheduler: Scheduler) -> None:
    """Resume a copy of `reference` whose journal was cut after its first `keep` lines (a kill -9)."""
    import shutil

    shutil.copytree(reference, copy)
    lines = (copy / "journal.jsonl").read_bytes().splitlines(keepends=True)
    (copy / "journal.jsonl").write_bytes(b"".join(lines[:keep]))
    run, spec, _ = open_run(copy)
    open_search(spec, run).run_with(scheduler)


@pytest.mark.parametrize("keep", [9, 17, 30, 44, 61])
def test_a_raced_run_killed_anywhere_resumes_to_the_uninterrupted_run(tmp_path, reference, keep):
    resume_cut(reference, tmp_path / "copy", keep, raced_scheduler(workers=2))
    assert state(tmp_path / "copy") == state(reference)


@pytest.mark.parametrize("keep", [17, 44])
def test_a_halved_run_killed_anywhere_resumes_to_the_uninterrupted_run(tmp_path, halved, keep):
    resume_cut(halved, tmp_path / "copy", keep, raced_scheduler(workers=2, score=close_score, z=3.0))
    assert state(tmp_path / "copy") == state(halved)


# Two generations of POPSIZE 4 are fewer than 8 / keep = 16 asks: halving ranks the latest 16.
RANKED = max(2 * POPSIZE, math.ceil(8 / 0.5))


def test_halving_cuts_at_the_top_half_of_the_latest_ranked_asks_first_rung_scores(halved, tmp_path):
    _, trials = load_trials(halved)
    scored = [t for t in trials.values() if t.kind == "optimizer" and t.result and t.result.rung_scores]
    first_rung = {t.trial_id: t.result.rung_scores[0] for t in scored}  # a failed candidate has none
    checked = 0
    for trial in scored:
        generation_start = trial.trial_id // POPSIZE * POPSIZE
        latest = sorted(other for other in first_rung if other < generation_start)[-RANKED:]
        window = sorted(first_rung[other] for other in latest)
        expected = window[len(window) - math.ceil(len(window) / 2)] if len(window) >= 2 else None  # lowest of top half
        race = trial.race
        assert race is not None and (race.cutoffs or (None,))[0] == expected
        if expected is None:
            continue
        checked += 1
        went_on = trial.result.rungs > 1
        score = trial.result.rung_scores[0]
        if score != expected:  # above the cutoff: racing decides; below it: stopped
            assert went_on is False or score > expected
        else:  # a tie at the cutoff: the draw journaled with the ask decides
            assert went_on is False or race.ties_go_on[0]
    assert checked >= 20
    stopped_by_cutoff = [
        t
        for t in scored
        if t.stopped_early and t.score + 3 * standard_error(t.result.metrics, t.result.n_docs) >= t.race.incumbent
    ]
    assert stopped_by_cutoff  # halving stopped candidates that racing alone would have gone on with
    alone = raced_run(tmp_path, "alone", score=close_score, z=3.0)
    racing_alone = build_verdict(alone, [], load_trials(alone)[1]).racing
    halving = build_verdict(halved, [], trials).racing
    assert halving is not None and racing_alone is not None and halving.share < racing_alone.share


def test_halving_under_tpe_ranks_the_latest_asks(tmp_path):
    fidelity = {"rungs": list(RUNGS), "z": 3.0, "keep": 0.5}
    evaluation = fake_spec_data(tmp_path, "tpe")["evaluation"] | {"fidelity": fidelity}
    data = fake_spec_data(tmp_path, "tpe", evaluation=evaluation, budget={"max_evals": 40})
    data["optimizer"] = {"name": "tpe", "seed": 0, "n_startup_trials": 8}
    spec = parse_spec(data, "spec", tmp_path)
    run_dir = create_run_dir(spec)
    open_search(spec, run_dir).run_with(raced_scheduler(score=close_score, z=3.0))
    _, trials = load_trials(run_dir)
    halved = [t for t in trials.values() if t.kind == "optimizer" and t.race and t.race.cutoffs]
    assert len(halved) >= 10  # once 2 asks are scored there is something to rank, one ask at a time
    assert any(t.stopped_early and t.score <= t.race.cutoffs[0] for t in halved)


def test_a_document_budget_is_a_ceiling_and_candidates_are_asked_while_a_whole_score_fits(docs_budgeted):
    _, trials = load_trials(docs_budgeted)
    searched = sorted(t.trial_id for t in trials.values() if t.kind == "optimizer")
    assert searched == list(range(len(searched)))
    docs = {t.trial_id: t.result.docs_scored for t in trials.values()}
    assert sum(docs.values()) <= MAX_DOCS and status(docs_budgeted)["docs_scored"] == sum(docs.values())
    # The candidate it did not ask would not have fitted had it, and the earlier ones of its
    # generation, been scored whole (32 documents), counting only the generations before.
    following = len(searched)
    generation = following // POPSIZE * POPSIZE
    earlier = sum(d for trial, d in docs.items() if trial < generation)
    assert earlier + (following - generation + 1) * 32 > MAX_DOCS
    assert any(t.stopped_early for t in trials.values())  # raced: stopped candidates bought more of them
    assert len(searched) > (MAX_DOCS - 7 * 32) // 32  # more candidates than the budget scores whole


@pytest.mark.parametrize("keep", [20, 57])
def test_a_run_with_a_document_budget_killed_anywhere_resumes_to_the_uninterrupted_run(tmp_path, docs_budgeted, keep):
    resume_cut(docs_budgeted, tmp_path / "copy", keep, raced_scheduler(workers=2))
    assert state(tmp_path / "copy") == state(docs_budgeted)
