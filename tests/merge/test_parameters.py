"""The parameter table is the one source of defaults and ranges: the method registry, the merge
validator, the spec and the genome agree with it, and the kernel reads its table by the same names."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.merge.methods import METHODS
from evomerge.merge.parameters import PARAMETERS, PER_MODEL, SEARCHABLE, Interval, bounds_limits


def test_method_defaults_are_the_table_s():
    for method in METHODS.values():
        for name, default in {**method.input_params, **method.shared_params}.items():
            facts = method.facts(name)  # a method's own meaning of a name (RAM's epsilon) comes first
            if default is not None and not facts.switch:
                assert default == facts.default, (method.name, name)
            assert facts.per_model == (name in method.input_params), (method.name, name)
    assert all(
        method.facts(name) is PARAMETERS[name]
        for method in METHODS.values()
        for name in PARAMETERS
        if name not in method.own_facts
    )


def test_every_searchable_parameter_has_default_bounds_inside_its_limits():
    assert SEARCHABLE == ("weight", "density", "gamma", "epsilon", "t", "lambda", "select_topk", "r", "alpha")
    assert PER_MODEL == ("weight", "density", "gamma", "epsilon")
    for name in SEARCHABLE:
        low, high = PARAMETERS[name].search_bounds
        assert low in bounds_limits(name) and high in bounds_limits(name) and low < high, name
        start = PARAMETERS[name].search_start
        assert start is None or low <= start <= high, name
    for method in METHODS.values():
        for name, facts in method.own_facts.items():
            low, high = facts.search_bounds
            assert low in bounds_limits(name) and low <= facts.search_start <= high, (method.name, name)


def test_intervals_refuse_non_finite_values_and_respect_open_ends():
    density = PARAMETERS["density"].valid
    assert str(density) == "(0, 1]" and 1.0 in density and 0.0 not in density
    assert str(PARAMETERS["gamma"].valid) == "[0, 1)" and 1.0 not in PARAMETERS["gamma"].valid
    assert all(v not in Interval(-1e9, 1e9) for v in (math.nan, math.inf, -math.inf, True, "0.5"))


@pytest.mark.parametrize(
    "name, value, expected", [("t", 1.5, "[0, 1]"), ("gamma", 1.0, "[0, 1)"), ("density", 0.0, "(0, 1]")]
)
def test_the_merge_validator_reads_ranges_from_the_table(name, value, expected):
    from evomerge.errors import UserError
    from evomerge.merge.config import MergeConfig
    from evomerge.merge.validate import _check_parameter_values

    method = {"t": "slerp", "gamma": "breadcrumbs", "density": "ties"}[name]
    config = MergeConfig.model_validate(
        {"merge_method": method, "base_model": "b", "models": [{"model": "a"}], "parameters": {name: value}}
    )
    with pytest.raises(UserError, match=rf"parameters\.{name}: {value} is outside \{expected[0]}"):
        _check_parameter_values(config, "cfg")


def test_the_kernel_table_fields_are_written_where_their_names_say():
    torch = pytest.importorskip("torch")
    from evomerge.merge.fused import tables

    table = tables.ParameterTable(segments=1, experts=2)
    table.set_input(0, 1, weight=0.5, density=0.25, seed=7)
    table.lambdas[0], table.normalize[0] = 2.0, True
    packed = table.pack(torch.float32, (np.array([[0.0, 0.125]]), np.array([[0, 3]])))[0]

    def field(name: int, expert: int) -> int:
        return int(packed[name * 2 + expert])

    as_float = lambda bits: float(np.array([bits], dtype=np.int32).view(np.float32)[0])  # noqa: E731
    assert as_float(field(tables.WEIGHT, 1)) == 0.5 and as_float(field(tables.DENSITY, 1)) == 0.25
    assert field(tables.SEED, 1) == 7
    assert as_float(field(tables.THRESHOLD, 1)) == 0.125 and field(tables.TIED, 1) == 3
    assert as_float(int(packed[tables.PARAM_FIELDS * 2 + tables.LAMBDA])) == 2.0
    assert int(packed[tables.PARAM_FIELDS * 2 + tables.NORMALIZE]) == 1
