"""Multi-objective helpers: objective values from per-task metrics, and the non-dominated set."""

from __future__ import annotations

from collections.abc import Sequence


def objective_values(metrics: dict[str, float], objectives: Sequence, weights: dict[str, float]) -> list[float]:
    """Each objective is the weighted mean of its tasks' metrics (all maximized)."""
    values = []
    for objective in objectives:
        total = sum(weights.get(task, 1.0) for task in objective.tasks)
        values.append(sum(weights.get(task, 1.0) * metrics[task] for task in objective.tasks) / total)
    return values


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=False)) and any(x > y for x, y in zip(a, b, strict=False))


def pareto_front(points: dict[int, Sequence[float]]) -> list[int]:
    """Ids of the points no other point dominates, best first objective first."""
    front = [i for i, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != i)]
    return sorted(front, key=lambda i: tuple(-v for v in points[i]))
