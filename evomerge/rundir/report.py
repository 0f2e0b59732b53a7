"""`evomerge report`: one self-contained HTML page (plus PNGs beside it) that shows how a run went.

The page is built from the run directory alone (spec.yaml and journal.jsonl), so it works on a
finished run, on one still in progress, and on a copy taken to another machine. Its headline is
the verdict (`evomerge.rundir.verdict`): the trial `export` gives, with its YAML and the margins in
SE, the same numbers `search` prints. The figures that reduce the journal to numbers (the per-layer
gene grids, the task bars) are pure functions here; drawing lives in `evomerge.rundir.plots`, the
run's context in `evomerge.rundir.run_context`, and the Pareto set comes from
`evomerge.rundir.results.pareto_trials`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader

from evomerge.rundir import plots
from evomerge.rundir.events import RESULT_EVENTS, EventName, TrialResult
from evomerge.rundir.genes import EMBED, HEAD, GeneRow, rows_from_names
from evomerge.rundir.layout import RunDir
from evomerge.rundir.ledger import Ledger
from evomerge.rundir.results import export_yaml, exported_names, pareto_trials, standard_error, status_figures
from evomerge.rundir.run_context import run_context
from evomerge.rundir.trials import Trial
from evomerge.rundir.verdict import Margin, RowKind, Verdict, VerdictRow, row_kind, verdict_of

HTML_NAME = "report.html"
TOP_K = 4  # trials drawn in the gene heatmap: the winner and its runners-up
SPECIAL_GROUPS = (EMBED, HEAD)
FAMILY_ORDER = (RowKind.BASE, RowKind.PARENT, RowKind.DEFAULT_MERGE, RowKind.EVOLVED)


@dataclass(frozen=True)
class Evaluation:
    """One finished evaluation, numbered in the order the journal recorded it (1-based)."""

    number: int
    trial: int
    kind: str
    label: str
    score: float | None  # None when the evaluation failed
    family: RowKind
    objectives: tuple[float, ...] | None = None
    reason: str | None = None


def evaluation_history(events: list[dict], trials: dict[int, Trial]) -> list[Evaluation]:
    history = []
    for event in events:
        if event["event"] not in RESULT_EVENTS or event["trial"] not in trials:
            continue
        trial = trials[event["trial"]]
        result = TrialResult.from_event(event)
        failed = event["event"] == EventName.FAILED or result.score is None
        history.append(
            Evaluation(
                number=len(history) + 1,
                trial=trial.trial_id,
                kind=trial.kind,
                label=trial.label,
                score=None if failed else float(result.score),
                family=row_kind(trial),
                objectives=None if failed or result.objectives is None else tuple(map(float, result.objectives)),
                reason=result.reason if failed else None,
            )
        )
    return history


@dataclass(frozen=True)
class GeneGrid:
    """One parameter of one trial: rows are models (x attn/mlp part), columns layer groups then
    embed/head. An embed/head gene has no part, so it fills all its model's part rows as one block."""

    param: str
    rows: list[str]
    columns: list[str]  # labels: the layer range ("L0-7"), or "g3" for runs journaled without one
    values: np.ndarray
    labels: list[tuple[float, int, float]]  # (row position, column, value), one per gene, centred on its block
    model_starts: list[int]  # first row of every model but the first, where a separator goes
    layer_columns: int  # how many columns are layer groups (embed/head follow)


def journaled_gene_table(events: list[dict]) -> list[GeneRow] | None:
    """The gene table the search journaled on run_started; None for runs journaled before it existed."""
    return Ledger(RunDir(Path()), events, {}).gene_table


def gene_grids(params: dict[str, float], model_names: list[str], table: list[GeneRow] | None = None) -> list[GeneGrid]:
    """The heatmap grids of one trial's genes; `table` is the run's gene table (else read from names)."""
    rows = {row.name: row for row in table or rows_from_names(params)}
    genes: dict[str, list[tuple[GeneRow, float]]] = {}
    for name, value in params.items():
        row = rows.get(name) or rows_from_names([name])[0]
        genes.setdefault(row.param, []).append((row, float(value)))
    return [_gene_grid(param, values, model_names) for param, values in genes.items()]


