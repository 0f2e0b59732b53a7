"""Multi-fidelity racing: score a candidate on nested shares of the search docs and stop it early.

A raced candidate is scored slice by slice (`EvalSet.slices`: disjoint seeded slices of every
task's doc subset, whose union is the subset an unraced search scores). After each slice the
docs scored so far give a partial score and its standard error; the candidate gets the next slice
only while `partial + z * SE` reaches the incumbent, the best fully scored candidate the driver
handed it. With `fidelity.keep` (successive halving) it must also rank in the top `keep` share of
the partial scores recent candidates had at that rung: this bounds the documents scored however
close the candidates are, where the confidence bound alone stops few candidates that sit near the
incumbent. Everything here is pure arithmetic over `EvalResult`s, so the rules are tested without
a model, and a worker given the same slices' results and the same `RaceTarget` makes the same call.

Slices combine as doc-weighted means, which is exact for metrics lm-eval aggregates by a mean
(accuracy, exact match); `raceable_metric` refuses any other aggregation before a search starts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from evomerge.evaluation.scores import EvalResult, combined_score, standard_error, subtask_scores, weighted_score

# Partial scores over the same number of docs are ties when they differ by rounding only: the
# same hits spread differently over the tasks can sum to weighted means a few ulps apart.
TIE_TOLERANCE = 1e-9


def combine(parts: list[EvalResult], weights: Mapping[str, float]) -> EvalResult:
    """The result over the union of disjoint slices: per task, the doc-weighted mean of the slices.

    A group or tag is combined leaf by leaf, then scored from its combined leaves.
    """
    names = list(parts[0].metrics)
    n_docs = {name: sum(part.n_docs[name] for part in parts) for name in names}
    metrics = {name: _pooled([(part.metrics[name], part.n_docs[name]) for part in parts]) for name in names}
    subtasks = {}
    for name, first in parts[0].subtasks.items():
        leaf_docs = {leaf: sum(part.subtasks[name]["n_docs"][leaf] for part in parts) for leaf in first["metrics"]}
        leaves = {
            leaf: _pooled(
                [(part.subtasks[name]["metrics"][leaf], part.subtasks[name]["n_docs"][leaf]) for part in parts]
            )
            for leaf in first["metrics"]
        }
        subtasks[name] = subtask_scores(first["weighting"], leaves, leaf_docs)
        metrics[name] = combined_score(first["weighting"], leaves, leaf_docs)
    seconds = sum(part.seconds for part in parts)
    return EvalResult(weighted_score(metrics, weights), metrics, n_docs, seconds, subtasks)


def _pooled(values: list[tuple[float, int]]) -> float:
    """The doc-weighted mean of (value, docs) pairs."""
    return sum(value * n for value, n in values) / max(1, sum(n for _, n in values))


def can_still_win(partial: EvalResult, weights: Mapping[str, float], incumbent: float, z: float) -> bool:
    """Whether the candidate's optimistic score (partial + z SE) reaches the incumbent."""
    se = standard_error(partial.metrics, partial.n_docs, weights, partial.subtasks)
    return partial.score + z * se >= incumbent


@dataclass(frozen=True)
class RaceTarget:
    """What a raced candidate must keep up with to get its next slice, fixed when it is asked.

    `incumbent`: the best fully scored result; the candidate goes on while it can still beat it.
    `cutoffs`: successive halving (`fidelity.keep`), one per rung before the last; the candidate
    goes on only while its partial score is above that rung's cutoff, or equal to it where
    `ties_go_on` says so for that rung (None: no cutoff there yet).
    """

    incumbent: float | None = None
    cutoffs: tuple[float | None, ...] = ()
    ties_go_on: tuple[bool, ...] = ()

    def goes_on(self, partial: EvalResult, rung: int, weights: Mapping[str, float], z: float) -> bool:
        """Whether a candidate with `partial` over slices 0..`rung` gets the next slice."""
        if self.incumbent is not None and not can_still_win(partial, weights, self.incumbent, z):
            return False
        cutoff = self.cutoffs[rung] if rung < len(self.cutoffs) else None
        if cutoff is None or partial.score > cutoff + TIE_TOLERANCE:
            return True
        return partial.score >= cutoff - TIE_TOLERANCE and rung < len(self.ties_go_on) and self.ties_go_on[rung]

    def to_journal(self) -> dict:
        """The ask event's fields for it: `race_against`, and `race_cutoffs` and `race_ties_go_on` when halving."""
        fields = {} if self.incumbent is None else {"race_against": self.incumbent}
        if self.cutoffs:
            fields |= {"race_cutoffs": list(self.cutoffs), "race_ties_go_on": list(self.ties_go_on)}
        return fields

    @classmethod
    def from_journal(cls, event: dict) -> RaceTarget | None:
        """The target an ask event journaled; None when it raced against nothing (a baseline)."""
        if event.get("race_against") is None and not event.get("race_cutoffs"):
            return None
        cutoffs = tuple(event.get("race_cutoffs") or ())
        return cls(event.get("race_against"), cutoffs, tuple(event.get("race_ties_go_on") or ()))


@dataclass(frozen=True)
class RaceOutcome:
    """A raced candidate's result over the slices it was scored on."""

    result: EvalResult
    rungs_scored: int  # 1 .. number of rungs
    stopped_early: bool
    rung_scores: tuple[float, ...] = ()  # the partial score after each rung scored (the last: `result`'s)


