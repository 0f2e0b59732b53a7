"""A candidate's score as the evaluator reports it, and the arithmetic on scores: weighted means and
their standard errors. Torch-free, so the run-directory readers can use it without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class EvalResult:
    """One candidate's score and where it came from."""

    score: float  # sum(weight * metric) / sum(weight)
    metrics: dict[str, float]  # task name -> metric value
    n_docs: dict[str, int]  # task name -> docs scored
    seconds: float


class WeightedTask(Protocol):
    name: str
    weight: float


def task_weights(tasks: Iterable[WeightedTask]) -> dict[str, float]:
    """Task name -> its weight in the score, as `weighted_score` and `standard_error` take them."""
    return {task.name: task.weight for task in tasks}


def weighted_score(metrics: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """sum(weight * metric) / sum(weight) over the tasks in `weights`."""
    total_weight = sum(weights.values())
    return sum(weights[name] * metrics[name] for name in weights) / total_weight


def standard_error(
    metrics: Mapping[str, float] | None, n_docs: Mapping[str, int] | None, weights: Mapping[str, float] | None = None
) -> float:
    """SE of a weighted mean of per-task scores, each a mean of n independent outcomes in [0, 1].

    p(1-p)/n is a 0/1 metric's variance and an upper bound for any metric in [0, 1], so the SE
    is exact for accuracy and cautious for partial-credit scores.
    """
    metrics, n_docs = metrics or {}, n_docs or {}
    weights = weights or {name: 1.0 for name in metrics}
    total = sum(weights.get(name, 1.0) for name in metrics)
    variance = 0.0
    for name, value in metrics.items():
        n = max(1, n_docs.get(name, 1))
        share = weights.get(name, 1.0) / total
        variance += share**2 * max(value * (1 - value), 0.0) / n
    return math.sqrt(variance)
