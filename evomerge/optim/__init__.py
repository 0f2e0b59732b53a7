"""Search optimizers (CMA-ES, TPE, NSGA-II, random) behind one ask/tell contract.

Each optimizer's module has a `create(settings, problem)` factory taking its typed settings
(`settings.py`); `build_optimizer` picks the module by the settings' `name`. The modules are
imported only when an optimizer is built, so reading a spec's settings imports neither cma nor optuna.
"""

from __future__ import annotations

import importlib

import numpy as np
from pydantic import TypeAdapter, ValidationError

from evomerge.errors import UserError
from evomerge.optim.base import Ask, Optimizer, Problem, is_failed_score
from evomerge.optim.settings import OptimizerSettings, describe_settings_problem

MODULES = {
    "cmaes": "evomerge.optim.cmaes",
    "tpe": "evomerge.optim.tpe",
    "random": "evomerge.optim.random_search",
    "nsga2": "evomerge.optim.nsga2",
}


def build_optimizer(settings: OptimizerSettings, problem: Problem) -> Optimizer:
    """The optimizer the settings name, built by its module's factory.

    With a method gene (`Problem.choice`) CMA-ES is one CMA-ES per method, raced (`method_race.py`).
    """
    module = MODULES[settings.name]
    if problem.choice is not None and settings.name == "cmaes":
        module = "evomerge.optim.method_race"
    return importlib.import_module(module).create(settings, problem)


def make_optimizer(
    name: str,
    lower: np.ndarray,
    upper: np.ndarray,
    x0: np.ndarray,
    seed: int,
    *,
    objectives: int = 1,
    search_version: int = 1,
    **fields,
) -> Optimizer:
    """Build an optimizer from plain values (tests, benchmarks); `fields` are its spec settings.

    A wrong name or setting is a UserError naming it; `search_version` 1 keeps CMA-ES's barrier.
    """
    try:
        settings = TypeAdapter(OptimizerSettings).validate_python({**fields, "name": name, "seed": seed})
    except ValidationError as error:
        raise UserError(describe_settings_problem(dict(error.errors()[0]))) from None
    return build_optimizer(settings, Problem(lower, upper, x0, objectives, search_version))


__all__ = ["Ask", "MODULES", "Optimizer", "Problem", "build_optimizer", "is_failed_score", "make_optimizer"]
