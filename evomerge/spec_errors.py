"""A spec's validation errors as one line: every field at fault, with did-you-mean for unknown keys."""

from __future__ import annotations

from typing import get_args

from pydantic import BaseModel, ValidationError

from evomerge.errors import describe_problem, did_you_mean, problem_path
from evomerge.optim.settings import describe_settings_problem


def describe_spec_errors(error: ValidationError, source: str, spec_model: type[BaseModel]) -> str:
    """'SOURCE: path: problem' for one problem; 'SOURCE: N problems: a: ...; b: ...' for several.

    One problem per field path: a value that fails every branch of a union is one mistake.
    """
    problems: dict[str, str] = {}
    for item in error.errors():
        path = problem_path(item)
        if item["loc"][:1] == ("optimizer",):  # a union of each optimizer's settings: they describe their own
            problems.setdefault(path, describe_settings_problem({**item, "loc": item["loc"][1:]}))
            continue
        hint = (
            did_you_mean(item["loc"][-1], _keys_at(spec_model, item["loc"][:-1]))
            if item["type"] == "extra_forbidden"
            else ""
        )
        problems.setdefault(path, describe_problem(item) + hint)
    if len(problems) == 1:
        return f"{source}: {next(iter(problems.values()))}"
    return f"{source}: {len(problems)} problems: " + "; ".join(problems.values())


def _keys_at(spec_model: type[BaseModel], location: tuple) -> list[str]:
    """The keys the spec allows at `location` (a pydantic error path), for did-you-mean hints."""
    model = spec_model
    for part in location:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        nested = (
            [
                t
                for t in (field.annotation, *get_args(field.annotation))
                if isinstance(t, type) and issubclass(t, BaseModel)
            ]
            if field
            else []
        )
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)
