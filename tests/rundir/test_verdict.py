"""The verdict a search ends with (evomerge/rundir/verdict.py): rows, margins in SE, the winner that
`export` gives, evaluations to 95 %, ties at the top-k cut and the plain sentence when the search
did not beat the baselines; and `status`'s evals/min over the search phase only."""

from __future__ import annotations

import math

import pytest

from evomerge.rundir.events import TrialResult
from evomerge.rundir.results import default_export, search_rate
from evomerge.rundir.trials import Trial
from evomerge.rundir.verdict import RowKind, build_verdict, evals_to_reach, searched_scores

N_DOCS = 400


def result(trial: int, score: float | None) -> TrialResult:
    if score is None:
        return TrialResult.failure(trial, "CUDA out of memory")
    return TrialResult(trial, True, score, {"a": score, "b": score}, {"a": N_DOCS, "b": N_DOCS})


def trial(trial_id: int, label: str, search: float | None, heldout: float | None = None) -> Trial:
    kind = "optimizer" if trial_id >= 0 else "baseline"
    made = Trial(trial_id, kind, label, {}, status="completed" if search is not None else "failed")
    made.result = result(trial_id, search)
    made.heldout = None if heldout is None else result(trial_id, heldout)
    return made


def run(*trials: Trial, finished: bool = True, ties: dict | None = None) -> tuple[list[dict], dict[int, Trial]]:
    events = [{"event": "completed" if t.score is not None else "failed", "trial": t.trial_id} for t in trials]
    if finished:
        events.append({"event": "run_finished", **({"heldout_ties": ties} if ties else {})})
    return events, {t.trial_id: t for t in trials}


def baselines(parent: float = 0.5, merge: float = 0.6) -> list[Trial]:
    return [
        trial(-1, "base", 0.1, 0.1),
        trial(-2, "parent:math", parent, parent),
        trial(-3, "parent:code", parent - 0.1, parent - 0.1),
        trial(-4, "ties (density=0.5)", merge, merge),
    ]


def test_margins_are_the_best_evolved_held_out_score_over_each_rival_in_standard_errors():
    events, trials = run(*baselines(), trial(0, "trial 0", 0.85, 0.80), trial(1, "trial 1", 0.9, 0.75))
    verdict = build_verdict("runs/x", events, trials)
    assert verdict.basis == "held-out"
    assert [row.trial for row in verdict.rows] == [0, 1, -4, -2, -3, -1]
    assert [row.kind for row in verdict.rows[:3]] == [RowKind.EVOLVED, RowKind.EVOLVED, RowKind.DEFAULT_MERGE]
    se = {score: math.sqrt(score * (1 - score) / N_DOCS / 2) for score in (0.8, 0.5, 0.6)}
    parent, merge = verdict.over_parent, verdict.over_default_merge
    assert parent.rival.label == "parent:math" and parent.gap == pytest.approx(0.3)
    assert parent.se == pytest.approx(math.hypot(se[0.8], se[0.5]))
    assert merge.rival.label == "ties (density=0.5)" and merge.sigmas == pytest.approx(
        0.2 / math.hypot(se[0.8], se[0.6])
    )
    lines = verdict.lines()
    assert f"held-out margin over the best parent (parent:math): +0.3000 = {parent.sigmas:.1f} SE" in lines
    assert f"held-out margin over the best default merge (ties (density=0.5)): +0.2000 = {merge.sigmas:.1f} SE" in lines
    assert "winner: trial 0 (evolved), the held-out winner; export it with:" in lines
    assert "  evomerge export runs/x -o best.yaml" in lines
    assert verdict.beats_baselines and verdict.advice is None


@pytest.mark.parametrize("evolved_heldout", [0.6, 0.605, 0.55])
def test_a_search_that_does_not_beat_the_best_baseline_by_one_se_says_so_and_what_to_try(evolved_heldout):
    events, trials = run(*baselines(), trial(0, "trial 0", 0.85, evolved_heldout))
    verdict = build_verdict("runs/x", events, trials)
    assert not verdict.beats_baselines
    assert verdict.advice.startswith(
        "No evolved merge beats the best baseline (ties (density=0.5)) by at least 1 SE on the held-out tasks"
    )
    for remedy in ("budget.max_evals", "merge.method", "genome.layer_groups"):
        assert remedy in verdict.advice
    assert verdict.lines()[-1] == verdict.advice
    # Before the run finished, the verdict is not in yet.
    assert build_verdict("runs/x", *run(*baselines(), trial(0, "trial 0", 0.85, 0.6), finished=False)).advice is None


