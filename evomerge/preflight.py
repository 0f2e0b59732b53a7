"""Everything checked before a search starts, without reading a weight.

`preflight(spec)` checks the model folders (existence, architecture, vocabulary, tokenizer), plans
the default merge, resolves every lm-eval task, and returns what the search needs: the genome, the
merge that keeps every tensor resident, the evaluation settings and the baseline merges.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import UserError
from evomerge.evaluation.tasks import EvalSettings, TaskSpec, resolve_tasks
from evomerge.genome import Genome, num_layers_of
from evomerge.merge.config import MergeConfig
from evomerge.merge.methods import METHODS
from evomerge.merge.validate import validate_merge_config
from evomerge.rundir.trials import BASE_LABEL, LINEAR_LABEL, parent_label
from evomerge.spec import Spec, TaskWeight

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Prepared:
    spec: Spec
    genome: Genome
    union_config: dict
    eval_sets: dict[str, EvalSettings]
    baselines: list[tuple[str, dict]]  # (label, merge config)


def preflight(spec: Spec, source: str = "spec") -> Prepared:
    method = METHODS[spec.merge.method]
    if method.family == "slerp" and len(spec.models.experts) != 1:
        raise UserError(
            f"{source}: models.experts: slerp merges the base with exactly one expert, got {len(spec.models.experts)}; use ties or task_arithmetic for more"
        )
    union = _union_config(spec)
    field_names = {
        spec.models.base: "models.base",
        **{p: f"models.experts[{i}]" for i, p in enumerate(spec.models.experts)},
    }
    validated = validate_merge_config(union, source, field_names=field_names)
    _check_tokenizers(spec, source)
    genome = Genome(spec, num_layers_of(spec.models.base))
    validate_merge_config(genome.to_merge_config(genome.x0()), source, folders=validated.folders)
    eval_sets = {"search": _eval_settings(spec, spec.evaluation.tasks, spec.evaluation.limit)}
    if spec.evaluation.heldout_tasks:
        eval_sets["heldout"] = _eval_settings(spec, spec.evaluation.heldout_tasks, spec.evaluation.heldout_limit)
        _check_disjoint(spec, source)
    for _name, settings in eval_sets.items():
        resolve_tasks(settings)
    check_available(spec, source)
    baselines = baseline_configs(spec) if spec.budget.baselines else []
    return Prepared(spec, genome, union.model_dump(mode="json", exclude_none=True), eval_sets, baselines)


def _union_config(spec: Spec) -> MergeConfig:
    """A task-arithmetic merge over every model: it touches every tensor the search can use."""
    return MergeConfig.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": spec.models.base,
            "models": [{"model": path, "parameters": {"weight": 1.0}} for path in spec.models.experts],
            "dtype": spec.merge.dtype,
        }
    )


def _check_tokenizers(spec: Spec, source: str) -> None:
    reference = _tokenizer_fingerprint(Path(spec.models.base))
    for index, path in enumerate(spec.models.experts):
        if _tokenizer_fingerprint(Path(path)) != reference:
            raise UserError(
                f"{source}: models.experts[{index}]: its tokenizer differs from the base model's; every model must share the base tokenizer"
            )


def _tokenizer_fingerprint(folder: Path) -> str | None:
    for name in ("tokenizer.json", "vocab.json", "tokenizer.model"):
        if (folder / name).exists():
            data = (folder / name).read_bytes()
            if name == "tokenizer.json":
                data = json.dumps(json.loads(data).get("model", {}), sort_keys=True).encode()
            return f"{name}:{hashlib.sha256(data).hexdigest()}"
    return None


def _eval_settings(spec: Spec, tasks: list[TaskWeight], limit: int | None) -> EvalSettings:
    evaluation = spec.evaluation
    return EvalSettings(
        tasks=tuple(TaskSpec(name=t.name, weight=t.weight, metric=t.metric, num_fewshot=t.num_fewshot) for t in tasks),
        include_paths=tuple(evaluation.include),
        limit=limit,
        subset_seed=evaluation.seed,
        batch_size=evaluation.batch_size,
        max_length=evaluation.max_length,
    )


def _check_disjoint(spec: Spec, source: str) -> None:
    overlap = {t.name for t in spec.evaluation.tasks} & {t.name for t in spec.evaluation.heldout_tasks}
    if overlap:
        raise UserError(
            f"{source}: evaluation.heldout_tasks: {sorted(overlap)[0]} is also a search task; held-out tasks must be a disjoint split"
        )


def baseline_configs(spec: Spec) -> list[tuple[str, dict]]:
    """The parents and the default merges every report compares against."""
    base, experts = spec.models.base, spec.models.experts
    dtype = spec.merge.dtype

    def merge(method, weight, **extra):
        models = [{"model": p, "parameters": {"weight": weight, **extra}} for p in experts]
        return {"merge_method": method, "base_model": base, "models": models, "dtype": dtype}

    configs = [(BASE_LABEL, _single(base, dtype))]
    configs += [(parent_label(p), _single(p, dtype)) for p in experts]
    configs += [
        (
            LINEAR_LABEL,
            {
                "merge_method": "linear",
                "models": [{"model": p, "parameters": {"weight": 1.0}} for p in experts],
                "dtype": dtype,
            },
        ),
        ("task_arithmetic (lambda=1)", merge("task_arithmetic", 1.0)),
        ("ties (density=0.5)", merge("ties", 1.0, density=0.5)),
        ("dare_ties (density=0.5)", merge("dare_ties", 1.0, density=0.5)),
    ]
    return configs


def _single(path: str, dtype: str) -> dict:
    return {"merge_method": "linear", "models": [{"model": path, "parameters": {"weight": 1.0}}], "dtype": dtype}


TRACKER_INSTALL_HINT = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def check_available(spec: Spec, source: str = "spec") -> None:
    """The optional logging backends the spec asks for are importable (neither is a dependency)."""
    for name in ("tensorboard", "wandb"):
        if getattr(spec.logging, name) and importlib.util.find_spec(name) is None:
            raise UserError(
                f"{source}: logging.{name}: {name} is not installed; {TRACKER_INSTALL_HINT[name]} or set it to false"
            )
