"""Fidelity racing's pure parts: nested seeded slices, how slices combine, when a candidate stops,
which incumbent it races against and successive halving's cutoffs (evaluation/fidelity.py,
evaluate.seeded_subset)."""

from __future__ import annotations

import pytest

from evomerge.evaluation.config import FidelitySpec
from evomerge.evaluation.evaluate import seeded_subset
from evomerge.evaluation.fidelity import (
    Incumbents,
    RaceTarget,
    RaceTargets,
    RungCutoffs,
    TopShare,
    combine,
    race,
    top_share,
)
from evomerge.evaluation.scores import EvalResult, combined_score, standard_error, subtask_scores


@pytest.mark.parametrize(("n_docs", "limit"), [(240, 120), (50, None), (50, 80), (7, 5)])
def test_slices_are_disjoint_seeded_draws_whose_union_is_the_unraced_subset(n_docs, limit):
    rungs = [0.1, 0.25, 0.6, 1.0]
    bounds = list(zip([0.0, *rungs[:-1]], rungs, strict=True))
    slices = [seeded_subset(n_docs, limit, 3, "task", share) for share in bounds]
    union = sorted(i for part in slices for i in part)
    assert union == seeded_subset(n_docs, limit, 3, "task")  # the unraced run's docs, unchanged
    assert len(set(union)) == len(union)
    assert slices[0] != list(range(len(slices[0])))  # a random draw, not the first docs
    assert slices == [seeded_subset(n_docs, limit, 3, "task", share) for share in bounds]
    assert slices != [seeded_subset(n_docs, limit, 4, "task", share) for share in bounds]


def test_slices_of_a_quarter_hold_a_quarter_of_the_docs_rounded_up():
    first = seeded_subset(240, 120, 0, "demo_reverse_search", (0.0, 0.25))
    rest = seeded_subset(240, 120, 0, "demo_reverse_search", (0.25, 1.0))
    assert (len(first), len(rest)) == (30, 90)


