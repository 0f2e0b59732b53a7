"""Each optimizer's typed settings (the spec's `optimizer:` section): one model per optimizer, told apart by `name`.

`OptimizerSettings` is the discriminated union the spec holds; the optimizer's module builds it
from its own model (`evomerge.optim.build_optimizer`). This module imports only pydantic, so
loading a spec does not import cma or optuna.

Older versions held every optimizer's fields in one flat model, and froze runs' specs with all of
them written out. Such a field on another optimizer is dropped while it holds the flat model's
default (so those specs, and specs copied from them, still load); any other value is refused as a
setting the optimizer does not have, except in a frozen run's spec, which keeps it for the run's
fingerprint (`flat_fields`): the fingerprint hashes the flat layout, so it means what it always did.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, model_validator

from evomerge.errors import describe_problem, did_you_mean

POPSIZE_LIMIT = 10_000
# The most trials a search asks (the spec's budget.max_evals limit).
TRIALS_LIMIT = 10_000_000
NSGA2_DEFAULT_POPULATION = 16
# Validation context key: the spec being read is a run's frozen spec.
FROZEN_SPEC = "frozen_spec"

Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="Seeds the optimizer and the merges' own draws.")]


class _Settings(BaseModel):
    """Unknown keys are errors, instances are immutable, and no float field takes NaN or an infinity."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    # Other optimizers' fields a frozen spec held at values other than the flat model's defaults.
    _other_fields: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _drop_other_optimizers_fields(cls, data: Any, handler, info: ValidationInfo):
        if not isinstance(data, dict):
            return handler(data)
        frozen = bool((info.context or {}).get(FROZEN_SPEC))
        defaults = _flat_defaults()
        others = {key: value for key, value in data.items() if key in defaults and key not in cls.model_fields}
        dropped = {key: value for key, value in others.items() if frozen or value == defaults[key]}
        settings = handler({key: value for key, value in data.items() if key not in dropped})
        settings._other_fields = {key: value for key, value in dropped.items() if value != defaults[key]}
        return settings

    def flat_fields(self) -> dict[str, Any]:
        """The settings in the flat layout of older versions: every optimizer's fields, at their
        defaults where another optimizer owns them (`overlap` only when set). Fingerprints hash this."""
        flat = {**_flat_defaults(), **self._other_fields, **self.model_dump(mode="json")}
        if flat["overlap"] is None:
            del flat["overlap"]
        return flat

    @property
    def tells_per_snapshot(self) -> int:
        """How often the search pickles the optimizer: a snapshot only shortens a resume's replay."""
        return 10


class CMAESSettings(_Settings):
    """CMA-ES over the unit box (`optim/cmaes.py`)."""

    name: Literal["cmaes"] = "cmaes"
    seed: Seed = 0
    popsize: int | None = Field(
        None, ge=2, le=POPSIZE_LIMIT, description=f"Default: 4 + floor(3 ln genes); at most {POPSIZE_LIMIT}."
    )
    sigma0: float = Field(0.25, gt=0, le=1, description="The first step, as a fraction of every gene's range.")
    overlap: bool | None = Field(
        None,
        description="Keep asking while a generation's stragglers finish (default from version 2). "
        "Workers never idle, but what is asked then depends on the order results arrive, so two runs "
        "of one seed can differ; false restores the generation barrier and runs that repeat exactly.",
    )

    def overlaps(self, search_version: int) -> bool:
        """Whether the generation barrier is off: no barrier from search version 2 unless the spec asks for one."""
        return self.overlap if self.overlap is not None else search_version >= 2

    @property
    def tells_per_snapshot(self) -> int:
        return self.popsize or 10


class TPESettings(_Settings):
    """Optuna's TPE, one or several objectives (`optim/tpe.py`)."""

    name: Literal["tpe"] = "tpe"
    seed: Seed = 0
    n_startup_trials: int = Field(10, ge=0, le=TRIALS_LIMIT, description="Random trials before TPE starts modelling.")


class NSGA2Settings(_Settings):
    """Optuna's NSGA-II for two or more objectives (`optim/nsga2.py`)."""

    name: Literal["nsga2"] = "nsga2"
    seed: Seed = 0
    popsize: int | None = Field(
        None,
        ge=2,
        le=POPSIZE_LIMIT,
        description=f"Individuals per generation; default {NSGA2_DEFAULT_POPULATION}, at most {POPSIZE_LIMIT}.",
    )

    @property
    def population(self) -> int:
        return self.popsize or NSGA2_DEFAULT_POPULATION

    @property
    def tells_per_snapshot(self) -> int:
        return self.popsize or 10


class RandomSettings(_Settings):
    """Uniform samples over the box (`optim/random_search.py`)."""

    name: Literal["random"] = "random"
    seed: Seed = 0


SETTINGS: dict[str, type[_Settings]] = {
    model.model_fields["name"].default: model for model in (CMAESSettings, TPESettings, RandomSettings, NSGA2Settings)
}
OptimizerSettings = Annotated[CMAESSettings | TPESettings | RandomSettings | NSGA2Settings, Field(discriminator="name")]
DEFAULT_OPTIMIZER = "cmaes"
# The fields of the older flat model besides name and seed, in the order it declared them.
_FLAT_FIELDS = ("popsize", "sigma0", "n_startup_trials", "overlap")


@functools.cache
def _flat_defaults() -> dict[str, Any]:
    """Each flat field at its default, as the optimizer that owns it declares it."""
    owners = {field: next(m for m in SETTINGS.values() if field in m.model_fields) for field in _FLAT_FIELDS}
    return {field: owner.model_fields[field].default for field, owner in owners.items()}


def with_default_name(data: Any) -> Any:
    """A spec's `optimizer:` mapping with `name` filled in where it is left out (CMA-ES)."""
    return {"name": DEFAULT_OPTIMIZER, **data} if isinstance(data, dict) and "name" not in data else data


def owners_of(field: str) -> list[str]:
    """The optimizers that take `field`, for the message that refuses it on another one."""
    return [name for name, model in SETTINGS.items() if field in model.model_fields]


def describe_settings_problem(item: dict) -> str:
    """'optimizer.FIELD: what is wrong' for one pydantic error whose location starts inside an
    `optimizer:` section (at the union's tag); the tag is left out of the path."""
    if item["type"] in ("union_tag_invalid", "union_tag_not_found"):
        tag = str(item.get("ctx", {}).get("tag", ""))
        return f"optimizer.name: unknown optimizer '{tag}'; choose one of {', '.join(SETTINGS)}{did_you_mean(tag, SETTINGS)}"
    tag, *inside = item["loc"] or ("",)
    if item["type"] == "extra_forbidden" and tag in SETTINGS and inside:
        key, takes = str(inside[-1]), list(SETTINGS[tag].model_fields)
        owners = owners_of(key)
        hint = f" (a setting of {' and '.join(owners)})" if owners else did_you_mean(key, takes)
        return f"optimizer.{key}: not a setting of {tag}{hint}; {tag} takes {', '.join(takes)}"
    return describe_problem({**item, "loc": ("optimizer", *inside)})
