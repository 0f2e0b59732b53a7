"""Rehearse every task's evaluation on the driver: build its docs and render its prompts, no model.

A worker builds the same lm-eval Task objects when it starts, so a task that cannot be built (a
Jinja error, an empty or malformed JSONL, a field the prompt uses that the data lacks, a
`!function` naming a missing module, `data_files` naming a folder) kills the worker, and every
replacement dies the same way. `rehearse_eval_set` builds each task once here, checks its data files
line by line, renders the first prompt the workers will score, and turns what goes wrong into one
`UserError` line naming the task, the file and the fix. It reads task YAMLs, their `!function` code
and their data; it needs no model and no weight.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evomerge.errors import UserError
from evomerge.evaluation.config import EvalSet, FidelitySpec
from evomerge.evaluation.evaluate import doc_subset
from evomerge.evaluation.fidelity import raceable_metric
from evomerge.evaluation.hub_data import dataset_error
from evomerge.evaluation.tasks import ResolvedLeaf, ResolvedTasks, build_configs, leaf_configs, quiet_lm_eval

# The config keys lm-eval renders as Jinja templates against each doc.
TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice", "description", "gen_prefix")
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
TEMPLATE_FIX = "fix doc_to_text, doc_to_target and doc_to_choice in that YAML"


@dataclass(frozen=True)
class TaskUnderTest:
    """One leaf task of an eval set, the spec entry and field that name it (for the error line), and the set."""

    task: ResolvedLeaf
    field: str
    eval_set: EvalSet
    entry: str  # the spec's name for it: the task itself, or its group or tag

    @property
    def fidelity(self) -> FidelitySpec | None:
        """A raced search set's settings: its slices and metrics are checked too."""
        return self.eval_set.fidelity

    def subset(self, n_docs: int, share: tuple[float, float] | None = None) -> list[int]:
        eval_set = self.eval_set if share is None else self.eval_set.model_copy(update={"share": share})
        return doc_subset(n_docs, eval_set, self.entry, self.task.name)

    @property
    def named(self) -> str:
        """'task', or 'task' (of 'group') for a leaf of a group or tag."""
        return f"'{self.task.name}'" + ("" if self.entry == self.task.name else f" (of '{self.entry}')")

    def refuse(self, problem: str, fix: str) -> UserError:
        return UserError(f"{self.field}: task {self.named} ({self.task.yaml_path}): {problem}; {fix}")


def rehearse_eval_set(eval_set: EvalSet, resolved: ResolvedTasks) -> int:
    """Build and render every leaf task of `eval_set` as a worker would; `resolved` is its resolve_tasks.

    Returns the documents one candidate scored whole takes over all its tasks.
    """
    total = 0
    for position, entry in enumerate(resolved.tasks):
        field = eval_set.task_field(position)
        tests = [TaskUnderTest(leaf, field, eval_set, entry.name) for leaf in entry.leaves]
        for under_test in tests:
            check_data_files(under_test)
        with _silenced():
            try:
                configs = leaf_configs(replace(resolved, tasks=(entry,)))
            except Exception as error:  # noqa: BLE001 - a group YAML whose code cannot load
                raise _build_error(tests[0], error) from None
            for under_test in tests:
                total += rehearse_task(under_test, configs[under_test.task.name])
    return total


def check_data_files(under_test: TaskUnderTest) -> None:
    """Every local data file exists as a file, holds documents, and (JSON Lines) parses line by line."""
    for pattern in _local_data_paths(under_test.task):
        for name in sorted(glob.glob(pattern)) or [pattern]:
            path = Path(name)
            if path.is_dir():
                raise under_test.refuse(
                    f"dataset_kwargs.data_files '{path}' is a folder, not a file",
                    f"name the file itself (e.g. {path / 'test.jsonl'}) or a pattern ({path / '*.jsonl'})",
                )
            if path.is_file():
                _check_documents(under_test, path)


