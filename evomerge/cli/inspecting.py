"""Commands that read a run directory: `status`, `export` (and `export --merge`), `report`."""

from __future__ import annotations

from pathlib import Path

import typer

from evomerge.cli.app import DebugOption, app, user_errors_exit_2
from evomerge.cli.merging import check_export_output, materialize
from evomerge.errors import UserError


@app.command()
@user_errors_exit_2
def status(
    run_dir: Path = typer.Argument(...), as_json: bool = typer.Option(False, "--json"), debug: bool = DebugOption
):
    """Completed and failed trials, best score and trial, evaluations per minute."""
    import dataclasses
    import json

    from evomerge.rundir.ledger import Ledger
    from evomerge.rundir.results import status_figures
    from evomerge.rundir.verdict import verdict_of

    ledger = Ledger.read(run_dir)
    figures = status_figures(ledger)
    verdict = verdict_of(ledger, str(run_dir))
    figures["export_command"] = verdict.export_command
    figures["advice"] = verdict.advice
    figures["racing"] = dataclasses.asdict(verdict.racing) if verdict.racing else None
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
        return
    for key in ("run", "asked", "completed", "failed", "in_flight", "best_score", "best_trial", "best_label"):
        typer.echo(f"{key:>15}: {figures[key]}")
    typer.echo(f"{'docs_scored':>15}: {figures['docs_scored']:,} (search documents, baselines included)")
    typer.echo(f"{'budget':>15}: {_budget_line(figures['budget'])}")
    typer.echo(f"{'evals_per_min':>15}: {figures['evals_per_min']} (evolved candidates; the baseline phase excluded)")
    for key in ("heldout_winner", "finished"):
        typer.echo(f"{key:>15}: {figures[key]}")
    if figures["phase"]:
        typer.echo(f"{'phase':>15}: {figures['phase']}")
    if figures["heldout_unfinished"]:
        typer.echo(
            f"{'held-out':>15}: re-scoring unfinished, so the search winner stands; 'evomerge resume {run_dir}' completes it"
        )
    if figures["pareto_front"]:
        typer.echo(
            f"{'pareto front':>15}: "
            + "; ".join(f"trial {p['trial']} {[round(v, 4) for v in p['objectives']]}" for p in figures["pareto_front"])
        )
    if verdict.racing:
        typer.echo(f"{'racing':>15}: {verdict.racing.describe().removeprefix('fidelity racing: ')}")
    if verdict.export_command:
        typer.echo(f"{'export':>15}: {verdict.export_command}")
    if verdict.advice:
        typer.echo(verdict.advice)


def _budget_line(budget: dict) -> str:
    """The budget in force, extensions included: 'max_evals 40, time_limit_min 30, max_docs 9,000'."""
    limits = [f"{key} {budget[key]:,}" for key in ("max_evals", "time_limit_min", "max_docs") if budget.get(key)]
    return ", ".join(limits) or "none (the search runs until stopped)"


@app.command()
@user_errors_exit_2
def export(
    run_dir: Path = typer.Argument(...),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the YAML here instead of stdout."),
    trial: int | None = typer.Option(None, help="Export this trial instead of the held-out winner."),
    pareto: bool = typer.Option(
        False, "--pareto", help="List the Pareto front of a multi-objective run (export one with --trial)."
    ),
    merge_to: Path | None = typer.Option(
        None,
        "--merge",
        metavar="OUT",
        help="Also materialize it in OUT, as `evomerge merge` would, with the run's optimizer.seed for dare/della.",
    ),
    device: str = typer.Option("cpu", help="With --merge: cpu or cuda, where the merge math runs."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace an existing -o file; with --merge, replace a non-empty OUT (an earlier merge) whole.",
    ),
    debug: bool = DebugOption,
):
    """Write a trial as a standard mergekit YAML (the held-out winner by default); --merge OUT builds it too."""
    from evomerge.merge.card import origin_comment
    from evomerge.rundir.ledger import Ledger
    from evomerge.rundir.results import describe, export_trial, pareto_trials

    if pareto:
        front = pareto_trials(Ledger.read(run_dir).trials)
        if not front:
            raise UserError(
                f"--pareto: {run_dir} has no multi-objective trials; declare evaluation.objectives in the spec"
            )
        for point in front:
            typer.echo(
                f"trial {point['trial']:>5}  {point['label']:<28} objectives {', '.join(f'{v:.4f}' for v in point['objectives'])}"
            )
        return

    chosen, text = export_trial(run_dir, trial)
    header, _, body = text.partition("\n")
    text = f"{header}\n{origin_comment(str(Path(run_dir).resolve()), chosen.trial_id)}{body}"
    if output is not None:
        check_export_output(output, run_dir, text, force)
    if merge_to is not None:
        _export_and_merge(run_dir, chosen.trial_id, text, output, merge_to, device, force)
    elif output is None:
        typer.echo(text)
    else:
        _write_export(output, text)
        typer.echo(f"wrote {describe(chosen)} to {output}", err=True)


def _export_and_merge(
    run_dir: Path, trial: int, text: str, output: Path | None, out_dir: Path, device: str, force: bool
) -> None:
    """Write the exported YAML (to -o, else a temporary file) and materialize it in out_dir."""
    import tempfile

    from evomerge.rundir.results import run_merge_seed

    seed = run_merge_seed(run_dir)
    with tempfile.TemporaryDirectory(prefix="evomerge-export-") as folder:
        config = output if output is not None else Path(folder) / f"{Path(run_dir).resolve().name}-trial-{trial}.yaml"
        _write_export(config, text)
        materialize(config, out_dir, device, seed, force=force)
    typer.echo(
        f"exported trial {trial} of {run_dir}" + (f" to {output}" if output else "") + f" and merged it in {out_dir}",
        err=True,
    )


def _write_export(output: Path, text: str) -> None:
    from evomerge.files import write_text_atomic

    if output.is_dir():
        raise UserError(f"-o: '{output}' is a folder; give a file path such as '{output / 'best.yaml'}'")
    if not output.parent.is_dir():
        raise UserError(f"-o: folder '{output.parent}' does not exist; create it first or choose another path")
    try:
        write_text_atomic(output, text)
    except OSError as error:
        raise UserError(
            f"-o: cannot write '{output}' ({error.strerror or error}); choose a writable location"
        ) from None


@app.command()
@user_errors_exit_2
def report(
    run_dir: Path = typer.Argument(...),
    out_dir: Path | None = typer.Option(
        None, "-o", "--out", help="Folder for report.html and its PNGs (default RUN_DIR/report)."
    ),
    debug: bool = DebugOption,
):
    """Write report.html with plots: scores over evaluations, per-task metrics, per-layer heatmaps, baselines, Pareto front."""
    from evomerge.rundir.report import write_report

    typer.echo(f"wrote {write_report(run_dir, out_dir)}")
