"""Find, validate and build the lm-eval tasks, groups and tags that score merge candidates.

`resolve_tasks` runs in `evomerge validate`: it needs no model, reads only YAML (no task code is
imported, no dataset is loaded) and turns every mistake into a one-line `UserError`. A name may be
a task, a group or a tag, from the include folders or lm-eval's bundled tasks; groups and tags
expand to their leaf tasks (`task_index`), each checked like a task. `build_tasks` turns the
resolved leaves into lm-eval Task objects, once per worker; datasets come through `datasets` and
its caches, hub datasets included.

A group is scored as lm-eval scores it: its `aggregate_metric_list` entry for the spec's metric
(a mean over its leaf tasks, weighted by their doc counts when `weight_by_size`). A tag has no
aggregate in lm-eval; evomerge scores it as the unweighted mean of its tasks' metric, as it does a
group without an aggregate_metric_list. Leaf tasks that do not report the spec's metric are left
out of a group or tag, as lm-eval's aggregation leaves them out, and are not scored at all.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import UserError, did_you_mean
from evomerge.evaluation.checks import scoring_overrides
from evomerge.evaluation.config import EvalSet, EvalTask
from evomerge.evaluation.disjoint import check_carved_fewshot, check_disjoint_from_search, check_leaves_once
from evomerge.evaluation.hub_data import DatasetRef, dataset_key, hub_dataset
from evomerge.evaluation.scores import EQUAL_WEIGHTS, SIZE_WEIGHTS
from evomerge.evaluation.task_index import (
    Expansion,
    Leaf,
    TaskKind,
    TaskRegistry,
    UnknownMember,
    quiet_lm_eval,
    resolved_config,
)
from evomerge.evaluation.task_paths import absolute_paths, check_data_files_exist

__all__ = ["ResolvedTask", "ResolvedTasks", "build_groups", "build_tasks", "quiet_lm_eval", "resolve_tasks"]

INCLUDE_FIELD = "evaluation.include"
# lm-eval names the result of a metric without a filter_list "<metric>,none".
NO_FILTER = "none"


@dataclass(frozen=True)
class ResolvedLeaf:
    """One leaf task to build and score: its YAML and what evomerge overrides in its config."""

    name: str
    yaml_path: Path
    result_key: str  # key in lm-eval's results, e.g. "acc,none"
    # Config keys rewritten with absolute paths, num_fewshot and generation_kwargs when the spec
    # sets them, and the dataset revision a lock pins.
    overrides: dict[str, Any]
    hub_dataset: DatasetRef | None = None  # the hub dataset it reads; None when its data is local


@dataclass(frozen=True)
class ResolvedTask:
    """A validated entry of the spec (a task, group or tag), the leaves it scores and how they combine."""

    name: str
    weight: float
    result_key: str  # key in lm-eval's results, e.g. "acc,none"; for a group, its aggregate's
    kind: TaskKind
    leaves: tuple[ResolvedLeaf, ...]
    yaml_path: Path | None  # the task's or group's YAML; None for a tag
    weighting: str | None = None  # groups and tags: SIZE_WEIGHTS or EQUAL_WEIGHTS over the leaves
    group_config: dict[str, Any] | None = None  # a group's aggregate_metric_list and metadata, for lm-eval
    yaml_paths: tuple[Path, ...] = ()  # the group YAMLs walked to find the leaves

    @property
    def overrides(self) -> dict[str, Any]:
        """A single task's overrides (its one leaf's)."""
        return self.leaves[0].overrides

    @property
    def combined(self) -> bool:
        """Whether the entry's score combines several leaves (a group or a tag)."""
        return self.kind is not TaskKind.TASK


@dataclass(frozen=True)
class ResolvedTasks:
    """All tasks of one eval set, in the order it lists them."""

    tasks: tuple[ResolvedTask, ...]
    include: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    @property
    def leaves(self) -> tuple[ResolvedLeaf, ...]:
        """Every leaf task, in order (a single task is its own leaf)."""
        return tuple(leaf for task in self.tasks for leaf in task.leaves)

    def yaml_paths(self) -> list[Path]:
        """Every YAML the entries are read from: tasks', groups' (walked) and leaves'."""
        found: dict[Path, None] = {}
        for task in self.tasks:
            for path in (*task.yaml_paths, *(leaf.yaml_path for leaf in task.leaves)):
                found[path] = None
        return list(found)


