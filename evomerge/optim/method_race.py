"""CMA-ES over a method gene: one CMA-ES per method, sharing the budget, the weakest raced out.

CMA-ES has no categorical variable, so a genome with a method gene (`Problem.choice`) gets one
CMA-ES per method, each over its own method's genes only, started at that method's default merge
and built from the spec's CMA-ES settings. The scheme:

* **Turns.** Asks go round-robin over the methods still in the race, in the spec's order; a
  method whose generation is not yet told (with the barrier) is passed over until it is.
* **Rounds.** A round ends when every method in the race has told `ROUND_GENERATIONS` more
  generations. The method whose best score so far is lowest then leaves the race (a method with
  no finished candidate counts as lowest; of equals, the later listed leaves), until one is left,
  which gets the rest of the budget. A raced-out method's candidates still in flight are told
  and counted, but it is asked nothing more.
* **Seeds.** A seeded point (a baseline) goes to the CMA-ES of the method it chooses.

Everything is a function of the ask/tell/enqueue sequence, so resume replays it exactly.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from evomerge.optim.base import Optimizer, Problem
from evomerge.optim.choice import MethodChoice
from evomerge.optim.cmaes import CMAESOptimizer
from evomerge.optim.settings import CMAESSettings

ROUND_GENERATIONS = 3  # generations each method in the race tells before the weakest leaves


class MethodRaceOptimizer(Optimizer):
    """A CMA-ES per method behind the ask/tell contract, racing the weakest method out each round."""

    name: ClassVar[str] = "cmaes"

    def __init__(self, settings: CMAESSettings, problem: Problem):
        super().__init__(problem, settings.seed, {"round_generations": ROUND_GENERATIONS})
        choice = problem.choice
        assert choice is not None, "a method race needs a method gene"
        self.choice: MethodChoice = choice
        self.strategies = [
            CMAESOptimizer(
                settings,
                Problem(
                    choice.own(self.lower, i),
                    choice.own(self.upper, i),
                    choice.own(self.x0, i),
                    problem.objectives,
                    problem.search_version,
                ),
            )
            for i in range(len(choice.names))
        ]
        self.racing = list(range(len(choice.names)))  # method indices still asked
        self.best: list[float | None] = [None] * len(choice.names)
        self.rounds = 0
        self._departures: list[int] = []
        self._turn = 0  # position in `racing` of the next method to ask
        self._asked_of: dict[int, tuple[int, int]] = {}  # trial id -> (method, its strategy's trial id)

    @property
    def block_size(self) -> int:
        return max(strategy.block_size for strategy in self.strategies)

    @property
    def raced_out(self) -> list[str]:
        """The methods no longer asked, in the order they left."""
        return [self.choice.names[i] for i in self._departures]

    def _propose(self, trial_id: int) -> np.ndarray | None:
        for step in range(len(self.racing)):
            position = (self._turn + step) % len(self.racing)
            method = self.racing[position]
            ask = self.strategies[method].ask()
            if ask is None:
                continue  # its generation waits for results (the barrier)
            self._turn = (position + 1) % len(self.racing)
            self._asked_of[trial_id] = (method, ask.trial_id)
            return self.choice.point(method, ask.x, self.x0)
        return None

    def _observe(self, trial_id: int, x: np.ndarray, score: float | None) -> None:
        method, inner = self._asked_of.pop(trial_id)
        self.strategies[method].tell(inner, score)
        if score is not None:
            best = self.best[method]
            self.best[method] = float(score) if best is None else max(best, float(score))
        self._end_round_if_due()

    def _end_round_if_due(self) -> None:
        if len(self.racing) < 2:
            return
        due = (self.rounds + 1) * ROUND_GENERATIONS
        if any(self.strategies[i].generation < due for i in self.racing):
            return
        weakest = min(reversed(self.racing), key=self._standing)  # of equals, the later listed
        self.racing.remove(weakest)
        self._departures.append(weakest)
        self.rounds += 1
        self._turn %= len(self.racing)

    def _standing(self, method: int) -> float:
        """Its best score so far; lowest when nothing of it finished."""
        best = self.best[method]
        return -math.inf if best is None else best

    def _enqueue_point(self, x: np.ndarray) -> None:
        method = self.choice.index_of(x[0])
        self.strategies[method].enqueue(self.choice.own(x, method))

    def _reattach(self) -> None:
        for strategy in self.strategies:
            strategy._reattach()


def create(settings: CMAESSettings, problem: Problem) -> MethodRaceOptimizer:
    """The method race, CMA-ES as the spec's `optimizer:` section sets it for each method."""
    return MethodRaceOptimizer(settings, problem)
