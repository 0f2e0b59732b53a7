"""What a run was: models, method, genome, tasks, limits, seeds, budget, workers, wall time, failures.

The report's "Run context" table, read off the run's ledger: its frozen spec (as plain data, so a
spec an older or newer evomerge would not validate still reports), its budget in force (extensions
included) and its journal. Pure functions, one row each.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from evomerge.rundir.genes import GeneRow
from evomerge.rundir.ledger import Ledger


@dataclass(frozen=True)
class ContextRow:
    label: str
    value: str


def run_context(ledger: Ledger) -> list[ContextRow]:
    spec, genes = ledger.frozen_spec, ledger.gene_table
    models, merge = _section(spec, "models"), _section(spec, "merge")
    evaluation, budget = _section(spec, "evaluation"), ledger.budget
    experts = [f"m{i} = {Path(path).name} ({path})" for i, path in enumerate(models.get("experts") or [])]
    fixed = ", ".join(f"{key}={value}" for key, value in (merge.get("fixed") or {}).items())
    search = _section(spec, "search")
    layers = search.get("space") == "layers"  # a layer path: passthrough slices, merge.method unused
    method = "passthrough (layer paths)" if layers else merge.get("method", "?")
    rows = [
        ContextRow("base model", str(models.get("base", "?"))),
        ContextRow("experts", "; ".join(experts) or "?"),
        ContextRow(
            "merge",
            f"{method}, {merge.get('dtype', 'float32')}" + (f", fixed {fixed}" if fixed and not layers else ""),
        ),
        ContextRow("genome", _layer_genome(search, genes) if layers else _genome(_section(spec, "genome"), genes)),
        ContextRow("optimizer", _optimizer(_section(spec, "optimizer"))),
        ContextRow("search tasks", _tasks(evaluation.get("tasks"))),
        ContextRow("held-out tasks", _heldout(evaluation)),
        ContextRow("limits", _limits(evaluation)),
        ContextRow("budget", _budget(budget)),
        ContextRow("workers", _workers(ledger.starts, _section(spec, "workers"))),
        ContextRow("search time", _wall_time(ledger.wall_seconds)),
        ContextRow("failures", _failures(ledger.failure_reasons)),
    ]
    return rows


def _section(spec: dict, name: str) -> dict:
    value = spec.get(name)
    return value if isinstance(value, dict) else {}


def _genome(genome: dict, genes: list[GeneRow] | None) -> str:
    params = ", ".join(genome.get("params") or []) or "the method's defaults"
    parts = [f"{len(genes)} genes" if genes else None, f"params {params}"]
    ranges = sorted({(row.group, row.column_label) for row in genes or [] if isinstance(row.group, int)})
    groups = f"{genome.get('layer_groups', '?')} layer groups"
    parts.append(groups + (f" ({', '.join(label for _, label in ranges)})" if ranges else ""))
    if genome.get("split_attn_mlp"):
        parts.append("attention and MLP apart")
    if genome.get("embeddings"):
        parts.append("embeddings and head genes")
    bounds = genome.get("bounds") or {}
    if bounds:
        parts.append("bounds " + ", ".join(f"{name} {list(span)}" for name, span in bounds.items()))
    return "; ".join(part for part in parts if part)


def _layer_genome(search: dict, genes: list[GeneRow] | None) -> str:
    slots = len({row.group for row in genes or []}) or search.get("max_steps") or "?"
    parts = [f"{len(genes)} genes" if genes else None, f"a layer path of up to {slots} slots"]
    block = search.get("block") or 1
    what = "layer per slot" if block == 1 else f"block of {block} layers per slot"
    parts.append(f"take or skip and whose {what}" + (", and a scale" if search.get("scales") else ""))
    return "; ".join(part for part in parts if part)


def _optimizer(optimizer: dict) -> str:
    extra = [f"{key} {optimizer[key]}" for key in ("popsize", "sigma0") if optimizer.get(key) is not None]
    return ", ".join([str(optimizer.get("name", "?")), f"seed {optimizer.get('seed', 0)}", *extra])


def _tasks(tasks) -> str:
    described = []
    for task in tasks or []:
        if isinstance(task, dict):
            details = [str(task.get("metric", "acc"))] + (
                [f"weight {task['weight']}"] if task.get("weight", 1) != 1 else []
            )
            described.append(f"{task.get('name', '?')} ({', '.join(details)})")
        else:
            described.append(str(task))
    return ", ".join(described)


def _heldout(evaluation: dict) -> str:
    fraction = evaluation.get("heldout_fraction")
    carved = [f"a seeded {fraction:.0%} of every search task's documents, never searched"] if fraction else []
    described = ", ".join([*carved, *filter(None, [_tasks(evaluation.get("heldout_tasks"))])])
    return described or "none (the verdict uses search scores)"


def _limits(evaluation: dict) -> str:
    limit = evaluation.get("limit")
    heldout = evaluation.get("heldout_limit")
    return "; ".join(
        [
            f"{limit} documents per search task" if limit else "every search document",
            f"{heldout} per held-out task" if heldout else "the whole held-out split",
            f"evaluation seed {evaluation.get('seed', 0)}",
            f"top {evaluation.get('top_k', 5)} evolved merges and every baseline re-scored on held-out",
        ]
    )


def _budget(budget: dict) -> str:
    parts = [f"max_evals {budget['max_evals']}" if budget.get("max_evals") else None]
    parts.append(f"time limit {budget['time_limit_min']} min" if budget.get("time_limit_min") else None)
    parts.append(f"max_docs {budget['max_docs']:,}" if budget.get("max_docs") else None)
    parts.append("baselines scored first" if budget.get("baselines", True) else "no baselines")
    return ", ".join(part for part in parts if part)


def _workers(starts: list[dict], workers: dict) -> str:
    counts = [e.get("workers") for e in starts]
    shown = ", ".join(str(c) for c in dict.fromkeys(counts) if c is not None) or "?"
    return f"{shown} ({workers.get('device', 'auto')}); {len(counts)} start{'s' if len(counts) != 1 else ''} (resumes included)"


def _wall_time(seconds: float | None) -> str:
    if seconds is None:
        return "no evaluation finished yet"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s of search (every start and resume, idle time between them left out)"


def _failures(reasons: Counter) -> str:
    if not reasons:
        return "none"
    return "; ".join(f"{count} × {reason}" for reason, count in reasons.most_common())
