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
from evomerge.rundir.events import RESULT_EVENTS, EventName, TrialResult
from evomerge.rundir.journal import check_intact, read_events
from evomerge.rundir.layout import RunDir
from evomerge.rundir.pareto import pareto_front
from evomerge.rundir.trials import Trial, replay


def load_trials(run_dir: Path | RunDir) -> tuple[list[dict], dict[int, Trial]]:
    run = RunDir.of(run_dir)
    if not run.journal.exists() and not run.spec.is_file():
        raise UserError(f"{run}: no {run.journal.name} here; give a run directory such as runs/NAME")
    events = read_events(run.journal)
    check_intact(run, events)
    trials = replay(events)
    if heldout_unfinished(events):
        for trial in trials.values():  # a partial re-scoring would crown whichever trial it scored first
            trial.heldout = None
    return events, trials


def heldout_unfinished(events: list[dict]) -> bool:
    """Held-out scores were journaled but the run has not finished since it last started: the
    held-out phase is incomplete (or stale, for a run given more budget), so the search winner stands."""
    phases = [e["event"] for e in events if e["event"] in (EventName.RUN_STARTED, EventName.RUN_FINISHED)]
    unfinished = bool(phases) and phases[-1] == EventName.RUN_STARTED
    return unfinished and any(e["event"] == EventName.HELDOUT for e in events)


def result_se(result: TrialResult | None) -> float | None:
    return standard_error(result.metrics, result.n_docs, subtasks=result.subtasks) if result else None


def status(run_dir: Path | RunDir) -> dict:
    events, trials = load_trials(run_dir)
    return status_of(run_dir, events, trials)


def scored_results(trials: dict[int, Trial]) -> list[TrialResult]:
    """The search results that have a score: baselines and candidates, partial scores included."""
    return [t.result for t in trials.values() if t.score is not None and t.result is not None]


def docs_scored(trials: dict[int, Trial]) -> int:
    """The search documents a run scored, raced or not: what its scoring cost, in documents."""
    return sum(result.docs_scored for result in scored_results(trials))


def status_of(run_dir: Path | RunDir, events: list[dict], trials: dict[int, Trial]) -> dict:
    """The figures `evomerge status` shows, from a journal already read."""
    completed = [t for t in trials.values() if t.status == EventName.COMPLETED]
    failed = [t for t in trials.values() if t.status == EventName.FAILED]
    best = max(completed, key=lambda t: t.score, default=None)
    heldout = heldout_winner(trials)
    return {
        "run": str(run_dir),
        "asked": len(trials),
        "completed": len(completed),
        "failed": len(failed),
        "in_flight": sum(t.status == EventName.ASKED for t in trials.values()),
        "docs_scored": docs_scored(trials),
        "best_score": best.score if best else None,
        "best_trial": best.trial_id if best else None,
        "best_label": best.label if best else None,
        "evals_per_min": search_rate(events, trials),
        "heldout_winner": heldout.trial_id if heldout else None,
        "heldout_unfinished": heldout_unfinished(events),
        "pareto_front": pareto_trials(trials),
        "failures": [{"trial": t.trial_id, "reason": t.result.reason if t.result else None} for t in failed],
        "finished": any(e["event"] == EventName.RUN_FINISHED for e in events),
    }


def search_rate(events: list[dict], trials: dict[int, Trial]) -> float | None:
    """Evolved-candidate evaluations per minute of search time; the baseline phase is left out.

    Time is the search time journaled with each result (`search_s`, summed over every start and
    resume), so the hours a stopped run sat idle do not count; journals without it use clock time.
    """
    results = [e for e in events if e["event"] in RESULT_EVENTS and e["trial"] in trials]
    evolved = [e for e in results if trials[e["trial"]].kind == "optimizer"]
    if not evolved:
        return None
    if all(isinstance(e.get("search_s"), (int, float)) for e in results):
        return rate_per_min(result_clock(events, trials))
    asked = [e["time"] for e in events if e["event"] == EventName.ASKED and e.get("kind") == "optimizer"]
    start = min(asked, default=evolved[0].get("time", 0.0))
    minutes = (max(e.get("time", 0.0) for e in evolved) - start) / 60
    return round(len(evolved) / minutes, 2) if minutes > 0 else None


def result_clock(events: list[dict], trials: dict[int, Trial]) -> list[tuple[bool, float]]:
    """(evolved?, search seconds) of every journaled result that has its search time: what `rate_per_min` reads."""
    return [
        (trials[e["trial"]].kind == "optimizer", e["search_s"])
        for e in events
        if e["event"] in RESULT_EVENTS and e["trial"] in trials and isinstance(e.get("search_s"), (int, float))
    ]


def rate_per_min(results: list[tuple[bool, float]]) -> float | None:
    """The evals/min every command shows (the live status lines, `search done`, `status`): evolved
    candidates finished per minute of search time after the last baseline finished. `results` holds
    (evolved?, the search seconds when it finished) for each result."""
    evolved = [seconds for is_evolved, seconds in results if is_evolved]
    if not evolved:
        return None
    start = max((seconds for is_evolved, seconds in results if not is_evolved), default=0.0)
    minutes = (max(evolved) - start) / 60
    return round(len(evolved) / minutes, 2) if minutes > 0 else None


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
    events, trials = load_trials(run_dir)
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
    return chosen, export_yaml(chosen, exported_names(events))


def export_yaml(trial: Trial, names: dict[str, str] | None = None) -> str:
    """The mergekit YAML `export` writes for a completed trial (the report shows the same text);
    `names` renames models (`exported_names`)."""
    header = f"# evomerge export: {describe(trial)}, search score {trial.score:.6f}\n"
    config = rename_models(trial.merge_config, names or {})
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def pinned_models(events: list[dict]) -> dict[str, dict]:
    """Model name -> {repo, revision, commit} of each hub model, as the run's first start pinned it."""
    for event in events:
        if event.get("event") == EventName.RUN_STARTED and isinstance(event.get("models"), dict):
            return event["models"]
    return {}


def exported_names(events: list[dict]) -> dict[str, str]:
    """Model name -> the name an export writes: `org/name@commit` for each pinned hub model."""
    return {name: pinned_name(pin["repo"], pin["commit"]) for name, pin in pinned_models(events).items()}


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
