"""Search optimizers (CMA-ES, TPE, random) behind one ask/tell contract, and a factory by name."""

from __future__ import annotations

import numpy as np

from evomerge.errors import UserError, did_you_mean
from evomerge.optim.base import Ask, Optimizer, is_failed_score
from evomerge.optim.cmaes import CMAESOptimizer
from evomerge.optim.random_search import RandomSearchOptimizer
from evomerge.optim.tpe import NSGA2Optimizer, TPEOptimizer

OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (CMAESOptimizer, TPEOptimizer, RandomSearchOptimizer, NSGA2Optimizer)
}


def make_optimizer(name: str, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray, seed: int, **settings) -> Optimizer:
    """Build the optimizer registered as ``name`` ("cmaes", "tpe", "random" or "nsga2")."""
    if name not in OPTIMIZERS:
        raise UserError(
            f"optimizer.name: unknown optimizer '{name}' (choose one of: {', '.join(OPTIMIZERS)})"
            f"{did_you_mean(name, OPTIMIZERS)}"
        )
    return OPTIMIZERS[name](lower, upper, x0, seed, **settings)


__all__ = [
    "Ask",
    "CMAESOptimizer",
    "OPTIMIZERS",
    "NSGA2Optimizer",
    "Optimizer",
    "RandomSearchOptimizer",
    "TPEOptimizer",
    "is_failed_score",
    "make_optimizer",
]
