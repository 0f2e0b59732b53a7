"""Read a run directory back: status figures, the leaderboard, held-out scores with standard errors,
and the export of any trial as a standard mergekit YAML.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from evomerge.errors import UserError
from evomerge.rundir.journal import read_events
from evomerge.rundir.pareto import pareto_front
from evomerge.rundir.trials import Trial, replay


def load_trials(run_dir: Path) -> tuple[list[dict], dict[int, Trial]]:
    run_dir = Path(run_dir)
    if not (run_dir / "journal.jsonl").exists():
        raise UserError(f"{run_dir}: no journal.jsonl here; give a run directory such as runs/NAME")
    events = read_events(run_dir / "journal.jsonl")
    return events, replay(events)


def standard_error(metrics: dict, n_docs: dict, weights: dict | None = None) -> float:
    """SE of a weighted mean of per-task accuracies, each a mean of n independent 0/1 outcomes."""
    weights = weights or {name: 1.0 for name in metrics}
    total = sum(weights.get(name, 1.0) for name in metrics)
    variance = 0.0
    for name, value in metrics.items():
        n = max(1, n_docs.get(name, 1))
        share = weights.get(name, 1.0) / total
        variance += share**2 * max(value * (1 - value), 0.0) / n
    return math.sqrt(variance)


def status(run_dir: Path) -> dict:
    events, trials = load_trials(run_dir)
    completed = [t for t in trials.values() if t.status == "completed"]
    failed = [t for t in trials.values() if t.status == "failed"]
    best = max(completed, key=lambda t: t.result["score"], default=None)
    finished_times = [e["time"] for e in events if e["event"] in ("completed", "failed")]
    started = [e["time"] for e in events if e["event"] == "run_started"]
    minutes = (max(finished_times) - min(started)) / 60 if finished_times and started else 0.0
    heldout = heldout_winner(trials)
    return {
        "run": str(run_dir),
        "asked": len(trials),
        "completed": len(completed),
        "failed": len(failed),
        "in_flight": sum(t.status == "asked" for t in trials.values()),
        "best_score": best.result["score"] if best else None,
        "best_trial": best.trial_id if best else None,
        "best_label": best.label if best else None,
        "evals_per_min": round((len(completed) + len(failed)) / minutes, 2) if minutes > 0 else None,
        "heldout_winner": heldout.trial_id if heldout else None,
        "pareto_front": pareto_trials(trials),
        "failures": [{"trial": t.trial_id, "reason": t.result.get("reason")} for t in failed],
        "finished": any(e["event"] == "run_finished" for e in events),
    }


def pareto_trials(trials: dict[int, Trial]) -> list[dict]:
    """The non-dominated completed trials of a multi-objective run (empty otherwise)."""
    points = {
        t.trial_id: t.result["objectives"]
        for t in trials.values()
        if t.status == "completed" and t.result.get("objectives")
    }
    return [{"trial": i, "label": trials[i].label, "objectives": points[i]} for i in pareto_front(points)]


def heldout_winner(trials: dict[int, Trial]) -> Trial | None:
    scored = [t for t in trials.values() if t.heldout and t.heldout.get("ok")]
    return max(scored, key=lambda t: t.heldout["score"], default=None)


def leaderboard(trials: dict[int, Trial]) -> list[dict]:
    """Baselines and evolved trials with search and held-out scores (± SE), best held-out first."""
    rows = []
    for trial in trials.values():
        if trial.status != "completed" or (trial.kind == "optimizer" and not trial.heldout):
            continue
        result, held = trial.result, trial.heldout or {}
        rows.append(
            {
                "trial": trial.trial_id,
                "label": trial.label,
                "kind": trial.kind,
                "search": result["score"],
                "search_se": standard_error(result.get("metrics", {}), result.get("n_docs", {})),
                "heldout": held.get("score"),
                "heldout_se": standard_error(held.get("metrics", {}), held.get("n_docs", {})) if held else None,
            }
        )
    return sorted(rows, key=lambda r: -(r["heldout"] if r["heldout"] is not None else r["search"]))


def describe(trial: Trial) -> str:
    """'trial 12', 'trial 3 (seeded: parent:x)' or 'parent:x (trial -2)': the label, with the id when it lacks it."""
    return (
        trial.label if trial.label.startswith(f"trial {trial.trial_id}") else f"{trial.label} (trial {trial.trial_id})"
    )


def export_trial(run_dir: Path, trial_id: int | None = None) -> tuple[Trial, str]:
    """The mergekit YAML of a trial: the held-out winner, else the best search score, by default."""
    _, trials = load_trials(run_dir)
    if trial_id is None:
        chosen = heldout_winner(trials)
        if chosen is None:
            completed = [t for t in trials.values() if t.status == "completed"]
            if not completed:
                raise UserError(
                    f"{run_dir}: no completed trial to export yet; wait for the search or check 'evomerge status'"
                )
            chosen = max(completed, key=lambda t: t.result["score"])
    else:
        chosen = trials.get(trial_id)
        if chosen is None or chosen.status != "completed":
            raise UserError(
                f"--trial: trial {trial_id} is not a completed trial of {run_dir}; see 'evomerge status {run_dir}'"
            )
    header = f"# evomerge export: {describe(chosen)}, search score {chosen.result['score']:.6f}\n"
    return chosen, header + yaml.safe_dump(chosen.merge_config, sort_keys=False, default_flow_style=None)