def resolve_tasks(eval_set: EvalSet) -> ResolvedTasks:
    """Check every task of `eval_set` without a model; raise UserError on the first problem."""
    include = eval_set.evaluation.include
    _check_include_folders(include)
    registry = TaskRegistry(include)
    resolved = []
    for position, task in enumerate(eval_set.tasks):
        field = eval_set.task_field(position)
        expansion = _expand(registry, task.name, field, include)
        resolved.append(_resolve_entry(task, expansion, field, eval_set))
    check_disjoint_from_search(resolved, eval_set, registry)
    check_leaves_once(resolved, eval_set)
    return ResolvedTasks(tuple(resolved), tuple(include))


def build_tasks(resolved: ResolvedTasks) -> dict[str, Any]:
    """Build every leaf's lm-eval Task object (loads datasets, imports `!function` code); slow, call once."""
    return build_configs(leaf_configs(resolved))


def leaf_configs(resolved: ResolvedTasks) -> dict[str, dict[str, Any]]:
    """Leaf name -> the config lm-eval builds it from: its YAML as lm-eval reads it, then the overrides."""
    from lm_eval.tasks._yaml_loader import load_yaml

    configs: dict[str, dict[str, Any]] = {}
    registry = None
    for task in resolved.tasks:
        if not task.combined:
            # The private loader is the one lm-eval uses for its own YAMLs: it follows `include:`
            # and imports `!function` code next to the YAML, which a plain safe_load cannot.
            leaf = task.leaves[0]
            configs[leaf.name] = load_yaml(leaf.yaml_path, resolve_func=True) | leaf.overrides
            continue
        registry = registry or TaskRegistry(list(resolved.include))
        walked = {leaf.name: leaf for leaf in registry.expand(task.name, resolved_config).leaves}
        for leaf in task.leaves:
            configs[leaf.name] = walked[leaf.name].config | leaf.overrides
    return configs