def _gene_grid(param: str, genes: list[tuple[GeneRow, float]], model_names: list[str]) -> GeneGrid:
    label_of = {row.group: row.column_label for row, _ in genes}
    layer_groups = sorted(group for group in label_of if isinstance(group, int))
    keys = layer_groups + [group for group in SPECIAL_GROUPS if group in label_of]
    rows, blocks, labels, starts = [], [], [], []
    for model in dict.fromkeys(row.model for row, _ in genes):
        parts = [p for p in dict.fromkeys(row.part for row, _ in genes if row.model == model) if p is not None] or [
            None
        ]
        if rows:
            starts.append(len(rows))
        block = np.full((len(parts), len(keys)), np.nan)
        for row, value in genes:
            if row.model != model:
                continue
            span = list(range(len(parts))) if row.part is None else [parts.index(row.part)]
            block[span, keys.index(row.group)] = value
            labels.append((len(rows) + (span[0] + span[-1]) / 2, keys.index(row.group), value))
        rows += [_row_label(model, part, model_names) for part in parts]
        blocks.append(block)
    columns = [label_of[key] for key in keys]
    return GeneGrid(param, rows, columns, np.vstack(blocks), labels, starts, len(layer_groups))


def _row_label(model: int | None, part: str | None, model_names: list[str]) -> str:
    name = "all" if model is None else model_names[model] if model < len(model_names) else f"m{model}"
    return f"{name} · {part}" if part else name


def objective_names(spec: dict, count: int) -> list[str]:
    """Names of a multi-objective run's `evaluation.objectives`, numbered where the spec has none."""
    declared = (spec.get("evaluation") or {}).get("objectives") or []
    names = [d.get("name") if isinstance(d, dict) else None for d in declared]
    return [names[i] if i < len(names) and names[i] else f"objective {i + 1}" for i in range(count)]


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write report.html and its PNGs into out_dir (default run_dir/report); returns the HTML path.

    Everything is drawn in a hidden folder beside out_dir and moved in once complete, report.html
    last: an interrupted report leaves out_dir as it was, never PNGs without their page.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else RunDir(run_dir).report
    ledger = Ledger.read(run_dir)
    staging = out_dir.parent / f".{out_dir.name}.report-staging-{os.getpid()}"
    try:
        staging.mkdir(parents=True)
        _write_report_files(run_dir, staging, ledger)
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(staging.iterdir(), key=lambda path: path.name == HTML_NAME):
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / HTML_NAME


def _write_report_files(run_dir: Path, out_dir: Path, ledger: Ledger) -> None:
    spec, trials = ledger.frozen_spec, ledger.trials
    history = evaluation_history(ledger.events, trials)
    verdict = verdict_of(ledger, str(run_dir))
    gene_table = ledger.gene_table
    context = {
        "run_name": spec.get("name") or run_dir.name,
        "summary": _summary(ledger, verdict),
        "headline": _headline(verdict, ledger, exported_names(ledger)),
        "context_rows": run_context(ledger),
        "table": _table_rows(verdict),
        "basis": verdict.basis,
        "failures": [e for e in history if e.score is None],
        "figures": _draw_figures(out_dir, spec, trials, history, verdict, gene_table),
    }
    (out_dir / HTML_NAME).write_text(_template().render(**context), encoding="utf-8")


def _summary(ledger: Ledger, verdict: Verdict) -> dict:
    figures = status_figures(ledger)
    spec = ledger.frozen_spec
    method = (spec.get("merge") or {}).get("method", "?")
    return {
        "method": " or ".join(method) if isinstance(method, list) else method,  # a list: the method gene's choices
        "optimizer": (spec.get("optimizer") or {}).get("name", "?"),
        "evals": figures["completed"] + figures["failed"],
        "baselines": sum(t.kind == "baseline" and t.status != EventName.ASKED for t in ledger.trials.values()),
        "searched": verdict.searched,
        "budget": ledger.budget.get("max_evals"),
        "failed": figures["failed"],
        "in_flight": figures["in_flight"],
        "best_score": figures["best_score"],
        "best_label": figures["best_label"],
        "evals_per_min": figures["evals_per_min"],
        "reach": verdict.reach,
        "minutes": None if (seconds := ledger.wall_seconds) is None else seconds / 60,
        "finished": figures["finished"],
        "pareto": len(figures["pareto_front"]) if figures.get("pareto_front") else None,
    }


