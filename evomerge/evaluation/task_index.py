"""Names lm-eval accepts (tasks, groups, tags) and the leaf tasks each one stands for.

`TaskRegistry` looks a name up in the spec's include folders first, then in lm-eval's bundled
tasks, as `lm_eval --include_path` does. `expand` walks a group or tag down to its leaf tasks the
way lm-eval's own task factory builds them (a group's non-structural keys are overrides of every
member, a tag stands for its tasks in sorted order, a member may be a dict with overrides or a
task defined inline), and gives each leaf the config lm-eval would build it from. The walk reads
configs through a `load` function: validate passes the index's parsed YAML (no code imported),
a worker the YAML with its `!function`s resolved, so both see the same leaves.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

# A group's structural keys (lm-eval's GroupConfig fields); every other key overrides its members.
GROUP_KEYS = frozenset({"group", "group_alias", "task", "aggregate_metric_list", "metadata"})
# Keys lm-eval's factory drops from a task config before building it.
STRUCTURAL_TASK_KEYS = ("tag", "group", "task_list")


class TaskKind(str, Enum):
    """What a name in `evaluation.tasks` stands for."""

    TASK = "task"
    GROUP = "group"  # scored by its aggregate_metric_list, as lm-eval reports it
    TAG = "tag"  # a label on several tasks; lm-eval reports no aggregate for it


@dataclass(frozen=True)
class Leaf:
    """One task lm-eval builds and scores: its name, YAML and config (includes and overrides applied)."""

    name: str
    yaml_path: Path  # the group's YAML for a task defined inline in a group
    config: dict[str, Any]


@dataclass(frozen=True)
class Expansion:
    """A name and the leaf tasks it stands for (itself alone for a task)."""

    name: str
    kind: TaskKind
    leaves: tuple[Leaf, ...]
    group_config: dict[str, Any] | None = None  # a group's own YAML (aggregate_metric_list, metadata)
    yaml_paths: tuple[Path, ...] = ()  # the group YAMLs walked, for fingerprints


class UnknownMember(KeyError):
    """A group lists a name that is neither a task, a group nor a tag."""

    def __init__(self, group: str, member: str):
        super().__init__(member)
        self.group, self.member = group, member


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


@functools.lru_cache(maxsize=1)
def builtin_index() -> dict[str, Any]:
    # Indexing lm-eval's ~15k bundled YAMLs takes seconds, so only a name missing
    # from the include paths pays for it, once per process.  Its warnings are about
    # lm-eval's own duplicate names, nothing the user can act on.
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval(logging.ERROR):
        return TaskManager().task_index


def index_config(entry) -> dict[str, Any]:
    """The config the index parsed (includes merged, `!function`s unresolved): no code imported."""
    return dict(entry.cfg or {})


def resolved_config(entry) -> dict[str, Any]:
    """The config lm-eval builds from: the YAML with includes merged and `!function`s imported."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return dict(load_yaml(entry.yaml_path, resolve_func=True)) if entry.yaml_path else index_config(entry)


class TaskRegistry:
    """lm-eval's task index over the include folders, falling back on its bundled tasks."""

    def __init__(self, include: list[str]):
        from lm_eval.tasks import TaskManager

        with quiet_lm_eval():
            self.local = TaskManager(include_path=list(include), include_defaults=False).task_index

    def get(self, name: str):
        """The index entry of `name`, or None; bundled tasks are indexed only when asked for."""
        return self.local.get(name) or builtin_index().get(name)

    def is_local(self, name: str) -> bool:
        return name in self.local

    def names(self) -> list[str]:
        return sorted(set(self.local) | set(builtin_index()))

    def expand(self, name: str, load: Callable[[Any], dict] = index_config) -> Expansion:
        """The leaves of the task, group or tag `name` (KeyError when unknown, UnknownMember inside a group)."""
        entry = self.get(name)
        if entry is None:
            raise KeyError(name)
        kind = entry.kind.name
        if kind == "TAG":
            leaves = tuple(self._task(self._entry(name, member), load, None) for member in sorted(entry.tags))
            return Expansion(name, TaskKind.TAG, leaves)
        if kind == "GROUP":
            walk = _GroupWalk(self, load)
            config = load(entry)
            leaves = tuple(walk.group(name, config, None, entry.yaml_path))
            return Expansion(name, TaskKind.GROUP, leaves, config, tuple(walk.yaml_paths))
        return Expansion(name, TaskKind.TASK, (self._task(entry, load, None),))

    def _entry(self, group: str, member: str):
        entry = self.get(member)
        if entry is None:
            raise UnknownMember(group, member)
        return entry

    @staticmethod
    def _task(entry, load: Callable[[Any], dict], overrides: dict | None) -> Leaf:
        config = load(entry) | (overrides or {})
        for key in STRUCTURAL_TASK_KEYS:
            config.pop(key, None)
        return Leaf(str(config.get("task", entry.name)), Path(entry.yaml_path), config)


class _GroupWalk:
    """lm-eval's TaskFactory._build_group, building configs instead of Task objects."""

    def __init__(self, registry: TaskRegistry, load: Callable[[Any], dict]):
        self.registry, self.load = registry, load
        self.yaml_paths: list[Path] = []

    def group(self, name: str, config: dict, overrides: dict | None, yaml_path: Path) -> Iterator[Leaf]:
        if yaml_path not in self.yaml_paths:
            self.yaml_paths.append(yaml_path)
        merged = {key: value for key, value in config.items() if key not in GROUP_KEYS} | (overrides or {})
        members = config.get("task") or []
        for member in members if isinstance(members, list) else [members]:
            yield from self.member(name, member, merged, yaml_path)

    def member(self, group: str, member: Any, merged: dict, yaml_path: Path) -> Iterator[Leaf]:
        if isinstance(member, dict) and "group" in member:
            name = member["group"]
            entry = self.registry.get(name)
            if entry is not None:
                inline = {key: value for key, value in member.items() if key != "group"}
                yield from self.group(name, self.load(entry), merged | inline, Path(entry.yaml_path))
            else:
                yield from self.group(f"{group}::{name}", member, merged, yaml_path)
            return
        if isinstance(member, dict):
            base, overrides = str(member.get("task")), merged | member
        else:
            base, overrides = str(member), merged
        entry = self.registry.get(base)
        if entry is None:
            if not isinstance(member, dict):
                raise UnknownMember(group, base)
            # A task defined inline: lm-eval names it after its group.
            config = overrides | {"task": f"{group}::{base}"}
            yield Leaf(config["task"], yaml_path, config)
            return
        yield from self.entry(entry, overrides)

    def entry(self, entry, overrides: dict) -> Iterator[Leaf]:
        kind = entry.kind.name
        if kind == "GROUP":
            yield from self.group(entry.name, self.load(entry), overrides, Path(entry.yaml_path))
        elif kind == "TAG":
            for name in sorted(entry.tags):
                tagged = self.registry._entry(entry.name, name)
                yield TaskRegistry._task(tagged, self.load, {"task": name, **overrides})
        else:
            yield TaskRegistry._task(entry, self.load, {"task": entry.name, **overrides})
