"""Read a run directory back: status figures, the leaderboard, held-out scores with standard errors,
and the export of any trial as a standard mergekit YAML.

An export names a local model by its path and a hub model as `org/name@commit`, the commit the run
pinned at its first start (never a cache folder), so the YAML merges the same files anywhere.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from evomerge.errors import UserError
from evomerge.evaluation.scores import standard_error
from evomerge.hub import pinned_name
from evomerge.merge.config import rename_models
from evomerge.rundir.events import EventName, TrialResult
from evomerge.rundir.layout import RunDir
from evomerge.rundir.ledger import Ledger
from evomerge.rundir.pareto import pareto_front
from evomerge.rundir.trials import Tally, Trial


def load_trials(run_dir: Path | RunDir) -> tuple[list[dict], dict[int, Trial]]:
    """(events, trials) of a run, as a command sees them (`Ledger.read`)."""
    ledger = Ledger.read(run_dir)
    return ledger.events, ledger.trials


def result_se(result: TrialResult | None) -> float | None:
    return standard_error(result.metrics, result.n_docs, subtasks=result.subtasks) if result else None


def status(run_dir: Path | RunDir) -> dict:
    return status_figures(Ledger.read(run_dir))


def docs_scored(trials: dict[int, Trial]) -> int:
    """The search documents a run scored, raced or not (`Trial.docs_scored`, summed)."""
    return Tally.of(trials).docs_scored


def status_of(run_dir: Path | RunDir, events: list[dict], trials: dict[int, Trial]) -> dict:
    """The figures `evomerge status` shows, from a journal already read."""
    return status_figures(Ledger.of(run_dir, events, trials))


def status_figures(ledger: Ledger) -> dict:
    """The figures `evomerge status` shows: the ledger's, nothing counted again."""
    failed = ledger.with_status(EventName.FAILED)
    best, heldout = ledger.best, heldout_winner(ledger.trials)
    return {
        "run": str(ledger.run),
        "asked": len(ledger.trials),
        "completed": len(ledger.with_status(EventName.COMPLETED)),
        "failed": len(failed),
        "in_flight": len(ledger.with_status(EventName.ASKED)),
        "docs_scored": ledger.docs_scored,
        "budget": ledger.budget,
        "best_score": best.score if best else None,
        "best_trial": best.trial_id if best else None,
        "best_label": best.label if best else None,
        "evals_per_min": ledger.search_rate,
        "heldout_winner": heldout.trial_id if heldout else None,
        "heldout_unfinished": ledger.heldout_unfinished,
        "pareto_front": pareto_trials(ledger.trials),
        "failures": [{"trial": t.trial_id, "reason": t.result.reason if t.result else None} for t in failed],
        "finished": ledger.finished,
        "phase": ledger.phase_status,
    }


def search_rate(events: list[dict], trials: dict[int, Trial]) -> float | None:
    """Evolved-candidate evaluations per minute of search time (`Ledger.search_rate`)."""
    return Ledger(RunDir(Path()), events, trials).search_rate


def pareto_trials(trials: dict[int, Trial]) -> list[dict]:
    """The non-dominated completed trials of a multi-objective run (empty otherwise)."""
    points = {
        t.trial_id: t.result.objectives
        for t in trials.values()
        if t.status == EventName.COMPLETED and t.result and t.result.objectives
    }
    return [{"trial": i, "label": trials[i].label, "objectives": points[i]} for i in pareto_front(points)]


def heldout_winner(trials: dict[int, Trial]) -> Trial | None:
    scored = [t for t in trials.values() if t.heldout_score is not None]
    return max(scored, key=lambda t: t.heldout_score, default=None)


def default_export(trials: dict[int, Trial]) -> Trial | None:
    """What `export` writes without --trial: the held-out winner, else the best search score."""
    chosen = heldout_winner(trials)
    if chosen is None:
        completed = [t for t in trials.values() if t.whole_score is not None]
        chosen = max(completed, key=lambda t: t.score, default=None)
    return chosen


def leaderboard(trials: dict[int, Trial]) -> list[dict]:
    """Baselines and evolved trials with search and held-out scores (± SE), best held-out first."""
    rows = []
    for trial in trials.values():
        if trial.status != EventName.COMPLETED or (trial.kind == "optimizer" and not trial.heldout):
            continue
        rows.append(
            {
                "trial": trial.trial_id,
                "label": trial.label,
                "kind": trial.kind,
                "search": trial.score,
                "search_se": result_se(trial.result),
                "heldout": trial.heldout.score if trial.heldout else None,
                "heldout_se": result_se(trial.heldout),
            }
        )
    return sorted(rows, key=lambda r: -(r["heldout"] if r["heldout"] is not None else r["search"]))


def describe(trial: Trial) -> str:
    """'trial 12', 'trial 3 (seeded: parent:x)' or 'parent:x (trial -2)': the label, with the id when it lacks it."""
    return (
        trial.label if trial.label.startswith(f"trial {trial.trial_id}") else f"{trial.label} (trial {trial.trial_id})"
    )


def export_trial(run_dir: Path | RunDir, trial_id: int | None = None) -> tuple[Trial, str]:
    """The mergekit YAML of a trial: the held-out winner, else the best search score, by default."""
    ledger = Ledger.read(run_dir)
    trials = ledger.trials
    if trial_id is None:
        chosen = default_export(trials)
        if chosen is None:
            raise UserError(
                f"{run_dir}: no completed trial to export yet; wait for the search or check 'evomerge status'"
            )
    else:
        chosen = trials.get(trial_id)
        if chosen is None or chosen.status != EventName.COMPLETED:
            raise UserError(
                f"--trial: trial {trial_id} is not a completed trial of {run_dir}; see 'evomerge status {run_dir}'"
            )
    return chosen, export_yaml(chosen, exported_names(ledger), ledger.intermediates_of(chosen.trial_id))


def export_yaml(trial: Trial, names: dict[str, str] | None = None, intermediates: list[tuple[str, dict]] = ()) -> str:
    """The mergekit YAML `export` writes for a completed trial (the report shows the same text);
    `names` renames models (`exported_names`). A trial built on `intermediates` (named merges, as
    `Ledger.intermediates_of` gives them) exports as a multi-document YAML (`mergekit-multi`)."""
    header = f"# evomerge export: {describe(trial)}, search score {trial.score:.6f}\n"
    config = rename_models(trial.merge_config, names or {})
    if intermediates:
        from evomerge.merge.multi import multi_document_yaml

        named = [(name, rename_models(merge, names or {})) for name, merge in intermediates]
        return multi_document_yaml(named, config, header)
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def exported_names(ledger: Ledger) -> dict[str, str]:
    """Model name -> the name an export writes: `org/name@commit` for each pinned hub model."""
    return {name: pinned_name(pin["repo"], pin["commit"]) for name, pin in ledger.pins.items()}


def run_merge_seed(run_dir: Path | RunDir) -> int:
    """The seed the run's workers merged with (its optimizer.seed): dare/della need it to rebuild a
    scored model exactly. Read from the frozen spec as plain YAML, so no torch or Ray is loaded."""
    path = RunDir.of(run_dir).spec
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read the run's frozen spec ({error}); restore it from a backup") from None
    seed = ((data or {}).get("optimizer") or {}).get("seed", 0) if isinstance(data, dict) else 0
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