def _check_documents(under_test: TaskUnderTest, path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise under_test.refuse(f"its data file {path} is empty", "fill it with one JSON object per line")
    if path.suffix not in JSON_LINES_SUFFIXES:
        return
    documents: list[tuple[int, dict]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except json.JSONDecodeError as error:
            raise under_test.refuse(
                f"line {number} of {path} is not valid JSON ({error.msg}: column {error.colno})",
                "fix that line (each line must be one JSON object)",
            ) from None
        if not isinstance(document, dict):
            raise under_test.refuse(
                f"line {number} of {path} is a JSON {type(document).__name__}, not an object",
                'write each document as one JSON object per line, e.g. {"prompt": ..., "target": ...}',
            )
        documents.append((number, document))
    _check_fields_present(under_test, path, documents)


def _check_fields_present(under_test: TaskUnderTest, path: Path, documents: list[tuple[int, dict]]) -> None:
    """A field the templates use that some lines have and one lacks (datasets would render it as None)."""
    used = _template_variables(under_test.task) & set().union(*(document.keys() for _, document in documents))
    for number, document in documents:
        missing = sorted(used - document.keys())
        if missing:
            raise under_test.refuse(
                f"line {number} of {path} has no '{missing[0]}', which its templates use (other lines have it)",
                "add the field to that line",
            )


def rehearse_task(under_test: TaskUnderTest, config: dict[str, Any]) -> int:
    """Build the task with lm-eval's own loader from `config` and render the first prompt a worker
    will score; returns how many of its documents a candidate scores."""
    name = under_test.task.name
    try:
        task = build_configs({name: config})[name]
        docs = task.eval_docs
    except Exception as error:  # noqa: BLE001 - every build failure becomes one line
        raise _build_error(under_test, error) from None
    if len(docs) == 0:
        raise under_test.refuse(
            "its evaluation split has no documents", "point dataset_kwargs.data_files at a file with documents"
        )
    if under_test.fidelity is not None:
        check_raceable(under_test, task, len(docs))
    # One prompt, not every doc: lm-eval compiles each template anew per render (about 1 ms), and
    # a field missing from some lines only is caught by check_data_files without rendering.
    subset = under_test.subset(len(docs))
    if not subset:
        raise under_test.refuse(
            f"the {'held-out' if under_test.eval_set.carve and under_test.eval_set.carve.heldout else 'search'} "
            f"part of its {len(docs)} documents is empty",
            "set evaluation.heldout_fraction so that each part keeps at least one document, or score a bigger split",
        )
    index = subset[0]
    doc = docs[index]
    try:
        context = task.fewshot_context(
            doc, num_fewshot=task.config.num_fewshot or 0, gen_prefix=task.doc_to_prefix(doc)
        )
        task.construct_requests(doc=doc, ctx=context, metadata=(name, index, task.config.repeats))
    except Exception as error:  # noqa: BLE001 - every render failure becomes one line
        raise _render_error(under_test, error, index, doc) from None
    return len(subset)


def check_raceable(under_test: TaskUnderTest, task, n_docs: int) -> None:
    """A raced task needs a mean metric (slices add up) and at least one doc in every rung's slice."""
    reason = raceable_metric(task, under_test.task.result_key.partition(",")[0])
    if reason:
        raise under_test.refuse(
            reason, "race only tasks scored by a mean (acc, exact_match) or drop evaluation.fidelity"
        )
    for start, end in under_test.fidelity.slice_shares() if under_test.fidelity else []:
        if not under_test.subset(n_docs, (start, end)):
            raise UserError(
                f"evaluation.fidelity.rungs: the share {start:g}-{end:g} of task '{under_test.task.name}' "
                f"holds no document (it scores {len(under_test.subset(n_docs))}); widen the rungs or score more docs"
            )


def _build_error(under_test: TaskUnderTest, error: Exception) -> UserError:
    import jinja2

    unreachable = dataset_error(error, under_test.task.hub_dataset, under_test.named, under_test.field)
    if unreachable is not None:
        return unreachable
    detail = _first_line(error)
    if isinstance(error, jinja2.TemplateSyntaxError):
        key = _broken_template_key(under_test.task)
        where = f"{key} is not a valid Jinja template" if key else "a template is not valid Jinja"
        return under_test.refuse(f"{where} ({detail})", f"fix {key} in that YAML" if key else TEMPLATE_FIX)
    if isinstance(error, jinja2.UndefinedError):
        data = ", ".join(str(path) for path in _local_data_paths(under_test.task)) or "its dataset"
        return under_test.refuse(
            f"a template uses a field the data lacks ({detail}) in {data}",
            f"rename the field in the data or {TEMPLATE_FIX}",
        )
    if isinstance(error, ImportError | AttributeError) and "function" in detail:
        return under_test.refuse(
            f"its !function cannot be loaded ({_first_line(error, with_cause=False)})",
            "put the module next to the YAML (utils.py for !function utils.NAME) and define the function there",
        )
    if isinstance(error, StopIteration | IndexError):
        return under_test.refuse(
            "its data has no documents", "point dataset_kwargs.data_files at a file with documents"
        )
    return under_test.refuse(
        f"lm-eval cannot build it ({type(error).__name__}: {detail})", "fix that YAML or the data it reads"
    )


def _render_error(under_test: TaskUnderTest, error: Exception, index: int, doc: Any) -> UserError:
    import jinja2

    detail = _first_line(error)
    fields = ", ".join(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
    if isinstance(error, jinja2.UndefinedError):
        return under_test.refuse(
            f"doc {index} has no field the prompt uses ({detail}; its fields: {fields})",
            f"add the field to the data or {TEMPLATE_FIX}",
        )
    return under_test.refuse(
        f"rendering the prompt of doc {index} fails ({type(error).__name__}: {detail})",
        f"{TEMPLATE_FIX}, or the data of that doc",
    )


def _templates(task: ResolvedLeaf) -> dict[str, str]:
    """The task's Jinja templates by config key, read from its YAML with includes followed."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(task.yaml_path, resolve_func=False)
    except Exception:  # noqa: BLE001 - building the task reports a broken YAML in its own words
        return {}
    return {key: config[key] for key in TEMPLATE_KEYS if isinstance(config.get(key), str)}


def _broken_template_key(task: ResolvedLeaf) -> str | None:
    """The first template of the task that Jinja cannot parse."""
    import jinja2

    for key, template in _templates(task).items():
        try:
            jinja2.Environment().parse(template)
        except jinja2.TemplateSyntaxError:
            return key
    return None


def _template_variables(task: ResolvedLeaf) -> set[str]:
    import jinja2
    from jinja2 import meta

    names: set[str] = set()
    for template in _templates(task).values():
        with contextlib.suppress(jinja2.TemplateSyntaxError):  # reported when the task is built
            names |= meta.find_undeclared_variables(jinja2.Environment().parse(template))
    return names


def _local_data_paths(task: ResolvedLeaf) -> list[str]:
    """The local paths (or patterns) in the task's dataset_kwargs.data_files, already absolute."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif value is not None and "://" not in str(value):
            found.append(str(value))

    walk((task.overrides.get("dataset_kwargs") or {}).get("data_files"))
    return found


def _first_line(error: BaseException, with_cause: bool = True) -> str:
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    cause = error.__cause__
    return f"{text}: {_first_line(cause)}" if with_cause and cause is not None else text


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """No lm-eval or datasets chatter while rehearsing: the user sees our one line or nothing.

    Their progress bars and warnings go to sys.stderr (swallowed here); their loggers carry handlers
    bound to the real stderr, so those are lowered to silence instead.
    """
    loggers = [logging.getLogger(name) for name in ("datasets", "fsspec", "filelock")]
    levels = [logger.level for logger in loggers]
    try:
        with quiet_lm_eval(logging.CRITICAL + 1), contextlib.redirect_stderr(io.StringIO()):
            for logger in loggers:
                logger.setLevel(logging.CRITICAL + 1)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
