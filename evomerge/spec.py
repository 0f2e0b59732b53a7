"""spec.yaml as frozen pydantic models: what to merge, how, what to search, how to judge it.

`load_spec` returns a validated Spec or raises a one-line UserError with the field path. Paths in
the spec are resolved against the spec file's folder. Checks that need the model folders or the
task files live in `validation.py`; this module only knows the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import UserError, describe_validation_error, did_you_mean
from evomerge.merge.config import load_yaml_file
from evomerge.merge.methods import METHODS

SEARCHABLE = ("weight", "density", "t", "gamma", "epsilon", "lambda")
DEFAULT_BOUNDS = {
    "weight": (0.0, 1.0),
    "density": (0.1, 1.0),
    "t": (0.0, 1.0),
    "gamma": (0.0, 0.1),
    "epsilon": (0.01, 0.2),
    "lambda": (0.5, 1.5),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsSpec(_Strict):
    base: str = Field(description="The model every expert was fine-tuned from.")
    experts: list[str] = Field(min_length=1, description="Fine-tunes to merge.")

    @field_validator("experts")
    @classmethod
    def _distinct(cls, experts):
        if len(set(experts)) != len(experts):
            raise ValueError("an expert is listed twice; list each model once")
        return experts


class MergeSpec(_Strict):
    method: str = "ties"
    fixed: dict[str, float | bool] = Field(
        default_factory=dict, description="Shared parameters held constant, e.g. normalize, lambda."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("method")
    @classmethod
    def _known_method(cls, method):
        if method not in METHODS:
            raise ValueError(
                f"unknown method '{method}'{did_you_mean(method, METHODS)}; choose one of {', '.join(METHODS)}"
            )
        return method


class GenomeSpec(_Strict):
    params: list[str] | None = Field(None, description="Parameters to evolve; default: the method's weight/density/t.")
    layer_groups: int = Field(
        4, ge=1, description="Contiguous layer groups, each with its own genes (1 = one value per model)."
    )
    split_attn_mlp: bool = False
    embeddings: bool = Field(False, description="Separate genes for embed_tokens, final norm and lm_head.")
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _searchable(cls, params):
        for name in params or []:
            if name not in SEARCHABLE:
                raise ValueError(
                    f"'{name}' cannot be searched{did_you_mean(name, SEARCHABLE)}; choose from {', '.join(SEARCHABLE)}"
                )
        return params

    @field_validator("bounds")
    @classmethod
    def _ordered(cls, bounds):
        for name, (low, high) in bounds.items():
            if name not in SEARCHABLE:
                raise ValueError(f"no parameter '{name}'{did_you_mean(name, SEARCHABLE)}")
            if not low < high:
                raise ValueError(f"{name}: lower bound {low} must be below upper bound {high}")
            if name == "density" and not (low > 0 and high <= 1):
                raise ValueError(f"density bounds must lie in (0, 1], got [{low}, {high}]")
        return bounds


class OptimizerSpec(_Strict):
    name: Literal["cmaes", "tpe", "random", "nsga2"] = "cmaes"
    seed: int = 0
    popsize: int | None = Field(None, ge=2)
    sigma0: float = Field(0.25, gt=0, le=1)
    n_startup_trials: int = Field(10, ge=0)


class TaskWeight(_Strict):
    name: str
    weight: float = Field(1.0, gt=0)
    metric: str = "acc"
    num_fewshot: int | None = Field(None, ge=0)


class ObjectiveSpec(_Strict):
    name: str
    tasks: list[str] = Field(min_length=1, description="Search tasks whose weighted mean is this objective.")


class EvaluationSpec(_Strict):
    tasks: list[TaskWeight] = Field(min_length=1)
    objectives: list[ObjectiveSpec] = Field(
        default_factory=list, description="Two or more for a multi-objective (Pareto) search."
    )
    heldout_tasks: list[TaskWeight] = Field(default_factory=list, description="Disjoint split for the final report.")
    include: list[str] = Field(default_factory=lambda: ["evals"])
    limit: int | None = Field(None, ge=1, description="Docs per search task: a fixed seeded subset.")
    heldout_limit: int | None = Field(None, ge=1, description="Docs per held-out task; default: the whole split.")
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    max_length: int | None = Field(None, ge=8)
    top_k: int = Field(5, ge=0, description="Trials re-scored on the held-out tasks at the end.")

    @model_validator(mode="after")
    def _objectives_use_search_tasks(self):
        names = [t.name for t in self.tasks]
        for objective in self.objectives:
            for task in objective.tasks:
                if task not in names:
                    raise ValueError(
                        f"objective '{objective.name}' uses '{task}', which is not in evaluation.tasks{did_you_mean(task, names)}"
                    )
        if len(self.objectives) == 1:
            raise ValueError("objectives: give two or more for a Pareto search, or none for a single weighted score")
        return self

    @field_validator("tasks", "heldout_tasks", mode="before")
    @classmethod
    def _names_as_tasks(cls, tasks):
        return [{"name": t} if isinstance(t, str) else t for t in tasks or []]


class BudgetSpec(_Strict):
    max_evals: int | None = Field(100, ge=1)
    time_limit_min: float | None = Field(None, gt=0)
    baselines: bool = Field(
        True,
        description="Score the parents and the default merges first, and seed the optimizer with those the genome can express.",
    )

    @model_validator(mode="after")
    def _bounded(self):
        if self.max_evals is None and self.time_limit_min is None:
            raise ValueError("set max_evals or time_limit_min so the search ends")
        return self


class WorkersSpec(_Strict):
    count: int | None = Field(None, ge=1, description="Default: one per GPU, else 2 CPU workers.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus_per_worker: float = Field(1.0, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    queue_depth: int = Field(2, ge=1, description="Candidates queued per worker so it never waits for the driver.")


class LoggingSpec(_Strict):
    tensorboard: bool = Field(False, description="Log every trial to runs/NAME/tensorboard (needs tensorboard).")
    wandb: bool = Field(False, description="Log every trial to Weights & Biases (needs wandb).")
    wandb_project: str = "evomerge"


class Spec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    models: ModelsSpec
    merge: MergeSpec = MergeSpec()
    genome: GenomeSpec = GenomeSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    evaluation: EvaluationSpec
    budget: BudgetSpec = BudgetSpec()
    workers: WorkersSpec = WorkersSpec()
    runs_dir: str = Field("runs", description="Where runs/NAME/ goes, relative to the spec file.")
    logging: LoggingSpec = LoggingSpec()
    trust_remote_code: bool = False

    @property
    def multi_objective(self) -> bool:
        return len(self.evaluation.objectives) >= 2

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
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _resolve_paths(data: dict, folder: Path) -> dict:
    def resolve(path):
        return str((folder / Path(path).expanduser()).resolve()) if isinstance(path, str) else path

    models = data.get("models")
    if isinstance(models, dict):
        models = dict(models)
        models["base"] = resolve(models.get("base"))
        if isinstance(models.get("experts"), list):
            models["experts"] = [resolve(p) for p in models["experts"]]
        data["models"] = models
    if isinstance(data.get("runs_dir"), str):
        data["runs_dir"] = resolve(data["runs_dir"])
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("include", ["evals"]), list):
        evaluation = dict(evaluation)
        evaluation["include"] = [resolve(p) for p in evaluation.get("include", ["evals"])]
        data["evaluation"] = evaluation
    return data


def parse_spec(data, source: str, folder: Path) -> Spec:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Spec.model_validate(_resolve_paths(dict(data), folder))
    except ValidationError as error:
        first = error.errors()[0]
        hint = did_you_mean(first["loc"][-1], _keys_at(first["loc"][:-1])) if first["type"] == "extra_forbidden" else ""
        raise UserError(describe_validation_error(error, source) + hint) from None


def _keys_at(location: tuple) -> list[str]:
    """The keys the spec allows at `location` (a pydantic error path), for did-you-mean hints."""
    model = Spec
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


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    return parse_spec(load_yaml_file(path), str(path), path.resolve().parent)
