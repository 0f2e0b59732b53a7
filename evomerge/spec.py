"""spec.yaml as frozen pydantic models: what to merge, how, what to search, how to judge it.

`load_spec` returns a validated Spec or raises a UserError naming every field at fault (one line,
problems joined by "; "). Paths in the spec are resolved against the spec file's folder; a model
named by hub ID (`org/name@revision`) keeps its name, resolved to a folder in preflight (`hub.py`). Numbers
are finite and bounded (the limits below are documented in the field descriptions); parameter
ranges come from `merge.parameters`. Checks that need the model folders or the task files live in
`preflight.py`; this module only knows the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from evomerge.errors import UserError, did_you_mean
from evomerge.evaluation.config import DEFAULT_INCLUDE, EvaluationSpec, without_later_defaults
from evomerge.evaluation.config import Strict as _Strict
from evomerge.hub import model_name
from evomerge.merge.config import load_yaml_file
from evomerge.merge.parameters import PARAMETERS, SCALE_LIMITS, SEARCHABLE, SWITCHES, bounds_limits
from evomerge.merge.registry import DEFAULT_METHOD, METHODS, MethodInfo
from evomerge.optim.settings import (
    FROZEN_SPEC,
    TRIALS_LIMIT,
    CMAESSettings,
    OptimizerSettings,
    with_default_name,
)
from evomerge.search_space import DEFAULT_SEARCH_SPACE, SearchSpaceSpec, check_layer_space, check_phased_space
from evomerge.spec_errors import describe_spec_errors
from evomerge.spec_methods import check_method_list

LAYER_GROUPS_LIMIT = 1024
WORKERS_LIMIT = 4096
QUEUE_DEPTH_LIMIT = 1024
MAX_EVALS_LIMIT = TRIALS_LIMIT
MAX_DOCS_LIMIT = 10**15
RUN_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"
# Which search defaults a run uses (genome parameters and bounds, seeding, CMA-ES without a
# generation barrier). A new run freezes the latest; a frozen spec without one was written before
# versions existed and keeps version 1's behaviour, so an old run replays exactly as it ran.
# Version 2: default spaces that hold every baseline, best-baseline seeding, no CMA-ES barrier.
# Version 3: DELLA density genes decode inside the range its epsilon allows (genome.py).
SEARCH_VERSION = 3
LEGACY_SEARCH_VERSION = 1


class ModelsSpec(_Strict):
    base: str = Field(
        description="The model every expert was fine-tuned from: a folder or a hub ID (org/name@revision)."
    )
    experts: list[str] = Field(min_length=1, description="Fine-tunes to merge: folders or hub IDs.")

    @field_validator("experts")
    @classmethod
    def _distinct(cls, experts):
        if len(set(experts)) != len(experts):
            raise ValueError("an expert is listed twice; list each model once")
        return experts


class MergeSpec(_Strict):
    method: str | list[str] = Field(
        DEFAULT_METHOD.name,
        description="The merge method, or a list of methods the search chooses among (a method gene).",
    )
    fixed: dict[str, float | bool] = Field(
        default_factory=dict, description="Shared parameters held constant, e.g. normalize, lambda."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("fixed", mode="before")
    @classmethod
    def _known_values(cls, fixed):
        # Before the float | bool union parses it, which would report one failure per branch.
        for name, value in (fixed if isinstance(fixed, dict) else {}).items():
            if name not in PARAMETERS:
                raise ValueError(
                    f"no parameter '{name}'{did_you_mean(name, PARAMETERS)}; known: {', '.join(PARAMETERS)}"
                )
            if name in SWITCHES and not isinstance(value, bool):
                raise ValueError(f"{name}: {value!r} is not true or false; give true or false")
            limits = PARAMETERS[name].valid or SCALE_LIMITS
            if name not in SWITCHES and value not in limits:
                raise ValueError(f"{name}: {value!r} is not a number in {limits}; use a value in that range")
        return fixed

    @field_validator("method", mode="before")
    @classmethod
    def _name_or_names(cls, method):
        # Before the str | list[str] union parses it, which would report one failure per branch.
        if not all(isinstance(name, str) for name in (method if isinstance(method, list) else [method])):
            raise ValueError(
                f"{method!r} is not a method or a list of methods; give e.g. ties or [ties, task_arithmetic]"
            )
        return method

    @field_validator("method")
    @classmethod
    def _known_method(cls, method):
        names = [method] if isinstance(method, str) else method
        if not names:
            raise ValueError("the list of methods is empty; list one or more methods")
        for name in names:
            if name not in METHODS:
                raise ValueError(
                    f"unknown method '{name}'{did_you_mean(name, METHODS)}; choose one of {', '.join(METHODS)}"
                )
        if len(set(names)) != len(names):
            raise ValueError("a method is listed twice; list each method once")
        return method

    @property
    def methods(self) -> list[str]:
        """The searched methods: the one method, or the list the method gene chooses among."""
        return [self.method] if isinstance(self.method, str) else list(self.method)


class GenomeSpec(_Strict):
    params: list[str] | None = Field(None, description="Parameters to evolve; default: the method's weight/density/t.")
    layer_groups: int = Field(
        4,
        ge=1,
        le=LAYER_GROUPS_LIMIT,
        strict=True,
        description=f"Contiguous layer groups, each with its own genes (1 = one value per model); at most {LAYER_GROUPS_LIMIT} and the model's layer count.",
    )
    split_attn_mlp: bool = False
    embeddings: bool = Field(False, description="Separate genes for embed_tokens, final norm and lm_head.")
    bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Finite [low, high] per searched parameter, inside its valid range."
    )

    @field_validator("params")
    @classmethod
    def _searchable(cls, params):
        for name in params or []:
            if name not in SEARCHABLE:
                raise ValueError(
                    f"'{name}' cannot be searched{did_you_mean(name, SEARCHABLE)}; choose from {', '.join(SEARCHABLE)}"
                )
        if params is not None and len(set(params)) != len(params):
            raise ValueError("a parameter is listed twice; list each once")
        return params

    @field_validator("bounds")
    @classmethod
    def _ordered(cls, bounds):
        for name, (low, high) in bounds.items():
            if name not in SEARCHABLE:
                raise ValueError(f"no parameter '{name}'{did_you_mean(name, SEARCHABLE)}")
            if not low < high:
                raise ValueError(f"{name}: lower bound {low} must be below upper bound {high}")
            limits = bounds_limits(name)
            if low not in limits or high not in limits:
                raise ValueError(f"{name} bounds must lie in {limits}, got [{low}, {high}]")
        return bounds


class BudgetSpec(_Strict):
    max_evals: int | None = Field(100, ge=1, le=MAX_EVALS_LIMIT, description=f"At most {MAX_EVALS_LIMIT:,}.")
    time_limit_min: float | None = Field(None, gt=0, le=10 * 525_600, description="At most ten years.")
    max_docs: int | None = Field(
        None,
        ge=1,
        le=MAX_DOCS_LIMIT,
        description="The most documents the search scores (search tasks, baselines included): a cost "
        "ceiling that, unlike time_limit_min, repeats exactly. A candidate is asked only while it fits if "
        "scored whole; with evaluation.fidelity the documents a stopped candidate did not score buy more "
        "candidates. The first budget reached ends the search: set max_evals: null to be bounded by "
        "documents alone.",
    )
    baselines: bool = Field(
        True,
        description="Score the parents and the default merges first, and seed the optimizer with those the genome can express.",
    )

    @model_validator(mode="after")
    def _bounded(self):
        if self.max_evals is None and self.time_limit_min is None and self.max_docs is None:
            raise ValueError("set max_evals, time_limit_min or max_docs so the search ends")
        return self


class WorkersSpec(_Strict):
    count: int | None = Field(
        None, ge=1, le=WORKERS_LIMIT, description=f"Default: one per GPU, else 2 CPU workers; at most {WORKERS_LIMIT}."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus_per_worker: float = Field(
        1.0,
        ge=0.01,
        le=64,
        description="Below 1: workers share a GPU; k > 1 (whole): one worker's layers split over k GPUs.",
    )
    cpus_per_worker: float = Field(1.0, ge=0.01, le=1024)
    queue_depth: int = Field(
        2,
        ge=1,
        le=QUEUE_DEPTH_LIMIT,
        description=f"Candidates queued per worker so it never waits for the driver; at most {QUEUE_DEPTH_LIMIT}.",
    )

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"{value} GPUs cannot be split by layers; use a whole number (or below 1 to share a GPU)")
        return value


class LoggingSpec(_Strict):
    tensorboard: bool = Field(False, description="Log every trial to runs/NAME/tensorboard (needs tensorboard).")
    wandb: bool = Field(False, description="Log every trial to Weights & Biases (needs wandb).")
    wandb_project: str = "evomerge"


class Spec(_Strict):
    name: str = Field(description="The run's folder under runs_dir: one folder name, not starting with '.'.")
    models: ModelsSpec
    merge: MergeSpec = MergeSpec()
    genome: GenomeSpec = GenomeSpec()
    search: SearchSpaceSpec = Field(
        SearchSpaceSpec(), description="Which space to search: params (default) or layers (search_space.py)."
    )
    optimizer: OptimizerSettings = Field(
        CMAESSettings(), description="Which optimizer (name: cmaes, tpe, nsga2, random) with its own settings."
    )
    evaluation: EvaluationSpec
    budget: BudgetSpec = BudgetSpec()
    workers: WorkersSpec = WorkersSpec()
    runs_dir: str = Field("runs", description="Where runs/NAME/ goes, relative to the spec file.")
    logging: LoggingSpec = LoggingSpec()
    trust_remote_code: bool = False
    version: int = Field(
        SEARCH_VERSION,
        ge=LEGACY_SEARCH_VERSION,
        le=SEARCH_VERSION,
        strict=True,
        description="The search defaults a run was created with; leave it out (a new run takes the latest).",
    )

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str) -> str:
        if not re.fullmatch(RUN_NAME, name):  # not re.match: its $ lets a trailing newline through
            raise ValueError(
                f"{name!r} must be one folder name of letters, digits, '.', '_' and '-' (at most 200, not starting with '.'); rename the run"
            )
        return name

    @field_validator("optimizer", mode="before")
    @classmethod
    def _cmaes_unless_named(cls, optimizer):
        return with_default_name(optimizer)

    @field_validator("runs_dir")
    @classmethod
    def _no_control_characters(cls, runs_dir: str) -> str:
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in runs_dir):
            raise ValueError(
                f"{runs_dir!r} holds a control character (a newline or a tab); the path ends up in exported YAML, choose a folder without one"
            )
        return runs_dir

    @property
    def multi_objective(self) -> bool:
        return len(self.evaluation.objectives) >= 2

    @property
    def searched_params(self) -> list[str]:
        """The parameters the genome evolves: the spec's list, or the method's defaults (one method)."""
        return self.genome.params or default_parameters(METHODS[self.merge.method], self.merge.fixed, self.version)

    @model_validator(mode="after")
    def _genes_fit_the_method(self):
        if self.search.layers:  # a layer path merges by passthrough: merge.method plays no part
            check_layer_space(self)
            return self
        if self.search.phased:  # phase 1 searches the method's parameters: checked below as well
            check_phased_space(self)
        if not isinstance(self.merge.method, str):
            check_method_list(self)  # a method gene: spec_methods.py
            return self
        method = METHODS[self.merge.method]
        if not method.searchable:
            raise ValueError(
                f"merge.method: {method.name} has no parameter to search; merge it with `evomerge merge CONFIG OUT`, or search another method"
            )
        for name in self.genome.params or []:
            if name not in method.tunable:
                raise ValueError(
                    f"genome.params: {self.merge.method} does not take '{name}'; it takes {', '.join(method.tunable)}"
                )
        searched = self.searched_params
        for name in self.genome.bounds:
            if name not in searched:
                raise ValueError(
                    f"genome.bounds: '{name}' is not searched (searched: {', '.join(searched)}); remove its bounds or add it to genome.params"
                )
        return self

    @model_validator(mode="after")
    def _optimizer_fits_objectives(self):
        if self.multi_objective and self.optimizer.name == "cmaes":
            raise ValueError("optimizer.name: cmaes optimizes one score; use nsga2 or tpe for several objectives")
        if not self.multi_objective and self.optimizer.name == "nsga2":
            raise ValueError(
                "optimizer.name: nsga2 needs two or more evaluation.objectives; use cmaes or tpe for one score"
            )
        return self

    def fingerprint(self) -> str:
        """Hash of everything that changes what the search does (the run name excluded)."""
        payload = self.model_dump(mode="json", exclude={"name", "runs_dir", "logging"})
        if payload["version"] == LEGACY_SEARCH_VERSION:
            del payload["version"]  # runs fingerprinted before versions existed
        payload["evaluation"] = without_later_defaults(payload["evaluation"])
        payload["optimizer"] = self.optimizer.flat_fields()  # the one flat layout older runs were hashed in
        if payload.get("search") == DEFAULT_SEARCH_SPACE.model_dump(mode="json"):
            del payload["search"]  # the default space: fingerprints as before the section existed
        if payload["budget"].get("max_docs") is None:
            payload["budget"].pop("max_docs", None)  # likewise
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def default_parameters(method: MethodInfo, fixed: dict, version: int = SEARCH_VERSION) -> list[str]:
    """What a search evolves when the spec does not say.

    The method's entry says (`MethodInfo.default_parameters`); `version` is the spec's search version.
    """
    return method.default_parameters(fixed, version)


def _resolve_paths(data: dict, folder: Path) -> dict:
    def resolve(path):
        return str((folder / Path(path).expanduser()).resolve()) if isinstance(path, str) else path

    models = data.get("models")
    if isinstance(models, dict):
        models = dict(models)
        models["base"] = model_name(models.get("base"), folder)
        if isinstance(models.get("experts"), list):
            models["experts"] = [model_name(p, folder) for p in models["experts"]]
        data["models"] = models
    if isinstance(data.get("runs_dir"), str):
        data["runs_dir"] = resolve(data["runs_dir"])
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("include", []), list):
        evaluation = dict(evaluation)
        # The default folder only where it exists: a spec of bundled lm-eval tasks needs none.
        default = [p for p in DEFAULT_INCLUDE if (folder / p).is_dir()]
        evaluation["include"] = [resolve(p) for p in evaluation.get("include", default)]
        data["evaluation"] = evaluation
    return data


def parse_spec(data, source: str, folder: Path, context: dict | None = None) -> Spec:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Spec.model_validate(_resolve_paths(dict(data), folder), context=context)
    except ValidationError as error:
        raise UserError(describe_spec_errors(error, source, Spec)) from None


def parse_frozen_spec(data, source: str, folder: Path) -> Spec:
    """A run's frozen spec; one written before search versions existed keeps version 1's defaults,
    and one frozen in the flat optimizer layout keeps its other optimizers' fields for the fingerprint."""
    if isinstance(data, dict) and "version" not in data:
        data = {**data, "version": LEGACY_SEARCH_VERSION}
    return parse_spec(data, source, folder, context={FROZEN_SPEC: True})


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    return parse_spec(load_yaml_file(path, what="spec file"), str(path), path.resolve().parent)
