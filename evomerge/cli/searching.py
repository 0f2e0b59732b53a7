"""`evomerge search` and `evomerge resume`, and the verdict table they end with."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer

from evomerge.cli.app import DebugOption, LogEveryOption, QuietOption, app, user_errors_exit_2
from evomerge.errors import UserError, interrupted_exit_code


@app.command()
@user_errors_exit_2
def search(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    address: str | None = typer.Option(
        None, help="Join a Ray cluster (auto or HOST:PORT); default starts a local one."
    ),
    quiet: bool = QuietOption,
    log_every: int | None = LogEveryOption,
    debug: bool = DebugOption,
):
    """Run a search; results go to runs/NAME/ (hub models at the commits of SPEC's lock, when it has one)."""
    from evomerge.evaluation.hub_data import locked_dataset_revisions
    from evomerge.lock import model_pins, read_lock
    from evomerge.search.start import start_search
    from evomerge.spec import load_spec

    progress = _progress_settings(quiet, log_every)
    spec = load_spec(spec_path)
    lock = read_lock(spec_path)
    locked = {"pins": model_pins(lock), "dataset_revisions": locked_dataset_revisions(lock)}
    with _say_where_it_stopped(Path(spec.runs_dir) / spec.name):
        run_dir = start_search(spec, address, progress=progress, source=str(spec_path), **locked)
    print_summary(run_dir)


@app.command()
@user_errors_exit_2
def resume(
    run_dir: Path = typer.Argument(..., help="runs/NAME"),
    address: str | None = typer.Option(None),
    spec_path: Path | None = typer.Option(
        None,
        "--spec",
        help="Refuse to resume if this spec differs from the frozen one (a larger budget in it extends the run).",
    ),
    accept_changed_inputs: bool = typer.Option(
        False,
        "--accept-changed-inputs",
        help="Resume although a model or evaluation file changed since the run started (its scores then mix old and new inputs).",
    ),
    max_evals: int | None = typer.Option(
        None, "--max-evals", help="Give a stopped or finished run this larger budget.max_evals (journaled)."
    ),
    time_limit_min: float | None = typer.Option(
        None, "--time-limit-min", help="Give the run this larger budget.time_limit_min (journaled)."
    ),
    max_docs: int | None = typer.Option(
        None, "--max-docs", help="Give the run this larger budget.max_docs, in documents scored (journaled)."
    ),
    quiet: bool = QuietOption,
    log_every: int | None = LogEveryOption,
    debug: bool = DebugOption,
):
    """Continue a stopped or crashed search exactly where it was, with more budget if asked."""
    from evomerge.search.budget import BudgetRequest
    from evomerge.search.start import resume_search

    with _say_where_it_stopped(run_dir):
        ledger = resume_search(
            run_dir,
            address,
            progress=_progress_settings(quiet, log_every),
            spec_path=spec_path,
            accept_changed_inputs=accept_changed_inputs,
            budget=BudgetRequest(max_evals, time_limit_min, max_docs),
        )
    print_summary(run_dir, ledger)


@contextlib.contextmanager
def _say_where_it_stopped(run_dir: Path):
    """Ctrl-C or SIGTERM: one line saying where the run stands, then exit 130 or 143."""
    from evomerge.rundir.layout import RunDir
    from evomerge.rundir.verdict import where_it_stopped

    try:
        yield
    except KeyboardInterrupt as stop:
        typer.echo(where_it_stopped(run_dir) if RunDir(run_dir).journal.exists() else "interrupted", err=True)
        raise typer.Exit(code=interrupted_exit_code(stop)) from None


def _progress_settings(quiet: bool, log_every: int | None):
    """The live bar on a terminal, status lines in a log (nohup, SLURM, a pipe), nothing with --quiet."""
    from evomerge.search.progress import DEFAULT_LOG_EVERY, ProgressSettings

    if log_every is not None and log_every < 1:
        raise UserError(f"--log-every: must be at least 1 evaluation, got {log_every}")
    return ProgressSettings.for_stream(sys.stderr, quiet=quiet, log_every=log_every or DEFAULT_LOG_EVERY)


def print_summary(run_dir, ledger=None) -> None:
    """The verdict a search or resume ends with: the table, margins in SE, the winner and its export;
    from the run's `ledger` when the search hands it over, else read from the journal."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from evomerge.rundir.ledger import Ledger
    from evomerge.rundir.verdict import verdict_of

    verdict = verdict_of(ledger or Ledger.read(run_dir), str(run_dir))
    tasks = verdict.tasks
    table = Table(
        title=f"{escape(str(run_dir))}: baselines and evolved merges; per-task columns: {verdict.basis} scores"
    )
    for column in ("trial", "merge", "search score", "held-out score", *tasks):
        table.add_column(escape(column), justify="left" if column == "merge" else "right")
    for row in verdict.rows:
        per_task = row.on(verdict.basis)
        table.add_row(
            str(row.trial),
            escape(row.name) + (" (winner: export gives this)" if row.winner else ""),  # a name is not markup
            str(row.search) if row.search else "-",
            str(row.heldout) if row.heldout else "-",
            *(f"{per_task.tasks[task]:.4f}" if per_task and task in per_task.tasks else "-" for task in tasks),
            style="bold" if row.winner else None,
        )
    console = Console()
    if not console.is_terminal:  # a log file: the table at its natural width, not wrapped at 80 columns
        console = Console(width=1000)
    console.print(table)
    for line in verdict.lines():
        typer.echo(line)