def test_the_winner_is_what_export_gives_even_when_a_baseline_wins_held_out():
    events, trials = run(*baselines(parent=0.9), trial(0, "trial 0", 0.95, 0.7))
    verdict = build_verdict("runs/x", events, trials)
    assert verdict.winner.trial == default_export(trials).trial_id == -2
    assert verdict.winner.name == "parent:math" and verdict.over_parent.gap < 0
    assert "the held-out winner" in verdict.lines()[-3]


def test_without_held_out_scores_the_verdict_compares_search_scores_and_shows_the_best_searched_trial():
    trials = [trial(-1, "base", 0.2), trial(-2, "parent:math", 0.5), trial(0, "trial 0", 0.7), trial(1, "trial 1", 0.8)]
    verdict = build_verdict("runs/x", *run(*trials))
    assert verdict.basis == "search"
    assert [row.trial for row in verdict.rows] == [1, -2, -1], "the best evolved trial stands for the search"
    assert verdict.winner.trial == 1 == default_export({t.trial_id: t for t in trials}).trial_id
    assert any(line.startswith("search margin over the best parent (parent:math): +0.3000") for line in verdict.lines())
    assert verdict.tasks == ["a", "b"]


def test_ties_at_the_top_k_cut_are_reported():
    ties = {"score": 0.85, "top_k": 5, "cap": 10, "tied": 14, "rescored": 9, "skipped": 5}
    verdict = build_verdict("runs/x", *run(*baselines(), trial(0, "trial 0", 0.85, 0.8), ties=ties))
    assert (
        "14 trials tied at search score 0.8500 at the top-5 cut: 9 re-scored on held-out, 5 skipped "
        "(at most 10 trials are re-scored)" in verdict.lines()
    )


def test_reach_counts_evolved_candidates_in_trial_order_whatever_order_they_finished_in():
    """Trial 2 finished first; in trial order (0, 1, 2) the best is reached only at the third."""
    trials = [*baselines(), trial(2, "trial 2", 0.9), trial(0, "trial 0", 0.1), trial(1, "trial 1", None)]
    events, by_id = run(*trials)
    assert searched_scores(events, by_id) == [0.1, None, 0.9]
    verdict = build_verdict("runs/x", events, by_id)
    assert (verdict.reach, verdict.searched) == (3, 3)
    assert "evaluations to reach 95% of the final best: 3 of 3 evolved candidates searched" in verdict.lines()
    reordered = [*baselines(), trial(0, "trial 0", 0.1), trial(1, "trial 1", None), trial(2, "trial 2", 0.9)]
    assert build_verdict("runs/x", *run(*reordered)).reach == 3, "the same figure in any finishing order"


def test_evals_to_reach_counts_failures_and_stops_at_first_crossing():
    assert evals_to_reach([0.1, None, 0.5, 0.96, 1.0]) == 4
    assert evals_to_reach([0.2, 0.1, 0.3]) == 3


def test_evals_to_reach_measures_five_percent_below_a_negative_or_zero_best():
    # 0.95 x -2 = -1.9 lies above the final best; the figure must still be reached, at -2.05 (within 0.1).
    assert evals_to_reach([-5.0, -2.05, -3.0, -2.0]) == 2
    assert evals_to_reach([-5.0, -2.2, -2.0]) == 3
    assert evals_to_reach([-1.0, None, 0.0, -0.5]) == 3


def test_evals_to_reach_is_none_without_a_success():
    assert evals_to_reach([]) is None
    assert evals_to_reach([None, None]) is None


def test_status_evals_per_minute_leaves_out_the_baseline_phase_and_idle_time_between_starts():
    trials = {t.trial_id: t for t in [*baselines(), *(trial(i, f"trial {i}", 0.5) for i in range(6))]}
    # Baselines take the first 600 s of search time; six candidates the next 120 s, split by a
    # resume a day later (wall-clock time jumps, search time does not).
    events = [{"event": "completed", "trial": -1 - i, "time": 100.0 * i, "search_s": 150.0 * (i + 1)} for i in range(4)]
    events += [
        {
            "event": "completed",
            "trial": i,
            "time": 600.0 + 20 * i + (86_400 if i >= 3 else 0),
            "search_s": 620.0 + 20 * i,
        }
        for i in range(6)
    ]
    assert search_rate(events, trials) == 6 / 2  # 6 evaluations in 2 minutes, not 10 in 12 or a day
    assert search_rate(events[:4], trials) is None  # only baselines so far
