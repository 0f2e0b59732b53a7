"""`evomerge report`: one self-contained HTML page (plus PNGs beside it) that shows how a run went.

The page is built from the run directory alone (spec.yaml and journal.jsonl), so it works on a
finished run, on one still in progress, and on a copy taken to another machine. The figures that
reduce the journal to numbers (best so far, speed of discovery, the Pareto set, the per-layer gene
grids) are pure functions here; drawing lives in `evomerge.rundir.plots`, and the Pareto set comes from
`evomerge.rundir.results.pareto_trials`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from jinja2 import Environment, PackageLoader

from evomerge.rundir import plots
from evomerge.rundir.events import RESULT_EVENTS, EventName, TrialResult
from evomerge.rundir.genes import EMBED, HEAD, GeneRow, rows_from_names
from evomerge.rundir.layout import RunDir
from evomerge.rundir.results import leaderboard, load_trials, pareto_trials, result_se, standard_error, status
from evomerge.rundir.trials import Trial

TOP_K = 4  # trials drawn in the gene heatmap: the best and its runners-up
REACH_FRACTION = 0.95
SPECIAL_GROUPS = (EMBED, HEAD)


@dataclass(frozen=True)
class Evaluation:
    """One finished evaluation, numbered in the order the journal recorded it (1-based)."""

    number: int
    trial: int
    kind: str
    label: str
    score: float | None  # None when the evaluation failed
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
                objectives=None if failed or result.objectives is None else tuple(map(float, result.objectives)),
                reason=result.reason if failed else None,
            )
        )
    return history


def best_so_far(scores) -> np.ndarray:
    """Running maximum that skips failures (NaN); NaN until the first success."""
    return np.fmax.accumulate(np.asarray(scores, dtype=float))


def reach_threshold(final_best: float, fraction: float = REACH_FRACTION) -> float:
    """`fraction` of the final best, measured as a distance below it so that it also means
    "within 5 %" for a best at or below zero (0.95 x -2 would lie above -2 and never be reached)."""
    return final_best - (1.0 - fraction) * abs(final_best)


def evals_to_reach(scores, fraction: float = REACH_FRACTION) -> int | None:
    """How many evaluations (failures counted, None = failed) until the best so far first came
    within `fraction` of the final best; None when nothing succeeded."""
    running = best_so_far([math.nan if s is None else s for s in scores])
    if running.size == 0 or np.isnan(running[-1]):
        return None
    reached = np.flatnonzero(running >= reach_threshold(running[-1], fraction))
    return int(reached[0]) + 1


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
    for event in events:
        if event["event"] == EventName.RUN_STARTED and event.get("genes"):
            return [GeneRow.from_json(row) for row in event["genes"]]
    return None


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
    """Write report.html and its PNGs into out_dir (default run_dir/report); returns the HTML path."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else RunDir(run_dir).report
    events, trials = load_trials(run_dir)
    spec = _read_spec(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = evaluation_history(events, trials)
    summary = _summary(run_dir, spec, history)
    context = {
        "run_name": spec.get("name") or run_dir.name,
        "summary": summary,
        "table": _table_rows(trials),
        "failures": [e for e in history if e.score is None],
        "figures": _draw_figures(out_dir, spec, trials, history, summary["reach"], journaled_gene_table(events)),
    }
    html_path = out_dir / "report.html"
    html_path.write_text(_template().render(**context), encoding="utf-8")
    return html_path


def _read_spec(run_dir: Path) -> dict:
    # The raw mapping rather than the Spec model: a report should still open for a run whose spec
    # an older or newer evomerge would not validate.
    path = RunDir(run_dir).spec
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    return data if isinstance(data, dict) else {}


def _summary(run_dir: Path, spec: dict, history: list[Evaluation]) -> dict:
    figures = status(run_dir)
    searched = [e.score for e in history if e.kind == "optimizer"]
    evolved = [s for s in searched if s is not None]
    budget = (spec.get("budget") or {}).get("max_evals")
    return {
        "method": (spec.get("merge") or {}).get("method", "?"),
        "optimizer": (spec.get("optimizer") or {}).get("name", "?"),
        "evals": len(history),
        "budget": budget,
        "failed": figures["failed"],
        "in_flight": figures["in_flight"],
        "best_score": figures["best_score"],
        "best_label": figures["best_label"],
        "best_evolved": max(evolved, default=None),
        "evals_per_min": figures["evals_per_min"],
        "reach": evals_to_reach(searched),
        "searched": len(searched),
        "finished": figures["finished"],
        "pareto": len(figures["pareto_front"]) if figures.get("pareto_front") else None,
    }


def _table_rows(trials: dict[int, Trial]) -> list[dict]:
    """results.leaderboard, plus the best evolved trial when none of them was re-scored held-out."""
    rows = leaderboard(trials)
    if not any(row["kind"] == "optimizer" for row in rows):
        evolved = [t for t in trials.values() if t.kind == "optimizer" and t.status == EventName.COMPLETED]
        if evolved:
            best = max(evolved, key=lambda t: t.score)
            rows.append(
                {
                    "trial": best.trial_id,
                    "label": best.label,
                    "kind": "optimizer",
                    "search": best.score,
                    "search_se": result_se(best.result),
                    "heldout": None,
                    "heldout_se": None,
                }
            )
    baseline_scores = [
        r["heldout"] if r["heldout"] is not None else r["search"] for r in rows if r["kind"] == "baseline"
    ]
    reference = max(baseline_scores, default=None)
    for row in rows:
        score = row["heldout"] if row["heldout"] is not None else row["search"]
        row["vs_baseline"] = None if reference is None else score - reference
    return rows


def _draw_figures(
    out_dir: Path,
    spec: dict,
    trials: dict[int, Trial],
    history: list[Evaluation],
    reach: int | None,
    gene_table: list[GeneRow] | None,
) -> list[dict]:
    """Draw every figure the run has data for; returns [{file, title, caption}] in page order."""
    figures = []
    if history:
        numbers = [e.number for e in history if e.kind == "optimizer"]
        reach_at = numbers[reach - 1] if reach else None
        plots.score_over_evaluations(history, (reach, reach_at) if reach else None, out_dir / "scores.png")
        figures.append(
            {
                "file": "scores.png",
                "title": "Score over evaluations",
                "caption": "Each dot is one evaluation in the order it finished; the line is the best evolved merge so far.",
            }
        )
    task_panels = _task_panels(trials)
    if task_panels:
        plots.task_bars(task_panels, out_dir / "tasks.png")
        figures.append(
            {
                "file": "tasks.png",
                "title": "Per-task metrics",
                "caption": "The best evolved merge (on held-out tasks: the best re-scored one) against every baseline, per task, with ±1 standard error.",
            }
        )
    ranked = _top_evolved(trials, TOP_K)
    if ranked:
        models = [Path(p).name for p in (spec.get("models") or {}).get("experts", [])]
        grids = [(f"{t.label}: {t.score:.4f}", gene_grids(t.params, models, gene_table)) for t in ranked]
        drawn = plots.gene_heatmaps(grids, _param_ranges(trials, gene_table), out_dir / "genes.png")
        figures.append(
            {
                "file": "genes.png",
                "title": "Merge recipe per layer group",
                "caption": f"Decoded genes of the top {drawn} evolved merges (best on the left); colour scales span each parameter's range over the whole search.",
            }
        )
    pareto = _pareto_data(spec, trials, history)
    if pareto:
        plots.pareto_front(*pareto, out_dir / "pareto.png")
        figures.append(
            {
                "file": "pareto.png",
                "title": "Pareto front",
                "caption": "Every objective is maximized; the highlighted evaluations are the ones no other evaluation beats on all objectives at once.",
            }
        )
    return figures


def _task_panels(trials: dict[int, Trial]) -> list[dict]:
    """Bar groups for the search tasks and, when re-scored, the held-out tasks."""
    done = [t for t in trials.values() if t.status == EventName.COMPLETED]
    baselines = [t for t in done if t.kind == "baseline"]
    evolved = sorted((t for t in done if t.kind == "optimizer"), key=lambda t: -t.score)
    panels = []
    rescored = sorted((t for t in evolved if t.heldout_score is not None), key=lambda t: -t.heldout_score)
    for title, result_of, pool in (
        ("search tasks", lambda t: t.result, evolved[:1]),
        ("held-out tasks", lambda t: t.heldout, rescored[:1]),
    ):
        entries = [_bar_entry(t, result_of(t)) for t in baselines + pool if result_of(t) and result_of(t).metrics]
        if entries:
            panels.append({"title": title, "entries": entries})
    return panels


def _bar_entry(trial: Trial, result: TrialResult) -> dict:
    metrics, n_docs = result.metrics or {}, result.n_docs or {}
    errors = {task: standard_error({task: value}, n_docs) for task, value in metrics.items()}
    label = f"{trial.label} (best evolved)" if trial.kind == "optimizer" else trial.label
    return {"label": label, "kind": trial.kind, "values": metrics, "errors": errors}


def _top_evolved(trials: dict[int, Trial], k: int) -> list[Trial]:
    evolved = [t for t in trials.values() if t.kind == "optimizer" and t.status == EventName.COMPLETED and t.params]
    return sorted(evolved, key=lambda t: -t.score)[:k]


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
    return environment.get_template("report.html.j2")
