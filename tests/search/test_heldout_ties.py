"""Trials tied on the search score at the top-k cut: all re-scored on held-out up to 2 x top_k, the
rest counted in the journal (`run_finished`) and in the verdict, never cut silently by trial id."""

from __future__ import annotations

from pathlib import Path

from fake_workers import FAILING_TRIAL, fake_scheduler, fake_spec_data, open_search

from evomerge.rundir.events import TrialResult
from evomerge.rundir.results import load_trials
from evomerge.rundir.trials import Trial
from evomerge.rundir.verdict import build_verdict
from evomerge.search.runs import create_run_dir
from evomerge.search.selection import heldout_candidates
from evomerge.spec import parse_spec


def completed(trial_id: int, score: float) -> Trial:
    kind = "optimizer" if trial_id >= 0 else "baseline"
    made = Trial(trial_id, kind, f"trial {trial_id}", {}, status="completed")
    made.result = TrialResult(trial_id, True, score, {"a": score}, {"a": 10})
    return made


def test_trials_tied_across_the_cut_are_all_re_scored_within_the_cap():
    scores = {-1: 0.1, 0: 0.9, 1: 0.5, 2: 0.7, 3: 0.5, 4: 0.5, 5: 0.2}
    trials = {i: completed(i, s) for i, s in scores.items()}
    chosen, ties = heldout_candidates(trials, top_k=3)
    assert [t.trial_id for t in chosen] == [-1, 0, 2, 1, 3, 4]
    assert ties == {"score": 0.5, "top_k": 3, "cap": 6, "tied": 3, "rescored": 3, "skipped": 0}


def test_past_the_cap_the_lowest_trial_ids_are_re_scored_and_the_rest_counted():
    trials = {i: completed(i, 0.9 if i == 7 else 0.5) for i in range(12)}
    chosen, ties = heldout_candidates(trials, top_k=2)
    assert [t.trial_id for t in chosen] == [7, 0, 1, 2]
    assert ties == {"score": 0.5, "top_k": 2, "cap": 4, "tied": 11, "rescored": 3, "skipped": 8}


def test_no_tie_report_when_the_cut_falls_between_two_scores():
    trials = {i: completed(i, s) for i, s in enumerate([0.9, 0.9, 0.5, 0.4])}
    chosen, ties = heldout_candidates(trials, top_k=2)
    assert [t.trial_id for t in chosen] == [0, 1] and ties is None


def test_a_search_whose_candidates_tie_journals_the_tie_and_the_verdict_tells_it(tmp_path):
    data = fake_spec_data(tmp_path / "runs", "ties", budget={"max_evals": 19})  # 7 baselines, 12 candidates
    spec = parse_spec(data, "spec", tmp_path)
    run_dir = create_run_dir(spec)
    flat = fake_scheduler(score=lambda trial, config, eval_set: 0.5 if trial >= 0 else 0.25)
    open_search(spec, run_dir).run_with(flat)

    events, trials = load_trials(Path(run_dir))
    rescored = sorted(e["trial"] for e in events if e["event"] == "heldout" and e["trial"] >= 0)
    assert rescored == [0, 1, 2, 3]  # top_k 2, so 4 in all; trial 5 failed and ties with nothing
    (finished,) = [e for e in events if e["event"] == "run_finished"]
    assert finished["heldout_ties"] == {"score": 0.5, "top_k": 2, "cap": 4, "tied": 11, "rescored": 4, "skipped": 7}
    assert FAILING_TRIAL not in rescored
    lines = build_verdict(run_dir, events, trials).lines()
    assert "11 trials tied at search score 0.5000 at the top-2 cut: 4 re-scored on held-out, 7 skipped" in "\n".join(
        lines
    )
