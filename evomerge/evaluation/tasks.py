"""Find, validate and build the lm-eval tasks that score merge candidates.

`resolve_tasks` runs in `evomerge validate`: it needs no model, reads only YAML
(no task code is imported, no dataset is loaded) and turns every mistake into a
one-line `UserError`.  `build_tasks` turns the resolved tasks into lm-eval Task
objects, once per worker.

Relative data paths in a task YAML are made absolute against that YAML's own
folder, because lm-eval's json/csv loaders resolve them against the current
directory, which differs between a laptop, a Ray worker and CI.
"""

from __future__ import annotations

import copy
import functools
import glob
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import UserError, did_you_mean
from evomerge.evaluation.checks import scoring_overrides
from evomerge.evaluation.config import EvalSet, EvalTask, EvaluationSpec

INCLUDE_FIELD = "evaluation.include"
# lm-eval names the result of a metric without a filter_list "<metric>,none".
NO_FILTER = "none"


@dataclass(frozen=True)
class ResolvedTask:
    """A validated task: where its YAML is and what to override when building it."""

    name: str
    weight: float
    result_key: str  # key in lm-eval's results, e.g. "acc,none"
    yaml_path: Path
    # Config keys rewritten with absolute paths, plus num_fewshot when the spec sets it.
    overrides: dict[str, Any]


@dataclass(frozen=True)
class ResolvedTasks:
    """All tasks of one eval set, in the order it lists them."""

    tasks: tuple[ResolvedTask, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)


@contextmanager
def quiet_lm_eval(level: int = logging.WARNING) -> Iterator[None]:
    """Hide lm-eval's per-call INFO chatter; warnings and errors still show."""
    logger = logging.getLogger("lm_eval")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def resolve_tasks(eval_set: EvalSet) -> ResolvedTasks:
    """Check every task of `eval_set` without a model; raise UserError on the first problem."""
    include = eval_set.evaluation.include
    _check_include_folders(include)
    local_index = _local_index(include)
    resolved = []
    for position, task in enumerate(eval_set.tasks):
        field = f"{eval_set.field}[{position}]"
        entry = local_index.get(task.name) or _builtin_entry(task.name, field, local_index, include)
        resolved.append(_resolve_one(task, entry, field, eval_set.evaluation))
    return ResolvedTasks(tuple(resolved))


def build_tasks(resolved: ResolvedTasks) -> dict[str, Any]:
    """Build lm-eval Task objects (loads datasets, imports `!function` code); slow, call once."""
    # The private loader is the one lm-eval uses for its own YAMLs: it follows `include:`
    # and imports `!function` code next to the YAML, which a plain safe_load cannot.
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    configs = [load_yaml(task.yaml_path, resolve_func=True) | task.overrides for task in resolved.tasks]
    with quiet_lm_eval():
        loaded = TaskManager(include_defaults=False).load(configs)
    return {name: loaded["tasks"][name] for name in resolved.names}


def _check_include_folders(include: list[str]) -> None:
    for folder in include:
        if not Path(folder).is_dir():
            raise UserError(f"{INCLUDE_FIELD}: folder '{folder}' does not exist; fix or remove it")


def _local_index(include: list[str]) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        return TaskManager(include_path=list(include), include_defaults=False).task_index


@functools.lru_cache(maxsize=1)
def _builtin_index() -> dict[str, Any]:
    # Indexing lm-eval's ~15k bundled YAMLs takes seconds, so only a name missing
    # from the include paths pays for it, once per process.  Its warnings are about
    # lm-eval's own duplicate names, nothing the user can act on.
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval(logging.ERROR):
        return TaskManager().task_index


def _builtin_entry(name: str, field: str, local_index: dict, include: list[str]):
    """The bundled lm-eval task `name`, allowed only when its data is on local disk."""
    builtin = _builtin_index()
    entry = builtin.get(name)
    if entry is None:
        hint = did_you_mean(name, sorted(set(local_index) | set(builtin)))
        raise UserError(
            f"{field}.name: unknown lm-eval task '{name}'{hint}; put its YAML under "
            f"{include[0] if include else 'an include folder'} or add its folder to {INCLUDE_FIELD}"
        )
    _check_single_task(entry, field)
    config = entry.cfg or {}
    if not _reads_local_data(config, entry.yaml_path.parent):
        raise UserError(
            f"{field}.name: lm-eval task '{name}' downloads "
            f"'{config.get('dataset_path') or 'its dataset'}' from the Hugging Face hub, which "
            f"evomerge never contacts; copy its YAML into {INCLUDE_FIELD} with local "
            "dataset_kwargs.data_files"
        )
    return entry


def _check_single_task(entry, field: str) -> None:
    kind = entry.kind.name  # lm-eval's Kind enum: TASK, PY_TASK, GROUP, TAG
    if kind not in ("TASK", "PY_TASK"):
        raise UserError(
            f"{field}.name: '{entry.name}' is an lm-eval {kind.lower()}, not a single task; list its tasks one by one"
        )