def race(
    score_slice: Callable[[int], EvalResult],
    rungs: int,
    weights: Mapping[str, float],
    target: RaceTarget | None,
    z: float,
) -> RaceOutcome:
    """Score slices 0, 1, ... until the candidate falls behind `target` or every slice is scored.

    Without a target (a baseline) every slice is scored.
    """
    parts = [score_slice(0)]
    rung_scores: list[float] = []
    while True:
        partial = combine(parts, weights)
        rung_scores.append(partial.score)
        if len(parts) == rungs:
            return RaceOutcome(partial, rungs, stopped_early=False, rung_scores=tuple(rung_scores))
        if target is not None and not target.goes_on(partial, len(parts) - 1, weights, z):
            return RaceOutcome(partial, len(parts), stopped_early=True, rung_scores=tuple(rung_scores))
        parts.append(score_slice(len(parts)))


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


class RungCutoffs:
    """Successive halving's cutoffs (`fidelity.keep`): for each rung before the last, the lowest
    partial score in the top `keep` share of the scores the latest `window` candidates of earlier
    blocks had at that rung (blocks as in `Incumbents`, so under CMA-ES's barrier the cutoffs do
    not depend on which worker finished first).

    Only candidates that went on to a rung have a score there, so a later rung's cutoff ranks
    among the survivors of the earlier ones: `keep` of `keep`, as in successive halving.
    """

    def __init__(self, block: int, rungs: int, keep: float, window: int):
        self.block, self.rungs, self.keep, self.window = max(1, block), rungs, keep, window
        self.rung_scores: dict[int, Sequence[float]] = {}

    def add(self, trial_id: int, rung_scores: Sequence[float] | None) -> None:
        """A searched candidate's partial scores, one per rung it reached; baselines are not ranked."""
        if trial_id >= 0 and rung_scores:
            self.rung_scores[trial_id] = rung_scores

    def for_trial(self, trial_id: int) -> tuple[TopShare | None, ...]:
        first_of_block = trial_id // self.block * self.block
        # Walk back from the block's start rather than sort every id: this runs once per ask.
        recent: list[int] = []
        for earlier in range(first_of_block - 1, -1, -1):
            if len(recent) == self.window:
                break
            if earlier in self.rung_scores:
                recent.append(earlier)
        return tuple(
            top_share([self.rung_scores[t][rung] for t in recent if len(self.rung_scores[t]) > rung], self.keep)
            for rung in range(self.rungs - 1)
        )


@dataclass(frozen=True)
class TopShare:
    """The edge of the top `keep` share of some scores: the lowest score inside it, and which
    share of the scores tied with that one lie inside (the rest of the tie falls outside)."""

    cutoff: float
    tie_share: float


def top_share(scores: Sequence[float], keep: float) -> TopShare | None:
    """Where the top `keep` share of `scores` ends; None while there are too few to rank.

    Partial scores over a few dozen documents tie often: letting every tie through promoted half
    the candidates at keep = 1/3 on the demo, and letting none through promoted none once the
    top share was all perfect scores. So a tie at the edge goes on with the share of it that
    lies inside the top share, which keeps the expected share promoted at `keep`.
    """
    kept = math.ceil(keep * len(scores) - 1e-9)
    if len(scores) < math.ceil(1 / keep - 1e-9) or kept >= len(scores):
        return None
    ranked = sorted(scores, reverse=True)
    cutoff = ranked[kept - 1]
    above = sum(score > cutoff + TIE_TOLERANCE for score in ranked)
    tied = sum(abs(score - cutoff) <= TIE_TOLERANCE for score in ranked)
    return TopShare(cutoff, (kept - above) / tied)


class RaceTargets:
    """The driver's side of racing: the `RaceTarget` each new candidate is handed, from the fully
    scored results (the incumbent) and the rung scores (the cutoffs) of earlier blocks.

    Whether a candidate's tie at a cutoff goes on is drawn here, seeded by the run's seed, the
    trial and the rung, so it is journaled with the ask and a resumed run draws nothing again.
    """

    def __init__(self, block: int, rungs: int, keep: float | None, seed: int = 0):
        self.incumbents = Incumbents(block)
        # Rank against two blocks (under a barrier, the last two CMA-ES generations), and enough
        # asks for 8 in the top share where a block is one ask (TPE, random).
        window = max(2 * max(1, block), math.ceil(8 / keep - 1e-9)) if keep else 0
        self.cutoffs = RungCutoffs(block, rungs, keep, window) if keep else None
        self.seed = seed

    @classmethod
    def of_trials(cls, spec, block: int, trials: dict) -> RaceTargets | None:
        """Racing's incumbents and rung cutoffs rebuilt from the journal's results; None unless the spec races."""
        fidelity = spec.evaluation.fidelity
        if fidelity is None:
            return None
        targets = cls(block, len(fidelity.rungs), fidelity.keep, spec.optimizer.seed)
        for trial in trials.values():
            if trial.score is not None and trial.result is not None:
                targets.add(trial.trial_id, trial.whole_score, trial.result.rung_scores)
        return targets

    def add(self, trial_id: int, whole_score: float | None, rung_scores: Sequence[float] | None) -> None:
        """A finished result: `whole_score` when it was scored on every doc, its rung scores if raced."""
        if whole_score is not None:
            self.incumbents.add(trial_id, whole_score)
        if self.cutoffs is not None:
            self.cutoffs.add(trial_id, rung_scores)

    def for_trial(self, trial_id: int) -> RaceTarget:
        edges = self.cutoffs.for_trial(trial_id) if self.cutoffs else ()
        if all(edge is None for edge in edges):
            return RaceTarget(self.incumbents.for_trial(trial_id))
        draws = [random.Random(f"halving:{self.seed}:{trial_id}:{rung}").random() for rung in range(len(edges))]
        return RaceTarget(
            self.incumbents.for_trial(trial_id),
            tuple(None if edge is None else edge.cutoff for edge in edges),
            tuple(edge is not None and draw < edge.tie_share for edge, draw in zip(edges, draws, strict=True)),
        )