def build_configs(configs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """lm-eval Task objects for leaf configs, by leaf name."""
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        loaded = TaskManager(include_defaults=False).load(list(configs.values()))
    return {name: loaded["tasks"][name] for name in configs}


def build_groups(resolved: ResolvedTasks, tasks: Mapping[str, Any]) -> dict[str, Any]:
    """An lm-eval Group per group entry, holding its scored leaves: lm-eval's own aggregation."""
    from lm_eval.api.group import Group
    from lm_eval.config.group import GroupConfig

    groups = {}
    for task in resolved.tasks:
        if task.kind is TaskKind.GROUP and task.group_config is not None:
            group = Group.from_config(GroupConfig(group=task.name, **task.group_config))
            for leaf in task.leaves:
                group.add(tasks[leaf.name])
            groups[task.name] = group
    return groups


def _check_include_folders(include: list[str]) -> None:
    for folder in include:
        if not Path(folder).is_dir():
            raise UserError(f"{INCLUDE_FIELD}: folder '{folder}' does not exist; fix or remove it")


def _expand(registry: TaskRegistry, name: str, field: str, include: list[str]) -> Expansion:
    try:
        return registry.expand(name)
    except UnknownMember as missing:
        raise UserError(
            f"{field}.name: lm-eval group '{missing.group}' lists '{missing.member}', which is no task, group or "
            f"tag{did_you_mean(missing.member, registry.names())}; fix that group's YAML"
        ) from None
    except KeyError:
        raise UserError(
            f"{field}.name: unknown lm-eval task '{name}'{did_you_mean(name, registry.names())}; "
            f"give a task, group or tag that `lm_eval --tasks` accepts, or put its YAML under "
            f"{include[0] if include else 'an include folder'} or add its folder to {INCLUDE_FIELD}"
        ) from None


def _resolve_entry(spec: EvalTask, expansion: Expansion, field: str, eval_set: EvalSet) -> ResolvedTask:
    if expansion.kind is TaskKind.TASK:
        leaf = expansion.leaves[0]
        resolved_leaf = _resolve_leaf(spec, leaf, field, eval_set, _result_key(spec, leaf.config, field))
        return ResolvedTask(
            spec.name, float(spec.weight), resolved_leaf.result_key, TaskKind.TASK, (resolved_leaf,), leaf.yaml_path
        )
    result_key, weighting, group_config = _combined_key(spec, expansion, field)
    leaves = tuple(
        _resolve_leaf(spec, leaf, field, eval_set, result_key)
        for leaf in expansion.leaves
        if _reports(leaf.config, result_key)
    )
    if not leaves:
        raise UserError(
            f"{field}.metric: no task of lm-eval {expansion.kind.value} '{spec.name}' reports '{result_key}'; "
            f"choose a metric its tasks report: {', '.join(_metric_names(expansion.leaves[0].config))}"
        )
    yaml_path = expansion.yaml_paths[0] if expansion.yaml_paths else None
    return ResolvedTask(
        spec.name,
        float(spec.weight),
        result_key,
        expansion.kind,
        leaves,
        yaml_path,
        weighting,
        group_config,
        expansion.yaml_paths,
    )


def _resolve_leaf(spec: EvalTask, leaf: Leaf, field: str, eval_set: EvalSet, result_key: str) -> ResolvedLeaf:
    evaluation = eval_set.evaluation
    config = leaf.config
    overrides = absolute_paths(config, leaf.yaml_path.parent)
    check_data_files_exist(overrides, leaf.name, leaf.yaml_path, field)
    if spec.num_fewshot is not None:
        overrides["num_fewshot"] = spec.num_fewshot
    overrides |= scoring_overrides(spec, config, evaluation, field, leaf.name)
    overrides |= _pinned_revision(config, overrides, eval_set.dataset_revisions)
    if eval_set.carved(spec.name) is not None:
        check_carved_fewshot(config | overrides, leaf.name, field)
    return ResolvedLeaf(leaf.name, leaf.yaml_path, result_key, overrides, hub_dataset(config, overrides, leaf.name))


def _pinned_revision(config: dict, overrides: dict, revisions: Mapping[str, str] | None) -> dict[str, Any]:
    """dataset_kwargs with the revision a lock pins for the leaf's hub dataset, if any."""
    path = config.get("dataset_path")
    if not revisions or not isinstance(path, str):
        return {}
    key = dataset_key(path, config.get("dataset_name"))
    revision = revisions.get(key) or revisions.get(path)
    if revision is None:
        return {}
    dataset_kwargs = copy.deepcopy(overrides.get("dataset_kwargs") or config.get("dataset_kwargs") or {})
    return {"dataset_kwargs": dataset_kwargs | {"revision": revision}}


def _combined_key(spec: EvalTask, expansion: Expansion, field: str) -> tuple[str, str, dict | None]:
    """The results key a group or tag is scored by, its leaves' weighting, and a group's lm-eval config."""
    metric, _, wanted_filter = spec.metric.partition(",")
    aggregates = _aggregates(expansion)
    if aggregates is None:  # a tag, or a group lm-eval reports no aggregate for: the mean of its tasks
        filters = _leaf_filters(expansion, metric)
        return _pick_filter(spec, metric, wanted_filter, filters, field), EQUAL_WEIGHTS, None
    matching = [agg for agg in aggregates if agg.metric == metric]
    if not matching:
        names = [agg.metric for agg in aggregates]
        raise UserError(
            f"{field}.metric: lm-eval group '{spec.name}' aggregates no '{metric}'{did_you_mean(metric, names)}; "
            f"choose one of: {', '.join(names)}"
        )
    agg = matching[0]
    filters = agg.filter_list or _leaf_filters(expansion, metric)
    result_key = _pick_filter(spec, metric, wanted_filter, filters, field)
    config = expansion.group_config or {}
    group_config = {key: config[key] for key in ("aggregate_metric_list", "metadata") if key in config}
    return result_key, SIZE_WEIGHTS if agg.weight_by_size else EQUAL_WEIGHTS, group_config


def _leaf_filters(expansion: Expansion, metric: str) -> list[str]:
    """The filters under which the leaves that report `metric` report it."""
    return sorted(
        {
            name
            for leaf in expansion.leaves
            if metric in _metric_names(leaf.config)
            for name in _filter_names(leaf.config)
        }
    )


def _aggregates(expansion: Expansion) -> list | None:
    """The group's aggregate_metric_list as lm-eval reads it; None for a tag or a group without one."""
    aggregates = (expansion.group_config or {}).get("aggregate_metric_list")
    if expansion.kind is not TaskKind.GROUP or not aggregates:
        return None
    from lm_eval.config.group import GroupConfig

    config = GroupConfig(group=expansion.name, aggregate_metric_list=aggregates)
    return list(config.aggregate_metric_list or [])


def _pick_filter(spec: EvalTask, metric: str, wanted: str, filters: list[str], field: str) -> str:
    if not filters:
        raise UserError(
            f"{field}.metric: no task of '{spec.name}' reports '{metric}'; choose a metric its tasks report"
        )
    if wanted:
        if wanted not in filters:
            raise UserError(
                f"{field}.metric: '{spec.name}' has no filter '{wanted}' for '{metric}'; choose one of: {', '.join(filters)}"
            )
        return f"{metric},{wanted}"
    if len(filters) > 1:
        raise UserError(
            f"{field}.metric: '{spec.name}' reports '{metric}' once per filter; write "
            f"'{metric},<filter>' with one of: {', '.join(filters)}"
        )
    return f"{metric},{filters[0]}"


def _reports(config: dict, result_key: str) -> bool:
    metric, _, key_filter = result_key.partition(",")
    return metric in _metric_names(config) and key_filter in _filter_names(config)


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