def _headline(verdict: Verdict, ledger: Ledger, names: dict[str, str]) -> dict | None:
    """The trial `export` gives, its YAML and command, the margins in SE, ties and the advice."""
    winner = verdict.winner
    if winner is None:
        return None
    margins = [
        (f"best {kind}", margin)
        for kind, margin in (("parent", verdict.over_parent), ("default merge", verdict.over_default_merge))
        if margin is not None
    ]
    return {
        "row": winner,
        "heldout": winner.heldout is not None,
        "yaml": export_yaml(ledger.trials[winner.trial], names, ledger.intermediates_of(winner.trial)),
        "command": verdict.export_command,
        "margins": [{"name": name, "margin": margin} for name, margin in margins],
        "best_evolved": verdict.best_evolved,
        "ties": verdict.ties.describe() if verdict.ties else None,
        "racing": verdict.racing.describe() if verdict.racing else None,
        "advice": verdict.advice,
        "basis": verdict.basis,
    }


def _table_rows(verdict: Verdict) -> list[dict]:
    """The verdict's rows, each with its margin over the best baseline (± SE, in SE) on the basis."""
    baselines = [row for row in verdict.rows if row.kind != RowKind.EVOLVED and row.on(verdict.basis)]
    reference = baselines[0] if baselines else None  # rows come best first
    rows = []
    for row in verdict.rows:
        margin = None
        if reference is not None and row is not reference and row.on(verdict.basis) is not None:
            ours, theirs = row.on(verdict.basis), reference.on(verdict.basis)
            margin = Margin(reference, ours.score - theirs.score, float(np.hypot(ours.se, theirs.se)))
        rows.append({"row": row, "margin": margin, "reference": row is reference})
    return rows


CAPTIONS = {
    "scores.png": (
        "Search score over evaluations",
        "Each dot is one evaluation in the order it finished (baselines as diamonds, coloured by kind); the line is the best "
        "evolved search score so far, the dashed lines the best parent and the best default merge. The star is the held-out "
        "winner: the best search score is biased upward, so export picks on held-out data.",
    ),
    "tasks.png": (
        "Per-task metrics",
        "The held-out winner (what export gives; on search tasks, the best evolved merge if the winner is a baseline) against "
        "every baseline, per task, with ±1 standard error. Grey: the base; greens: the parents; oranges: the default merges; "
        "blue: evolved.",
    ),
    "genes.png": (
        "Merge recipe per layer group",
        "Decoded genes of {drawn} evolved merges: the held-out winner first, then the other re-scored ones by held-out score, "
        "then the best search scores. Columns are layer ranges (L0-3: decoder layers 0 to 3); colour scales span each "
        "parameter's range over the whole search.",
    ),
    "pareto.png": (
        "Pareto front",
        "Every objective is maximized; the highlighted evaluations are the ones no other evaluation beats on all objectives at once.",
    ),
}


def _draw_figures(
    out_dir: Path,
    spec: dict,
    trials: dict[int, Trial],
    history: list[Evaluation],
    verdict: Verdict,
    gene_table: list[GeneRow] | None,
) -> list[dict]:
    """Draw every figure the run has data for; returns [{file, title, caption}] in page order."""
    drawn: dict[str, dict] = {}
    winner = verdict.winner.trial if verdict.winner else None
    if history:
        # The reach counts candidates in trial order; the plot marks where the reaching one finished.
        numbers = {e.trial: e.number for e in history if e.kind == "optimizer"}
        reach = (verdict.reach, numbers[sorted(numbers)[verdict.reach - 1]]) if verdict.reach else None
        plots.score_over_evaluations(history, plots.ScoreMarks(reach, winner), out_dir / "scores.png")
        drawn["scores.png"] = {}
    task_panels = _task_panels(trials, winner)
    if task_panels:
        plots.task_bars(task_panels, out_dir / "tasks.png")
        drawn["tasks.png"] = {}
    ranked = _heatmap_trials(trials, verdict, TOP_K)
    if ranked:
        models = [Path(p).name for p in (spec.get("models") or {}).get("experts", [])]
        grids = [(title, gene_grids(t.params, models, gene_table)) for title, t in ranked]
        count = plots.gene_heatmaps(grids, _param_ranges(trials, gene_table), out_dir / "genes.png")
        drawn["genes.png"] = {"drawn": count}
    pareto = _pareto_data(spec, trials, history)
    if pareto:
        plots.pareto_front(*pareto, out_dir / "pareto.png")
        drawn["pareto.png"] = {}
    return [
        {"file": name, "title": CAPTIONS[name][0], "caption": CAPTIONS[name][1].format(**values)}
        for name, values in drawn.items()
    ]


