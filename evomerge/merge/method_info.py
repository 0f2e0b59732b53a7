"""What a merge method is, as data: `MethodInfo`, one entry per method in `registry.METHODS`.

An entry says how the method's tensor function is configured, which parameters it resolves and
searches within which bounds, its baseline points, its input counts and base rules, and whether
the fused GPU kernel runs it. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

from evomerge.merge.parameters import PARAMETERS, SEARCHABLE, ParameterFacts

Sparsification = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
# One family per tensor function (engine.FAMILY_MERGES); the task-vector family covers five papers.
Family = Literal[
    "task_vector",
    "linear",
    "slerp",
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
    "sce",
    "nearswap",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
    "passthrough",
]

# Search version 2's bounds where the parameter table's differ: lambda reaches 0 (the base) and 2.
SCALE_BOUNDS_V2 = {"lambda": (0.0, 2.0)}
# Bounds of a weight that scales a task vector (unnormalized): 1.0, plain task arithmetic, mid-box.
TASK_VECTOR_SCALE_BOUNDS = (0.0, 2.0)


class FusedTrim(IntEnum):
    """The fused kernel's SPARSIFY constant: how it trims a task vector (fused/kernels.py)."""

    NONE = 0
    MAGNITUDE = 1
    RANDOM = 2


@dataclass(frozen=True)
class MethodInfo:
    """A named merge method: its configuration, its parameters, its search space and baselines."""

    name: str
    family: Family
    sparsification: Sparsification | None = None
    sign_consensus: bool = False
    default_normalize: bool = False
    default_rescale: bool = False
    needs_base: bool = True
    # Parameters resolved per input model (base excluded for task-vector methods).
    input_params: dict[str, float | None] = field(default_factory=dict)
    # Parameters resolved once per tensor.
    shared_params: dict[str, float | bool | None] = field(default_factory=dict)
    # What a search evolves when the spec does not say (before lambda, see `default_parameters`).
    default_searched: tuple[str, ...] = ()
    # Its default merge: each expert's parameters, the shared ones, and its baseline label.
    default_settings: dict[str, float] = field(default_factory=dict)
    default_shared: dict[str, float] = field(default_factory=dict)
    default_label: str = ""
    # Scored as a default merge in every run, whatever the spec's method.
    standard_baseline: bool = False
    # Density 1 keeps every delta, so weight 1 alone is a parent: search version 1 seeds only
    # these methods' parent points.
    exact_at_density_one: bool = False
    # Weights 1/n at density 1 are the linear average, seeded as that baseline.
    expresses_average: bool = False
    # The shared parameter that moves from the base (0) to the expert (1), for interpolations.
    interpolation: str | None = None
    # How many experts it merges, when it takes one fixed number.
    experts_exactly: int | None = None
    # The fewest experts (models besides a base with a role) it merges.
    experts_at_least: int = 1
    # A base is used when the config names one (nuslerp, multislerp merge the deltas from it),
    # but is not required.
    base_optional: bool = False
    # A search merges the models themselves, the base as one more weighted input: Multi-SLERP of
    # three or more deltas fails on every tensor no expert changed (mergekit raises there too).
    searched_without_base: bool = False
    # The base has no role: a configured base is one more input, listed last if not listed (karcher).
    base_ignored: bool = False
    # Per-input parameters a config may leave unset (passthrough's scale).
    optional_params: frozenset[str] = frozenset()
    # Where a name means something else for this method than in `PARAMETERS` (nearswap's t, RAM's epsilon).
    own_facts: dict[str, ParameterFacts] = field(default_factory=dict)
    # Its weights are relative shares (only their ratios matter): bounds [0, 1].
    weights_are_shares: bool = False
    # Its arithmetic returns float32 from 16-bit inputs, and mergekit writes that unless out_dtype says.
    promotes_to_float32: bool = False
    # How the fused GPU kernel trims it; None: the kernel cannot run it (the reference path does).
    fused_trim: FusedTrim | None = None

    @property
    def is_random(self) -> bool:
        return self.sparsification in ("random", "della_magprune")

    @property
    def tunable(self) -> tuple[str, ...]:
        """Parameters a search may evolve."""
        return tuple(p for p in SEARCHABLE if p in self.input_params or p in self.shared_params)

    @property
    def task_vectors(self) -> bool:
        """It merges each expert's difference from the base (a task vector), not the weights themselves."""
        return self.family == "task_vector"

    @property
    def magnitude_rank(self) -> Literal["ascending", "descending"] | None:
        """Which magnitude order its trim ranks a task vector by: descending for the top-k trim
        (TIES), ascending for breadcrumbs' cut of the smallest and the outliers; None: no rank."""
        if self.sparsification == "magnitude":
            return "descending"
        return "ascending" if self.sparsification == "magnitude_outliers" else None

    @property
    def fused(self) -> bool:
        """Whether the fused GPU kernel can run it."""
        return self.fused_trim is not None

    @property
    def base_has_role(self) -> bool:
        """A base the config names is the origin of the deltas, not a weighted input."""
        return self.needs_base or self.base_optional

    @property
    def uses_base(self) -> bool:
        """A search's candidates name the base model as mergekit's base_model."""
        return self.needs_base or (self.base_optional and not self.searched_without_base)

    @property
    def base_is_source(self) -> bool:
        """In a search the base is one more weighted source, so it needs its own weight."""
        return not self.uses_base

    @property
    def searchable(self) -> bool:
        """A search has something to evolve (Model Stock, Karcher, Arcee Fusion, passthrough do not)."""
        return bool(self.default_searched)

    def facts(self, param: str) -> ParameterFacts:
        """What `param` means for this method: its own entry, else the shared table's."""
        return self.own_facts.get(param) or PARAMETERS[param]

    def default_of(self, param: str) -> float | bool | None:
        """mergekit's value of `param` for this method when a config leaves it out."""
        if param in self.input_params:
            return self.input_params[param]
        return self.shared_params.get(param)

    def normalizes(self, fixed: dict) -> bool:
        """Whether the merge divides by the sum of the weights, given the spec's fixed settings."""
        return bool(fixed.get("normalize", self.shared_params.get("normalize", False)))

    def weights_average(self, fixed: dict) -> bool:
        """Weights are shares of an average (bounds [0, 1]) rather than scales of a task vector."""
        return self.family == "linear" or self.weights_are_shares or self.normalizes(fixed)

    def search_bounds(self, param: str, fixed: dict, version: int) -> tuple[float, float]:
        """Default genome bounds of `param` under search `version` (a spec's own bounds come first)."""
        if version >= 2 and param in SCALE_BOUNDS_V2:
            return SCALE_BOUNDS_V2[param]
        if param == "weight" and not self.weights_average(fixed):
            return TASK_VECTOR_SCALE_BOUNDS
        bounds = self.facts(param).search_bounds
        assert bounds is not None, f"{param} is searchable, so it has bounds"
        return bounds

    def default_parameters(self, fixed: dict, version: int) -> list[str]:
        """What a search evolves when the spec does not say.

        From version 2 a method that normalizes by the sum of the weights (TIES, DELLA) also evolves
        lambda: normalized weights cannot scale the merged task vector down, so without it the base
        and every shrunk merge lie outside the space.
        """
        wanted = list(self.default_searched)
        if version >= 2 and "lambda" in self.shared_params and self.normalizes(fixed):
            wanted.append("lambda")
        return [p for p in wanted if p not in fixed]

    def default_merge(self, base: str, experts: list[str], dtype: str) -> dict:
        """Its default merge of `experts` as a mergekit config: `default_settings` for each expert."""
        models = [
            {"model": p, "parameters": dict(self.default_settings)} if self.default_settings else {"model": p}
            for p in experts
        ]
        config: dict = {"merge_method": self.name}
        if self.uses_base:
            config["base_model"] = base
        config["models"] = models
        if self.default_shared:
            config["parameters"] = dict(self.default_shared)
        config["dtype"] = dtype
        return config

    def experts_problem(self, count: int) -> str | None:
        """Why it cannot merge `count` experts, or None when it can."""
        if count < self.experts_at_least:
            return f"{self.name} merges at least {_count(self.experts_at_least, 'expert')} with the base, got {count}"
        if self.experts_exactly is None or count == self.experts_exactly:
            return None
        return (
            f"{self.name} merges the base with exactly {_count(self.experts_exactly, 'expert')}, got {count}; "
            "use ties or task_arithmetic for more"
        )

    def slice_problem(self, sources: int, has_base: bool = True) -> str | None:
        """Why a slice of `sources` models (`has_base`: the base among them) cannot be merged by it, or None."""
        if self.base_ignored or not (self.needs_base or has_base):
            others, besides = sources, ""
        else:
            others, besides = sources - 1, " besides the base"
        if self.experts_exactly is not None and others != self.experts_exactly:
            if self.needs_base and self.experts_exactly == 1:
                return f"{self.name} merges exactly {_count(2, 'model')} (the base and one other), got {sources}"
            return f"{self.name} merges exactly {_count(self.experts_exactly, 'model')}{besides}, got {others}"
        if others < self.experts_at_least:
            return f"{self.name} merges at least {_count(self.experts_at_least, 'model')}{besides}, got {others}"
        return None


def _count(n: int, noun: str) -> str:
    return f"{'one' if n == 1 else 'two' if n == 2 else n} {noun}{'' if n == 1 else 's'}"
