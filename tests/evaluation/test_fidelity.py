"""Fidelity racing's pure parts: nested seeded slices, how slices combine, when a candidate stops,
and which incumbent it races against (evaluation/fidelity.py, evaluate.seeded_subset)."""

from __future__ import annotations

import pytest

from evomerge.evaluation.config import FidelitySpec
from evomerge.evaluation.evaluate import seeded_subset
from evomerge.evaluation.fidelity import Incumbents, combine, race
from evomerge.evaluation.scores import EvalResult, standard_error


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


def slices(scores: list[float], docs: int = 25):
    called = []

    def score_slice(rung: int) -> EvalResult:
        called.append(rung)
        return EvalResult(scores[rung], {"t": scores[rung]}, {"t": docs}, 0.1)

    return score_slice, called


def test_a_candidate_is_stopped_once_its_optimistic_score_misses_the_incumbent():
    score_slice, called = slices([0.2, 0.9, 0.9])
    outcome = race(score_slice, 3, {"t": 1.0}, incumbent=0.6, z=2.0)
    se = standard_error({"t": 0.2}, {"t": 25})
    assert 0.2 + 2 * se < 0.6
    assert called == [0] and outcome.stopped_early and outcome.rungs_scored == 1
    assert outcome.result.n_docs == {"t": 25}


def test_a_candidate_that_can_still_win_gets_every_slice_and_without_an_incumbent_always():
    for incumbent in (0.6, None):
        score_slice, called = slices([0.55, 0.7, 0.8])
        outcome = race(score_slice, 3, {"t": 1.0}, incumbent=incumbent, z=2.0)
        assert called == [0, 1, 2] and not outcome.stopped_early and outcome.result.n_docs == {"t": 75}


def test_a_wider_z_stops_fewer_candidates():
    assert race(slices([0.4, 0.9])[0], 2, {"t": 1.0}, 0.6, z=1.0).stopped_early
    assert not race(slices([0.4, 0.9])[0], 2, {"t": 1.0}, 0.6, z=3.0).stopped_early


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