def _reads_local_data(config: dict, yaml_dir: Path) -> bool:
    if (config.get("dataset_kwargs") or {}).get("data_files"):
        return True
    dataset_path = _absolute_paths(config, yaml_dir).get("dataset_path", config.get("dataset_path"))
    return bool(dataset_path) and Path(dataset_path).is_absolute() and Path(dataset_path).exists()


def _resolve_one(spec: EvalTask, entry, field: str, evaluation: EvaluationSpec) -> ResolvedTask:
    _check_single_task(entry, field)
    config = entry.cfg or {}
    overrides = _absolute_paths(config, entry.yaml_path.parent)
    _check_data_files_exist(overrides, spec.name, entry.yaml_path, field)
    if spec.num_fewshot is not None:
        overrides["num_fewshot"] = spec.num_fewshot
    overrides |= scoring_overrides(spec, config, evaluation, field)
    return ResolvedTask(
        name=spec.name,
        weight=float(spec.weight),
        result_key=_result_key(spec, config, field),
        yaml_path=entry.yaml_path,
        overrides=overrides,
    )


def _absolute_paths(config: dict, yaml_dir: Path) -> dict[str, Any]:
    """Config keys whose relative local paths must be anchored at the YAML's folder."""
    overrides: dict[str, Any] = {}
    dataset_kwargs = copy.deepcopy(config.get("dataset_kwargs") or {})
    for key in ("data_files", "data_dir"):
        if dataset_kwargs.get(key):
            dataset_kwargs[key] = _map_paths(dataset_kwargs[key], yaml_dir)
            overrides["dataset_kwargs"] = dataset_kwargs
    dataset_path = config.get("dataset_path")
    # Only an explicitly relative path: "json" or "org/name" are loader or hub names.
    if isinstance(dataset_path, str) and dataset_path.startswith(("./", "../")):
        overrides["dataset_path"] = str((yaml_dir / dataset_path).resolve())
    return overrides


def _map_paths(value: Any, yaml_dir: Path) -> Any:
    """Apply `_absolute` to every path in a data_files value (str, list, or split -> either)."""
    if isinstance(value, dict):
        return {split: _map_paths(paths, yaml_dir) for split, paths in value.items()}
    if isinstance(value, list):
        return [_map_paths(path, yaml_dir) for path in value]
    return _absolute(str(value), yaml_dir)


def _absolute(path: str, yaml_dir: Path) -> str:
    if "://" in path:
        return path
    return str((yaml_dir / Path(path).expanduser()).resolve())


def _local_paths(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for paths in value.values():
            yield from _local_paths(paths)
    elif isinstance(value, list):
        for path in value:
            yield from _local_paths(path)
    elif "://" not in str(value):
        yield str(value)


def _check_data_files_exist(overrides: dict, name: str, yaml_path: Path, field: str) -> None:
    dataset_kwargs = overrides.get("dataset_kwargs", {})
    for key in ("data_files", "data_dir"):
        for path in _local_paths(dataset_kwargs.get(key, [])):
            # glob also accepts literal paths, and data_files may be patterns like data/*.jsonl
            if not glob.glob(path):
                raise UserError(
                    f"{field}.name: task '{name}' ({yaml_path}) reads '{path}', which does not exist; "
                    f"fix dataset_kwargs.{key} in that YAML (relative paths start at the YAML's folder)"
                )


def _result_key(spec: EvalTask, config: dict, field: str) -> str:
    """lm-eval's results key "<metric>,<filter>" for the metric the spec asks for."""
    metric, _, wanted_filter = spec.metric.partition(",")
    metrics = _metric_names(config)
    if metric not in metrics:
        raise UserError(
            f"{field}.metric: task '{spec.name}' has no metric '{metric}'{did_you_mean(metric, metrics)}; "
            f"choose one of: {', '.join(metrics)}"
        )
    filters = _filter_names(config)
    if wanted_filter:
        if wanted_filter not in filters:
            raise UserError(
                f"{field}.metric: task '{spec.name}' has no filter '{wanted_filter}'; "
                f"choose one of: {', '.join(filters)}"
            )
        return f"{metric},{wanted_filter}"
    if len(filters) > 1:
        raise UserError(
            f"{field}.metric: task '{spec.name}' reports '{metric}' once per filter; write "
            f"'{metric},<filter>' with one of: {', '.join(filters)}"
        )
    return f"{metric},{filters[0]}"


def _metric_names(config: dict) -> list[str]:
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    metric_list = config.get("metric_list")
    if not metric_list:
        return list(DEFAULT_METRIC_REGISTRY.get(config.get("output_type", "generate_until"), []))
    # An unresolved `!function utils.my_metric` reads as ".../utils.my_metric"; lm-eval
    # names the result after the function.
    return [str(item.get("metric", "")).rpartition(".")[2] for item in metric_list]


def _filter_names(config: dict) -> list[str]:
    filter_list = config.get("filter_list")
    return [item["name"] for item in filter_list] if filter_list else [NO_FILTER]
