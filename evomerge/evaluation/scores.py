"""A candidate's score as the evaluator reports it, and the arithmetic on scores: weighted means and
their standard errors. Torch-free, so the run-directory readers can use it without loading torch.

A group or tag entry's score combines its leaf tasks' scores; `EvalResult.subtasks` keeps them,
journaled with the result, as {entry: {"weighting": "size" | "equal", "metrics": {leaf: value},
"n_docs": {leaf: docs}}}, so that readers get the entry's exact standard error and racing adds
up slices leaf by leaf.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# How a group or tag weighs its leaf tasks: by docs scored (lm-eval's weight_by_size), or equally.
SIZE_WEIGHTS = "size"
EQUAL_WEIGHTS = "equal"


@dataclass(frozen=True)
class EvalResult:
    """One candidate's score and where it came from."""

    score: float  # sum(weight * metric) / sum(weight)
    metrics: dict[str, float]  # task name -> metric value
    n_docs: dict[str, int]  # task name -> docs scored (a group's or tag's: over its leaves)
    seconds: float
    subtasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # group and tag entries: see above


def subtask_scores(weighting: str, metrics: Mapping[str, float], n_docs: Mapping[str, int]) -> dict[str, Any]:
    """One group or tag entry of `EvalResult.subtasks`."""
    return {"weighting": weighting, "metrics": dict(metrics), "n_docs": dict(n_docs)}


def leaf_shares(weighting: str, n_docs: Mapping[str, int]) -> dict[str, float]:
    """Each leaf's share of its group's score: by docs (lm-eval's aggregate_subtask_metrics) or equal."""
    sizes = {name: float(n if weighting == SIZE_WEIGHTS else 1) for name, n in n_docs.items()}
    total = sum(sizes.values()) or 1.0
    return {name: size / total for name, size in sizes.items()}


def combined_score(weighting: str, metrics: Mapping[str, float], n_docs: Mapping[str, int]) -> float:
    """A group's or tag's score from its leaves' scores, summed as lm-eval's aggregate_subtask_metrics sums."""
    sizes = [n_docs[name] if weighting == SIZE_WEIGHTS else 1 for name in metrics]
    return sum(metrics[name] * size for name, size in zip(metrics, sizes, strict=True)) / sum(sizes)


class WeightedTask(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> float: ...


def task_weights(tasks: Iterable[WeightedTask]) -> dict[str, float]:
    """Task name -> its weight in the score, as `weighted_score` and `standard_error` take them."""
    return {task.name: task.weight for task in tasks}


def weighted_score(metrics: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """sum(weight * metric) / sum(weight) over the tasks in `weights`."""
    total_weight = sum(weights.values())
    return sum(weights[name] * metrics[name] for name in weights) / total_weight


def standard_error(
    metrics: Mapping[str, float] | None,
    n_docs: Mapping[str, int] | None,
    weights: Mapping[str, float] | None = None,
    subtasks: Mapping[str, Mapping[str, Any]] | None = None,
) -> float:
    """SE of a weighted mean of per-task scores, each a mean of n independent outcomes in [0, 1].

    p(1-p)/n is a 0/1 metric's variance and an upper bound for any metric in [0, 1], so the SE
    is exact for accuracy and cautious for partial-credit scores. A group or tag in `subtasks`
    adds its leaves' variances, each weighted by the leaf's share of the group's score.
    """
    metrics, n_docs, subtasks = metrics or {}, n_docs or {}, subtasks or {}
    weights = weights or {name: 1.0 for name in metrics}
    total = sum(weights.get(name, 1.0) for name in metrics)
    variance = 0.0
    for name, value in metrics.items():
        share = weights.get(name, 1.0) / total
        parts = subtasks.get(name)
        entry = _mean_variance(value, n_docs.get(name, 1)) if parts is None else _group_variance(parts)
        variance += share**2 * entry
    return math.sqrt(variance)


def _mean_variance(value: float, n: int) -> float:
    return max(value * (1 - value), 0.0) / max(1, n)


def _group_variance(parts: Mapping[str, Any]) -> float:
    leaf_docs = parts["n_docs"]
    shares = leaf_shares(parts["weighting"], leaf_docs)
    return sum(shares[leaf] ** 2 * _mean_variance(value, leaf_docs[leaf]) for leaf, value in parts["metrics"].items())
