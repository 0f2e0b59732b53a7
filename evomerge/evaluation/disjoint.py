"""Checks that the search and the held-out phase never share a document, and no task is scored twice.

Held-out scores are honest only when the search never saw their documents: a held-out task that a
search group also scores, or few-shot examples of a carved task drawn from the split it is scored
on, would put held-out documents in front of the search. Each is refused in one `UserError` line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.errors import UserError
from evomerge.evaluation.config import HELDOUT_TASKS_FIELD, EvalSet

if TYPE_CHECKING:
    from evomerge.evaluation.task_index import TaskRegistry
    from evomerge.evaluation.tasks import ResolvedTask


def check_carved_fewshot(config: dict, name: str, field: str) -> None:
    """A carved task must not draw few-shot examples from the split it is scored on: they would be held-out docs."""
    if not config.get("num_fewshot"):
        return
    fewshot_config = config.get("fewshot_config") or {}
    split = config.get("fewshot_split") or fewshot_config.get("split")
    if split is None and fewshot_config.get("samples") is not None:
        return  # examples written into the YAML
    # lm-eval's order: the few-shot split, else the training, validation, then test split.
    source = split or config.get("training_split") or config.get("validation_split") or config.get("test_split")
    scored = config.get("test_split") or config.get("validation_split")
    if source == scored:
        raise UserError(
            f"{field}.num_fewshot: task '{name}' draws its few-shot examples from '{scored}', the split it is "
            "scored on, so with evaluation.heldout_fraction they would include held-out docs; set num_fewshot: 0 "
            "for it, or hold out other tasks in heldout_tasks instead of carving"
        )


def check_leaves_once(resolved: list[ResolvedTask], eval_set: EvalSet) -> None:
    """No leaf task is scored by two entries (lm-eval refuses that too)."""
    seen: dict[str, int] = {}
    for position, task in enumerate(resolved):
        for leaf in task.leaves:
            if leaf.name in seen and seen[leaf.name] != position:
                first = resolved[seen[leaf.name]].name
                raise UserError(
                    f"{eval_set.task_field(position)}.name: '{task.name}' scores task '{leaf.name}', which "
                    f"'{first}' ({eval_set.task_field(seen[leaf.name])}) scores too; list each task once"
                )
            seen[leaf.name] = position


def check_disjoint_from_search(resolved: list[ResolvedTask], eval_set: EvalSet, registry: TaskRegistry) -> None:
    """Held-out tasks share no leaf task with the search tasks (a group on one side, its member on the other)."""
    if eval_set.field != HELDOUT_TASKS_FIELD:
        return
    searched: dict[str, str] = {}
    for spec_task in eval_set.evaluation.tasks:
        try:
            searched |= {leaf.name: spec_task.name for leaf in registry.expand(spec_task.name).leaves}
        except KeyError:
            continue  # the search set's own resolution names it
    carved = eval_set.carve.tasks if eval_set.carve is not None else ()
    for position, task in enumerate(resolved):
        if position < len(carved):
            continue  # a carved search task: its held-out docs are disjoint by construction
        shared = [leaf.name for leaf in task.leaves if leaf.name in searched]
        if shared:
            raise UserError(
                f"{eval_set.task_field(position)}.name: '{task.name}' scores task '{shared[0]}', which search task "
                f"'{searched[shared[0]]}' scores too; held-out docs must be disjoint: drop it here, or carve held-out "
                "docs from the search tasks with evaluation.heldout_fraction"
            )