def _task_panels(trials: dict[int, Trial], winner: int | None) -> list[dict]:
    """Bar groups for the search tasks and, when re-scored, the held-out tasks: baselines by kind,
    then the held-out winner (the best evolved merge when a baseline won or nothing was re-scored)."""
    done = [t for t in trials.values() if t.status == EventName.COMPLETED]
    baselines = sorted(
        (t for t in done if t.kind == "baseline"), key=lambda t: (FAMILY_ORDER.index(row_kind(t)), -t.trial_id)
    )
    evolved = sorted((t for t in done if t.kind == "optimizer"), key=lambda t: (-t.score, t.trial_id))
    chosen = trials[winner] if winner is not None and trials[winner].kind == "optimizer" else None
    pick = [chosen] if chosen else evolved[:1]
    rescored = [chosen] if chosen and chosen.heldout_score is not None else []
    panels = []
    for title, result_of, pool in (
        ("search tasks", lambda t: t.result, pick),
        ("held-out tasks", lambda t: t.heldout, rescored),
    ):
        entries = [
            _bar_entry(t, result_of(t), winner) for t in baselines + pool if result_of(t) and result_of(t).metrics
        ]
        if entries:
            panels.append({"title": title, "entries": entries})
    return panels


def _bar_entry(trial: Trial, result: TrialResult, winner: int | None) -> dict:
    metrics, n_docs = result.metrics or {}, result.n_docs or {}
    errors = {task: standard_error({task: value}, n_docs, subtasks=result.subtasks) for task, value in metrics.items()}
    label = trial.label
    if trial.kind == "optimizer":
        label = f"{trial.label} (held-out winner)" if trial.trial_id == winner else f"{trial.label} (best evolved)"
    return {"label": label, "family": row_kind(trial).value, "values": metrics, "errors": errors}


def _heatmap_trials(trials: dict[int, Trial], verdict: Verdict, k: int) -> list[tuple[str, Trial]]:
    """(title, trial) of the evolved merges to draw: the winner, the re-scored, then the best searched."""
    rescored = [row for row in verdict.rows if row.kind == RowKind.EVOLVED and row.heldout is not None]
    searched = sorted(
        (t for t in trials.values() if t.kind == "optimizer" and t.status == EventName.COMPLETED and t.params),
        key=lambda t: (-t.score, t.trial_id),
    )
    ranked: dict[int, str] = {}
    for row in rescored:
        ranked.setdefault(row.trial, _heatmap_title(row, trials[row.trial]))
    for trial in searched:
        ranked.setdefault(trial.trial_id, f"{trial.label}: search {trial.score:.4f}")
    return [(title, trials[i]) for i, title in list(ranked.items())[:k] if trials[i].params]


def _heatmap_title(row: VerdictRow, trial: Trial) -> str:
    score = f"held-out {row.heldout.score:.4f}" if row.heldout else ""
    method = trial.merge_config.get("merge_method")
    named = trial.label.startswith(f"trial {trial.trial_id} ({method}")  # a method gene's trials name theirs
    notes = ([method] if named else []) + (["winner, export"] if row.winner else [])
    return f"trial {row.trial}" + (f" ({', '.join(notes)})" if notes else "") + f": {score}"


def _param_ranges(trials: dict[int, Trial], gene_table: list[GeneRow] | None) -> dict[str, tuple[float, float]]:
    """Per parameter, the span of values the search tried: a shared scale for every heatmap."""
    param_of = {row.name: row.param for row in gene_table or []}
    ranges: dict[str, tuple[float, float]] = {}
    for trial in trials.values():
        for name, value in trial.params.items():
            param = param_of.get(name) or rows_from_names([name])[0].param
            low, high = ranges.get(param, (value, value))
            ranges[param] = (min(low, value), max(high, value))
    return ranges


def _pareto_data(spec: dict, trials: dict[int, Trial], history: list[Evaluation]):
    scored = [e for e in history if e.objectives]
    if not scored or len({len(e.objectives) for e in scored}) != 1 or len(scored[0].objectives) < 2:
        return None
    front = {row["trial"] for row in pareto_trials(trials)}
    points = np.array([e.objectives for e in scored])
    return points, np.array([e.trial in front for e in scored]), objective_names(spec, points.shape[1]), scored


def _template():
    environment = Environment(loader=PackageLoader("evomerge.rundir", "templates"), autoescape=True)
    environment.filters["score"] = lambda v, digits=4: "—" if v is None else f"{v:.{digits}f}"
    environment.filters["signed"] = lambda v: "—" if v is None else f"{v:+.4f}"
    environment.filters["sigmas"] = lambda v: "—" if v is None else f"{v:.1f}"
    return environment.get_template("report.html.j2")
