"""Multi-fidelity racing: score a candidate on nested shares of the search docs and stop it early.

A raced candidate is scored slice by slice (`EvalSet.slices`: disjoint seeded slices of every
task's doc subset, whose union is the subset an unraced search scores). After each slice the
docs scored so far give a partial score and its standard error; the candidate gets the next slice
only while `partial + z * SE` reaches the incumbent, the best fully scored candidate the driver
handed it. Everything here is pure arithmetic over `EvalResult`s, so the rule is tested without a
model, and a worker given the same slices' results and the same incumbent makes the same call.

Slices combine as doc-weighted means, which is exact for metrics lm-eval aggregates by a mean
(accuracy, exact match); `raceable_metric` refuses any other aggregation before a search starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from evomerge.evaluation.scores import EvalResult, standard_error, weighted_score


def combine(parts: list[EvalResult], weights: Mapping[str, float]) -> EvalResult:
    """The result over the union of disjoint slices: per task, the doc-weighted mean of the slices."""
    names = list(parts[0].metrics)
    n_docs = {name: sum(part.n_docs[name] for part in parts) for name in names}
    metrics = {
        name: sum(part.metrics[name] * part.n_docs[name] for part in parts) / max(1, n_docs[name]) for name in names
    }
    seconds = sum(part.seconds for part in parts)
    return EvalResult(weighted_score(metrics, weights), metrics, n_docs, seconds)


def can_still_win(partial: EvalResult, weights: Mapping[str, float], incumbent: float, z: float) -> bool:
    """Whether the candidate's optimistic score (partial + z SE) reaches the incumbent."""
    return partial.score + z * standard_error(partial.metrics, partial.n_docs, weights) >= incumbent


@dataclass(frozen=True)
class RaceOutcome:
    """A raced candidate's result over the slices it was scored on."""

    result: EvalResult
    rungs_scored: int  # 1 .. number of rungs
    stopped_early: bool


def race(
    score_slice: Callable[[int], EvalResult],
    rungs: int,
    weights: Mapping[str, float],
    incumbent: float | None,
    z: float,
) -> RaceOutcome:
    """Score slices 0, 1, ... until the candidate can no longer win or every slice is scored.

    Without an incumbent (a baseline, or the first candidates) every slice is scored.
    """
    parts = [score_slice(0)]
    while len(parts) < rungs:
        partial = combine(parts, weights)
        if incumbent is not None and not can_still_win(partial, weights, incumbent, z):
            return RaceOutcome(partial, len(parts), stopped_early=True)
        parts.append(score_slice(len(parts)))
    return RaceOutcome(combine(parts, weights), rungs, stopped_early=False)


def raceable_metric(task, metric: str) -> str | None:
    """Why the scored metric of an lm-eval Task cannot be raced (not aggregated by a mean), or None."""
    from lm_eval.api.metrics import mean

    aggregation = task.aggregation().get(metric)
    if aggregation is mean:
        return None
    name = getattr(aggregation, "__name__", str(aggregation))
    return f"its metric '{metric}' aggregates by {name}, not a mean, so slices of its docs do not add up"


class Incumbents:
    """The score each new candidate races against: the best fully scored baseline (negative trial
    ids) or candidate of an earlier block of `block` asks (trial ids below its own block's first).

    With CMA-ES's generation barrier and `block` = popsize, the blocks are its generations, all
    finished when a candidate of the next one is asked; so the incumbent does not depend on which
    worker finished first, and two runs with one seed race alike.
    """

    def __init__(self, block: int):
        self.block = max(1, block)
        self.best_baseline: float | None = None
        self.best_of_block: dict[int, float] = {}

    def add(self, trial_id: int, score: float) -> None:
        """A fully scored result (never a partial score of a candidate stopped early)."""
        if trial_id < 0:
            self.best_baseline = _max(self.best_baseline, score)
        else:
            block = trial_id // self.block
            self.best_of_block[block] = _max(self.best_of_block.get(block), score)

    def for_trial(self, trial_id: int) -> float | None:
        earlier = [best for block, best in self.best_of_block.items() if block < trial_id // self.block]
        return max([*earlier, *([] if self.best_baseline is None else [self.best_baseline])], default=None)


def _max(current: float | None, score: float) -> float:
    return score if current is None else max(current, score)
