"""Which trials the search picks: the held-out re-scoring set (with its tie rule) and optimizer seeds.

Pure functions over journaled trials, so the rules are tested without a search.
"""

from __future__ import annotations

import math

import numpy as np

from evomerge.rundir.events import EventName
from evomerge.rundir.trials import Trial, is_default_merge

TIE_CAP_FACTOR = 2  # trials tied at the top-k cut are re-scored up to 2 x top_k trials in all


def heldout_candidates(trials: dict[int, Trial], top_k: int) -> tuple[list[Trial], dict | None]:
    """Every completed baseline plus the top-k completed optimizer trials by search score (of those
    scored on every search doc: a candidate raced out early has only a partial score).

    Trials tied with the k-th on the search score are all re-scored too, up to TIE_CAP_FACTOR x
    top_k trials in all (past the cap, the lowest trial ids): cutting a tie silently would pick
    by age, not merit. The second value reports the tie ({score, top_k, cap, tied, rescored,
    skipped}) for the journal and the verdict; None when nothing tied across the cut.
    """
    done = [t for t in trials.values() if t.status == EventName.COMPLETED]
    whole = (t for t in done if t.kind == "optimizer" and not t.stopped_early)  # a partial score never wins
    searched = sorted(whole, key=lambda t: (-t.score, t.trial_id))
    chosen, ties = searched[:top_k], None
    if 0 < top_k < len(searched) and searched[top_k].score == searched[top_k - 1].score:
        cut = searched[top_k - 1].score
        above = [t for t in searched if t.score > cut]
        tied = [t for t in searched if t.score == cut]
        cap = TIE_CAP_FACTOR * top_k
        rescored = tied[: max(0, cap - len(above))]
        chosen = above + rescored
        ties = {"score": cut, "top_k": top_k, "cap": cap, "tied": len(tied), "rescored": len(rescored)}
        ties["skipped"] = len(tied) - len(rescored)
    return [t for t in done if t.kind == "baseline"] + chosen, ties


def seeds_worth_trying(points: list[tuple[str, np.ndarray]], baselines: list[Trial]) -> list[tuple[str, np.ndarray]]:
    """The expressible baselines that scored at least as well as every default merge."""
    scores = {t.label: t.score for t in baselines if t.status == EventName.COMPLETED}
    merges = [score for label, score in scores.items() if is_default_merge(label)]
    bar = max(merges, default=-math.inf)
    return [(label, x) for label, x in points if label in scores and scores[label] >= bar]


def best_expressible_baseline(
    points: list[tuple[str, np.ndarray]], baselines: list[Trial], x0: np.ndarray
) -> list[tuple[str, np.ndarray]]:
    """Version 2's seed: the best-scoring baseline the space expresses (the base included), unless
    it is x0, which the optimizer asks first anyway."""
    scores = {t.label: t.score for t in baselines if t.status == EventName.COMPLETED}
    scored = [(label, x) for label, x in points if label in scores]
    if not scored:
        return []
    label, x = max(scored, key=lambda item: scores[item[0]])  # the first of equals, in the genome's order
    return [] if np.array_equal(x, x0) else [(label, x)]
