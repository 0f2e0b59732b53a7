"""Facts about every mergekit merge parameter, in one table: default, valid range, search bounds, scope.

The spec (which parameters can be searched, default bounds, how far bounds may go), the genome
(which genes are per model, the first candidate's values), the merge validator (ranges) and the
method registry (defaults) all read `PARAMETERS`; none of them restates a number. No torch here,
so the spec and the read-only commands can import it cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Scope(Enum):
    """Whether mergekit resolves a parameter once per input model or once per tensor."""

    PER_MODEL = "per_model"
    SHARED = "shared"


@dataclass(frozen=True)
class Interval:
    """A real interval; `low_open`/`high_open` exclude an end. Never holds NaN or an infinity."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class ParameterFacts:
    """One mergekit parameter. Numeric facts are None for the boolean switches."""

    name: str
    scope: Scope
    # mergekit's value when a config leaves it out; None: the config must set it (or, for the
    # switches, each method sets its own, see `merge.methods`).
    default: float | None
    # Values a merge config may hold; None: any finite number (a scale such as weight).
    valid: Interval | None = None
    # Where a search's bounds may lie: `valid`, or a finite box for unbounded scales, so that
    # low + u * (high - low) can never overflow.
    search_limits: Interval | None = None
    search_bounds: tuple[float, float] | None = None  # default genome bounds; None: not searchable
    search_start: float | None = None  # the first candidate's (x0) value
    switch: bool = False  # an on/off setting (normalize, rescale): never searched, never ranged
    # Searched on a log scale (a gene moves the exponent): thresholds spanning decades, e.g. 1e-6..1e-2.
    log_scale: bool = False

    @property
    def searchable(self) -> bool:
        return self.search_bounds is not None

    @property
    def per_model(self) -> bool:
        return self.scope is Scope.PER_MODEL


UNIT = Interval(0.0, 1.0)
SCALE_LIMITS = Interval(-100.0, 100.0)

PARAMETERS: dict[str, ParameterFacts] = {
    p.name: p
    for p in (
        # weight's x0 depends on normalization (0.5 of a mean, 1.0 of a scale): the genome picks it.
        ParameterFacts("weight", Scope.PER_MODEL, default=None, search_limits=SCALE_LIMITS, search_bounds=(0.0, 1.0)),
        ParameterFacts(
            "density",
            Scope.PER_MODEL,
            default=1.0,
            valid=Interval(0.0, 1.0, low_open=True),
            search_bounds=(0.1, 1.0),
            search_start=0.5,
        ),
        ParameterFacts(
            "gamma",
            Scope.PER_MODEL,
            default=0.01,
            valid=Interval(0.0, 1.0, high_open=True),
            search_bounds=(0.0, 0.1),
            search_start=0.01,
        ),
        ParameterFacts(
            "epsilon",
            Scope.PER_MODEL,
            default=0.15,
            valid=Interval(0.0, 1.0, high_open=True),
            search_bounds=(0.01, 0.2),
            search_start=0.15,
        ),
        ParameterFacts("t", Scope.SHARED, default=None, valid=UNIT, search_bounds=(0.0, 1.0), search_start=0.5),
        ParameterFacts(
            "lambda",
            Scope.SHARED,
            default=1.0,
            search_limits=SCALE_LIMITS,
            search_bounds=(0.5, 1.5),
            search_start=1.0,
        ),
        ParameterFacts("normalize", Scope.SHARED, default=None, switch=True),
        ParameterFacts("rescale", Scope.SHARED, default=None, switch=True),
        ParameterFacts("int8_mask", Scope.SHARED, default=None, switch=True),
        # SCE's share of the most varying elements it keeps.
        ParameterFacts(
            "select_topk",
            Scope.SHARED,
            default=1.0,
            valid=Interval(0.0, 1.0, low_open=True),
            search_bounds=(0.1, 1.0),
            search_start=1.0,
        ),
        # RAM+'s boost of unique deltas (1 + r * min(rho, alpha)).
        ParameterFacts("r", Scope.SHARED, default=0.1, valid=UNIT, search_bounds=(0.0, 1.0), search_start=0.1),
        ParameterFacts("alpha", Scope.SHARED, default=0.2, valid=UNIT, search_bounds=(0.0, 1.0), search_start=0.2),
        # Fixed numerical settings of Multi-SLERP and Karcher: never searched.
        ParameterFacts("eps", Scope.SHARED, default=1e-8, valid=Interval(0.0, 1.0)),
        ParameterFacts("max_iter", Scope.SHARED, default=10.0, valid=Interval(1.0, 10_000.0)),
        ParameterFacts("tol", Scope.SHARED, default=1e-5, valid=Interval(0.0, 1.0)),
        # passthrough's per-input multiplier (unset: the tensor is copied as it is).
        ParameterFacts("scale", Scope.PER_MODEL, default=None),
        ParameterFacts("filter_wise", Scope.SHARED, default=None, switch=True),
        ParameterFacts("nuslerp_flatten", Scope.SHARED, default=None, switch=True),
        ParameterFacts("nuslerp_row_wise", Scope.SHARED, default=None, switch=True),
        ParameterFacts("normalize_weights", Scope.SHARED, default=None, switch=True),
    )
}

SEARCHABLE: tuple[str, ...] = tuple(name for name, facts in PARAMETERS.items() if facts.searchable)
PER_MODEL: tuple[str, ...] = tuple(name for name in SEARCHABLE if PARAMETERS[name].per_model)
SWITCHES: frozenset[str] = frozenset(name for name, facts in PARAMETERS.items() if facts.switch)


# Method-specific meanings of a shared name (a method's entry picks them, see registry.MethodInfo.facts).
NEARSWAP_T = ParameterFacts(
    "t",
    Scope.SHARED,
    default=None,
    valid=Interval(0.0, 1.0),
    search_bounds=(1e-5, 1e-2),
    search_start=1e-3,
    log_scale=True,
)
RAM_EPSILON = ParameterFacts(
    "epsilon",
    Scope.SHARED,
    default=1e-5,
    valid=Interval(0.0, 1.0, high_open=True),
    search_bounds=(1e-6, 1e-2),
    search_start=1e-5,
    log_scale=True,
)


def default_of(name: str) -> float:
    """mergekit's default of a numeric parameter that has one."""
    default = PARAMETERS[name].default
    if default is None:
        raise KeyError(f"parameter '{name}' has no default")
    return default


def bounds_limits(name: str) -> Interval:
    """Where genome bounds of searchable parameter `name` may lie."""
    facts = PARAMETERS[name]
    limits = facts.search_limits or facts.valid
    assert limits is not None, f"{name} is searchable, so it has limits"
    return limits