def test_slices_combine_as_doc_weighted_means_exactly_for_a_mean_metric():
    hits = [1, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    first = EvalResult(sum(hits[:4]) / 4, {"a": sum(hits[:4]) / 4}, {"a": 4}, 0.5)
    rest = EvalResult(sum(hits[4:]) / 6, {"a": sum(hits[4:]) / 6}, {"a": 6}, 1.0)
    combined = combine([first, rest], {"a": 1.0})
    assert combined.metrics["a"] == pytest.approx(sum(hits) / 10, abs=1e-15)
    assert combined.n_docs == {"a": 10} and combined.seconds == 1.5


def test_weights_apply_to_the_combined_task_metrics():
    parts = [
        EvalResult(0, {"a": 1.0, "b": 0.0}, {"a": 2, "b": 2}, 0),
        EvalResult(0, {"a": 0.0, "b": 0.0}, {"a": 2, "b": 6}, 0),
    ]
    assert combine(parts, {"a": 3.0, "b": 1.0}).score == pytest.approx(0.75 * 0.5)


@pytest.mark.parametrize("weighting", ["size", "equal"])
def test_a_group_combines_leaf_by_leaf_and_is_scored_from_its_combined_leaves(weighting):
    def part(hits: dict[str, list[int]]) -> EvalResult:
        leaves = {leaf: sum(h) / len(h) for leaf, h in hits.items()}
        docs = {leaf: len(h) for leaf, h in hits.items()}
        group = combined_score(weighting, leaves, docs)
        return EvalResult(
            group, {"g": group}, {"g": sum(docs.values())}, 0, {"g": subtask_scores(weighting, leaves, docs)}
        )

    first, rest = part({"x": [1, 0], "y": [1, 1, 1]}), part({"x": [0, 0, 1, 1], "y": [0]})
    whole = part({"x": [1, 0, 0, 0, 1, 1], "y": [1, 1, 1, 0]})
    combined = combine([first, rest], {"g": 1.0})
    assert combined.metrics["g"] == pytest.approx(whole.metrics["g"], abs=1e-15)
    assert combined.subtasks == whole.subtasks and combined.n_docs == whole.n_docs


def slices(scores: list[float], docs: int = 25):
    called = []

    def score_slice(rung: int) -> EvalResult:
        called.append(rung)
        return EvalResult(scores[rung], {"t": scores[rung]}, {"t": docs}, 0.1)

    return score_slice, called


def test_a_candidate_is_stopped_once_its_optimistic_score_misses_the_incumbent():
    score_slice, called = slices([0.2, 0.9, 0.9])
    outcome = race(score_slice, 3, {"t": 1.0}, RaceTarget(0.6), z=2.0)
    se = standard_error({"t": 0.2}, {"t": 25})
    assert 0.2 + 2 * se < 0.6
    assert called == [0] and outcome.stopped_early and outcome.rungs_scored == 1
    assert outcome.result.n_docs == {"t": 25}


def test_a_candidate_that_can_still_win_gets_every_slice_and_without_an_incumbent_always():
    for incumbent in (0.6, None):
        score_slice, called = slices([0.55, 0.7, 0.8])
        outcome = race(score_slice, 3, {"t": 1.0}, None if incumbent is None else RaceTarget(incumbent), z=2.0)
        assert called == [0, 1, 2] and not outcome.stopped_early and outcome.result.n_docs == {"t": 75}


def test_a_wider_z_stops_fewer_candidates():
    assert race(slices([0.4, 0.9])[0], 2, {"t": 1.0}, RaceTarget(0.6), z=1.0).stopped_early
    assert not race(slices([0.4, 0.9])[0], 2, {"t": 1.0}, RaceTarget(0.6), z=3.0).stopped_early


def test_the_incumbent_is_the_best_whole_score_of_the_baselines_and_earlier_blocks():
    incumbents = Incumbents(block=4)
    assert incumbents.for_trial(0) is None
    incumbents.add(-1, 0.3)
    incumbents.add(-2, 0.1)
    assert incumbents.for_trial(0) == 0.3
    incumbents.add(2, 0.9)  # generation 0
    assert incumbents.for_trial(3) == 0.3  # same generation: not yet
    assert incumbents.for_trial(4) == incumbents.for_trial(7) == 0.9
    incumbents.add(5, 0.95)
    assert incumbents.for_trial(7) == 0.9 and incumbents.for_trial(8) == 0.95


def test_rungs_must_increase_to_every_doc():
    assert FidelitySpec().rungs == [0.2, 1.0]
    for rungs in ([0.5, 0.25, 1.0], [0.25, 0.5], [0.0, 1.0], [1.0]):
        with pytest.raises(ValueError):
            FidelitySpec(rungs=rungs)


def test_a_candidate_below_a_rung_cutoff_stops_there_even_when_it_could_still_beat_the_incumbent():
    score_slice, called = slices([0.5, 0.7, 0.9])
    outcome = race(score_slice, 3, {"t": 1.0}, RaceTarget(0.3, cutoffs=(0.4, 0.6)), z=2.0)
    assert called == [0, 1] and outcome.stopped_early and outcome.rungs_scored == 2  # 0.6 does not beat 0.6
    assert outcome.rung_scores == pytest.approx((0.5, 0.6)) and outcome.result.score == pytest.approx(0.6)
    score_slice, called = slices([0.5, 0.71, 0.9])
    outcome = race(score_slice, 3, {"t": 1.0}, RaceTarget(0.3, cutoffs=(0.4, 0.6)), z=2.0)
    assert called == [0, 1, 2] and not outcome.stopped_early
    assert outcome.rung_scores == pytest.approx((0.5, 0.605, 2.11 / 3)) and outcome.result.score == pytest.approx(
        2.11 / 3
    )


def test_a_rung_without_a_cutoff_yet_lets_every_candidate_on():
    score_slice, called = slices([0.1, 0.2])
    assert not race(score_slice, 2, {"t": 1.0}, RaceTarget(None, cutoffs=(None,)), z=2.0).stopped_early


@pytest.mark.parametrize(
    ("scores", "keep", "cutoff", "tie_share"),
    [
        ([0.1, 0.9, 0.5, 0.3, 0.7, 0.2], 1 / 3, 0.7, 1.0),  # the top 2 of 6
        ([0.1, 0.9, 0.5, 0.3, 0.7, 0.2], 0.5, 0.5, 1.0),  # the top 3 of 6
        ([0.1, 0.9, 0.5, 0.3, 0.7], 1 / 3, 0.7, 1.0),  # a third of 5, rounded up: the top 2
        ([0.4, 0.6], 1 / 3, None, None),  # fewer scores than 1/keep: nothing to rank against yet
        ([0.9, 0.4, 0.4, 0.4, 0.1, 0.0], 0.5, 0.4, 2 / 3),  # 2 of the 3 tied at 0.4 are in the top 3
        ([1.0] * 6, 1 / 3, 1.0, 1 / 3),  # all perfect: a third of them go on
        ([0.3, 0.1 + 0.2, 0.2, 0.1], 0.5, 0.3, 1.0),  # 0.1 + 0.2 is 0.30000000000000004: a tie
    ],
)
def test_the_top_share_ends_at_its_lowest_score_and_splits_a_tie_there(scores, keep, cutoff, tie_share):
    edge = top_share(scores, keep)
    assert (edge and edge.cutoff, edge and edge.tie_share) == (cutoff, pytest.approx(tie_share) if edge else None)


def test_a_tie_at_the_cutoff_goes_on_only_where_the_target_says_so():
    for ties_go_on in (True, False):
        score_slice, called = slices([0.5, 0.9])
        outcome = race(score_slice, 2, {"t": 1.0}, RaceTarget(None, (0.5,), (ties_go_on,)), z=2.0)
        assert outcome.stopped_early is not ties_go_on


def test_rung_cutoffs_rank_the_latest_earlier_blocks_and_later_rungs_only_their_survivors():
    cutoffs = RungCutoffs(block=4, rungs=3, keep=0.5, window=8)
    assert cutoffs.for_trial(0) == (None, None)
    cutoffs.add(-1, (0.99, 0.99, 0.99))  # a baseline: never ranked
    for trial_id, rung_scores in enumerate([(0.1,), (0.2,), (0.6, 0.5), (0.8, 0.7, 0.75)]):
        cutoffs.add(trial_id, rung_scores)
    assert cutoffs.for_trial(3) == (None, None)  # its own block is not finished under a barrier
    # Rung 0 ranks all four (top half: 0.6 and up); rung 1 only the two that went on (top 1: 0.7).
    assert cutoffs.for_trial(4) == (TopShare(0.6, 1.0), TopShare(0.7, 1.0))
    for trial_id, rung_scores in zip(range(4, 8), [(0.3,), (0.35,), (0.4,), (0.45,)], strict=True):
        cutoffs.add(trial_id, rung_scores)
    # The window keeps the latest 8 candidates: both blocks; then the latest block pushes out the first.
    assert cutoffs.for_trial(8) == (TopShare(0.4, 1.0), TopShare(0.7, 1.0))
    for trial_id in range(8, 12):
        cutoffs.add(trial_id, (0.05,))
    assert cutoffs.for_trial(12) == (TopShare(0.3, 1.0), None)  # no survivor to rank at rung 1 in the window


def test_race_targets_hand_out_the_incumbent_the_cutoffs_and_seeded_tie_draws():
    targets = RaceTargets(block=2, rungs=2, keep=0.5)
    targets.add(-1, 0.4, (0.45, 0.4))
    assert targets.for_trial(0) == RaceTarget(0.4)  # nothing searched to rank against yet
    targets.add(0, None, (0.1,))  # stopped early: not an incumbent, but ranked
    targets.add(1, 0.5, (0.6, 0.5))
    assert targets.for_trial(2) == RaceTarget(0.5, (0.6,), (True,))
    assert RaceTargets(block=2, rungs=2, keep=None).for_trial(2) == RaceTarget(None)
    one_ask_blocks = RaceTargets(block=1, rungs=2, keep=0.5)  # TPE, random: rank the latest 16 asks
    for trial_id in range(20):
        one_ask_blocks.add(trial_id, None, (trial_id / 100,))
    assert one_ask_blocks.for_trial(20).cutoffs == (0.12,)  # the top half of 0.04 .. 0.19
    tied = RaceTargets(block=4, rungs=2, keep=0.25, seed=7)
    for trial_id in range(4):
        tied.add(trial_id, None, (0.5,))  # four ties, one place in the top quarter
    draws = [tied.for_trial(trial_id).ties_go_on[0] for trial_id in range(4, 404)]
    assert 0.15 < sum(draws) / len(draws) < 0.35
    assert draws == [tied.for_trial(trial_id).ties_go_on[0] for trial_id in range(4, 404)]  # seeded: the same again


def test_a_race_target_survives_the_journal():
    for target in (RaceTarget(0.5), RaceTarget(0.5, (0.6, None), (True, False)), RaceTarget(None, (0.2,), (False,))):
        assert RaceTarget.from_journal(target.to_journal()) == target
    assert RaceTarget.from_journal({}) is None
