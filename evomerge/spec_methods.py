"""A spec that lists several merge methods (`merge.method: [ties, task_arithmetic]`): the method gene.

The search then chooses a method per candidate and evolves that method's own genes. Each listed
method is searched as if the spec named it alone (`method_spec`): `genome.params` keeps the
parameters the method takes (all listed ones a method takes, or its defaults when the spec lists
none), `merge.fixed` the settings it takes, `genome.bounds` those of its searched parameters.
A spec naming one method as a string is untouched by all of this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.merge.registry import METHODS, MethodInfo

if TYPE_CHECKING:
    from evomerge.spec import Spec


def chooses_method(spec: Spec) -> bool:
    """The spec lists its methods: candidates carry a method gene."""
    return not isinstance(spec.merge.method, str)


def takes(method: MethodInfo, param: str) -> bool:
    """Whether `method` resolves `param` (searched or fixed)."""
    return param in method.input_params or param in method.shared_params


def searched_params_of(spec: Spec, name: str) -> list[str]:
    """What a listed method evolves: the spec's genome.params it takes, or its own defaults."""
    method = METHODS[name]
    if spec.genome.params:
        return [p for p in spec.genome.params if p in method.tunable]
    fixed = {p: v for p, v in spec.merge.fixed.items() if takes(method, p)}
    return method.default_parameters(fixed, spec.version)


def method_spec(spec: Spec, name: str) -> Spec:
    """The spec as if it named `name` alone, for that method's genome (not validated again)."""
    method = METHODS[name]
    params = searched_params_of(spec, name)
    merge = spec.merge.model_copy(
        update={"method": name, "fixed": {p: v for p, v in spec.merge.fixed.items() if takes(method, p)}}
    )
    genome = spec.genome.model_copy(
        update={"params": params, "bounds": {p: b for p, b in spec.genome.bounds.items() if p in params}}
    )
    return spec.model_copy(update={"merge": merge, "genome": genome})


def check_method_list(spec: Spec) -> None:
    """Refusals for a list of methods (ValueError, one line, naming the field and the fix)."""
    names = spec.merge.methods
    for name in names:
        if not METHODS[name].searchable:
            raise ValueError(
                f"merge.method: {name} has no parameter to search; remove it from the list (merge it alone with `evomerge merge CONFIG OUT`)"
            )
    for param in spec.genome.params or []:
        if not any(param in METHODS[name].tunable for name in names):
            raise ValueError(f"genome.params: none of {', '.join(names)} takes '{param}'; remove it")
    for name in names:
        if not searched_params_of(spec, name):
            tunable = ", ".join(METHODS[name].tunable)
            raise ValueError(
                f"genome.params: {name} takes none of them (it takes {tunable}); add one or remove {name} from merge.method"
            )
    searched = {p for name in names for p in searched_params_of(spec, name)}
    for param in spec.genome.bounds:
        if param not in searched:
            raise ValueError(
                f"genome.bounds: '{param}' is not searched by any of {', '.join(names)}; remove its bounds or add it to genome.params"
            )
