"""Contract tests shared by every optimizer in evomerge.optim, plus per-optimizer specifics.

The contract is what the search loop and resume rely on: seeded determinism, x0 and
enqueued points first, asks inside the box, failures tolerated, snapshot/restore and
journal replay reproducing the exact next ask, and caller bugs raising ValueError.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.errors import UserError
from evomerge.optim import Optimizer, make_optimizer
from evomerge.optim.cmaes import _failure_penalty

# cmaes_overlap: CMA-ES without the generation barrier (search version 2's default). NSGA-II
# runs the contract with one objective, in generations of 4 so its genetic steps are exercised.
ALL = ["cmaes", "cmaes_overlap", "tpe", "random", "nsga2"]
# Unequal widths and offsets, so a bug that ignores the box's scale or origin shows up.
LOWER = np.array([0.0, 0.0, -1.0, 0.1, 0.0, -3.0])
UPPER = np.array([1.0, 2.0, 1.0, 0.2, 1.0, 5.0])
X0 = np.array([0.1, 0.2, -0.8, 0.11, 0.9, -2.0])
OPTIMUM = np.array([0.7, 1.5, 0.4, 0.18, 0.2, 3.0])
# Few startup trials so TPE's model (not its random warm-up) is what the tests exercise.
SETTINGS = {
    "cmaes": {},
    "cmaes_overlap": {"overlap": True},
    "tpe": {"n_startup_trials": 5},
    "random": {},
    "nsga2": {"popsize": 4},
}


def build(name: str, seed: int = 0, **settings) -> Optimizer:
    registered = name.removesuffix("_overlap")
    return make_optimizer(registered, LOWER, UPPER, X0, seed, **{**SETTINGS[name], **settings})


def concave(x: np.ndarray) -> float:
    return -float(np.sum(((x - OPTIMUM) / (UPPER - LOWER)) ** 2))


def run_rounds(optimizer: Optimizer, rounds: int, batch: int = 4, score=concave) -> list:
    """Ask up to ``batch`` trials (fewer at a generation barrier), tell them newest first."""
    asks = []
    for _ in range(rounds):
        wave = []
        while len(wave) < batch and (ask := optimizer.ask()) is not None:
            wave.append(ask)
        assert wave, "ask returned None with nothing pending"
        for ask in reversed(wave):
            optimizer.tell(ask.trial_id, score(ask.x))
        asks.extend(wave)
    return asks


def stack(asks) -> np.ndarray:
    return np.stack([a.x for a in asks])


@pytest.mark.parametrize("name", ALL)
def test_same_seed_and_calls_give_same_asks(name):
    first, second = run_rounds(build(name, seed=7), 8), run_rounds(build(name, seed=7), 8)
    assert [a.trial_id for a in first] == list(range(len(first)))
    np.testing.assert_array_equal(stack(first), stack(second))


@pytest.mark.parametrize("name", ALL)
def test_different_seed_gives_different_asks(name):
    first, second = stack(run_rounds(build(name, seed=1), 8)), stack(run_rounds(build(name, seed=2), 8))
    np.testing.assert_array_equal(first[0], second[0])  # both start from x0
    assert not np.array_equal(first[1:], second[1:])


@pytest.mark.parametrize("name", ALL)
def test_asks_ignore_numpy_global_rng(name):
    """Anything else in the process may use np.random; the asks must not depend on it."""

    def reseeding_score(global_seed):
        def score(x):
            np.random.seed(global_seed)
            np.random.standard_normal(3)
            return concave(x)

        return score

    first = run_rounds(build(name), 6, score=reseeding_score(11))
    second = run_rounds(build(name), 6, score=reseeding_score(12))
    np.testing.assert_array_equal(stack(first), stack(second))


@pytest.mark.parametrize("name", ALL)
def test_first_ask_is_x0_then_enqueued_points(name):
    optimizer = build(name)
    seeds = [np.array([0.5, 1.0, 0.0, 0.15, 0.5, 1.0]), UPPER.copy()]
    for point in seeds:
        optimizer.enqueue(point)
    asks = [optimizer.ask() for _ in range(3)]
    np.testing.assert_array_equal(asks[0].x, X0)
    np.testing.assert_array_equal(asks[1].x, seeds[0])
    np.testing.assert_array_equal(asks[2].x, seeds[1])
    assert asks[0].x.dtype == np.float64


@pytest.mark.parametrize("name", ALL)
def test_enqueue_rejects_points_outside_the_box_or_of_wrong_length(name):
    optimizer = build(name)
    with pytest.raises(ValueError, match="outside the box"):
        optimizer.enqueue(UPPER + 0.01)
    with pytest.raises(ValueError, match="genome has 6"):
        optimizer.enqueue(X0[:5])


@pytest.mark.parametrize("name", ALL)
def test_asks_stay_inside_the_box_under_pressure_towards_a_corner(name):
    """Maximizing sum(x) drives the search into the upper corner, where bounds bite."""
    asks = stack(run_rounds(build(name), 25, score=lambda x: float(np.sum(x))))
    assert np.all(asks >= LOWER) and np.all(asks <= UPPER)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("failure", [None, math.nan, math.inf, -math.inf])
def test_failed_trials_are_tolerated_and_the_run_continues(name, failure):
    optimizer = build(name)
    fail_every_third = iter(range(10**6))

    def flaky(x):
        return failure if next(fail_every_third) % 3 == 0 else concave(x)

    asks = run_rounds(optimizer, 12, score=flaky)
    run_rounds(optimizer, 3, score=lambda x: failure)  # whole waves failing, too
    assert len(asks) >= 30 and not optimizer.pending
    assert optimizer.ask() is not None


@pytest.mark.parametrize("name", ALL)
def test_snapshot_at_a_clean_point_restores_the_same_future(name):
    original = build(name)
    run_rounds(original, 5)
    restored = Optimizer.restore(original.snapshot())
    assert type(restored) is type(original)
    np.testing.assert_array_equal(stack(run_rounds(original, 6)), stack(run_rounds(restored, 6)))


@pytest.mark.parametrize("name", ALL)
def test_snapshot_with_pending_trials_restores_the_same_future(name):
    """Mid-generation for CMA-ES: three of its nine asked, one told, two still out."""
    original = build(name)
    run_rounds(original, 1, batch=9)
    out = [original.ask() for _ in range(3)]
    original.tell(out[0].trial_id, concave(out[0].x))
    restored = type(original).restore(original.snapshot())
    assert restored.pending == original.pending == {out[1].trial_id, out[2].trial_id}

    def finish_and_continue(optimizer):
        nxt = optimizer.ask()
        for ask in (out[2], nxt, out[1]):
            optimizer.tell(ask.trial_id, concave(ask.x))
        return [nxt] + run_rounds(optimizer, 6)

    np.testing.assert_array_equal(stack(finish_and_continue(original)), stack(finish_and_continue(restored)))


@pytest.mark.parametrize("name", ALL)
def test_restore_plus_journal_replay_matches_the_uninterrupted_run(name):
    """Resume = restore the last snapshot, then replay the calls journaled after it."""
    journal = []  # ("ask", trial_id) | ("tell", trial_id, score) | ("enqueue", x)
    original = build(name)
    run_rounds(original, 3)
    blob = original.snapshot()
    scores = iter([0.5, None, math.nan, -1.0, 2.0, -0.25, 1.5, 0.0] * 4)
    original.enqueue(np.array([0.9, 0.1, 0.9, 0.19, 0.1, 4.0]))
    journal.append(("enqueue", np.array([0.9, 0.1, 0.9, 0.19, 0.1, 4.0])))
    for _ in range(3):
        wave = [a for a in (original.ask() for _ in range(4)) if a is not None]
        journal += [("ask", a.trial_id) for a in wave]
        for ask in wave[::-1]:
            score = next(scores)
            original.tell(ask.trial_id, score)
            journal.append(("tell", ask.trial_id, score))

    resumed = Optimizer.restore(blob)
    for call in journal:
        if call[0] == "ask":
            assert resumed.ask().trial_id == call[1]
        elif call[0] == "tell":
            resumed.tell(call[1], call[2])
        else:
            resumed.enqueue(call[1])
    np.testing.assert_array_equal(stack(run_rounds(original, 3)), stack(run_rounds(resumed, 3)))


@pytest.mark.parametrize("name", ["cmaes", "tpe"])
def test_improves_on_a_concave_objective_within_200_evaluations(name):
    optimizer = build(name, seed=3)
    best = max(concave(a.x) for a in run_rounds(optimizer, 50, batch=4))
    start = concave(X0)
    # Must close most of the gap to the optimum (score 0), not just get lucky once.
    assert best > 0.25 * start, (best, start)


@pytest.mark.parametrize("name", ALL)
def test_tell_for_unknown_or_already_told_trial_raises(name):
    optimizer = build(name)
    ask = optimizer.ask()
    with pytest.raises(ValueError, match="never asked"):
        optimizer.tell(ask.trial_id + 1, 1.0)
    optimizer.tell(ask.trial_id, 1.0)
    with pytest.raises(ValueError, match="already told"):
        optimizer.tell(ask.trial_id, 1.0)


@pytest.mark.parametrize("name", ALL)
def test_500_dim_genome_runs_a_full_generation(name):
    dim = 500
    lower, upper = np.zeros(dim), np.linspace(0.5, 2.0, dim)
    optimizer = make_optimizer(name.removesuffix("_overlap"), lower, upper, upper / 3, seed=0, **SETTINGS[name])
    for _ in range(2):
        wave = []
        while len(wave) < 12 and (ask := optimizer.ask()) is not None:
            wave.append(ask)
        for ask in wave:
            assert ask.x.shape == (dim,) and np.all((ask.x >= lower) & (ask.x <= upper))
            optimizer.tell(ask.trial_id, -float(np.sum(ask.x**2)))
    assert not optimizer.pending and optimizer.ask() is not None


def test_unknown_optimizer_name_suggests_the_closest():
    with pytest.raises(UserError, match="did you mean 'cmaes'"):
        make_optimizer("cmaess", LOWER, UPPER, X0, 0)


@pytest.mark.parametrize("name", ALL)
def test_unknown_setting_is_a_user_error(name):
    with pytest.raises(UserError, match="popsise"):
        build(name, popsise=4)


def test_cmaes_waits_at_the_generation_barrier():
    optimizer = build("cmaes", popsize=5)
    asks = [optimizer.ask() for _ in range(5)]
    assert optimizer.ask() is None and optimizer.generation == 0
    for ask in asks[:4]:
        optimizer.tell(ask.trial_id, concave(ask.x))
    assert optimizer.ask() is None  # one still out
    optimizer.tell(asks[4].trial_id, None)
    assert optimizer.generation == 1 and optimizer.ask().trial_id == 5


def test_cmaes_points_enqueued_mid_generation_lead_the_next_generation():
    optimizer = build("cmaes", popsize=4)
    first = [optimizer.ask() for _ in range(2)]
    seed_point = np.array([0.5, 1.0, 0.0, 0.15, 0.5, 1.0])
    optimizer.enqueue(seed_point)
    rest = [optimizer.ask() for _ in range(2)]
    assert not any(np.array_equal(a.x, seed_point) for a in first + rest)
    for ask in first + rest:
        optimizer.tell(ask.trial_id, concave(ask.x))
    np.testing.assert_array_equal(optimizer.ask().x, seed_point)


@pytest.mark.parametrize("worst", [-3.0, 0.0, 0.4, 1e12, -1e12])
def test_cmaes_failure_penalty_is_worse_than_any_seen_value(worst):
    assert _failure_penalty(worst) > worst


def test_cmaes_overlap_never_waits_and_tells_each_generation_its_first_popsize_results():
    optimizer = build("cmaes_overlap", popsize=4)
    asks = [optimizer.ask() for _ in range(6)]  # more than a generation: no barrier
    assert all(ask is not None for ask in asks) and optimizer.generation == 0
    for ask in asks[2:]:  # the last four finish first and make generation 0
        optimizer.tell(ask.trial_id, concave(ask.x))
    assert optimizer.generation == 1
    following = optimizer.ask()
    for ask in asks[:2]:  # stragglers of generation 0: accepted, not told to cma
        optimizer.tell(ask.trial_id, None)
    assert optimizer.generation == 1 and optimizer.pending == {following.trial_id}


def test_cmaes_overlap_asks_differ_from_the_barrier_only_after_the_first_generation():
    barrier, overlap = build("cmaes", popsize=4), build("cmaes_overlap", popsize=4)
    first = [(barrier.ask(), overlap.ask()) for _ in range(4)]
    assert all(np.array_equal(a.x, b.x) for a, b in first)
    assert barrier.ask() is None and overlap.ask() is not None
