"""The `evomerge` Typer app, its shared options, and the rule that user errors are one line and exit 2.

User errors print one line and exit 2 (a traceback only with --debug); everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import os

import typer

from evomerge.errors import UserError, interrupted_exit_code

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Busy-waiting OpenMP threads stall whenever another process holds a core (a 2-core laptop, a
# node shared with search workers): a TIES merge took 25 s instead of 9 s. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    help="Evolutionary search for LLM merge recipes, exported as mergekit YAML.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DebugOption = typer.Option(False, "--debug", help="Show full tracebacks.")
QuietOption = typer.Option(False, "--quiet", "-q", help="Print nothing but errors and the final table.")
LogEveryOption = typer.Option(
    None,
    "--log-every",
    metavar="N",
    help="Without a terminal (nohup, SLURM, a pipe): a status line every N evaluations (default 25), and at least once a minute.",
)


@app.callback()
def _commands() -> None:
    """Evolutionary search for LLM merge recipes, exported as mergekit YAML."""


class RefusedWithFigures(UserError):
    """A refusal whose --json object carries the figures that led to it besides the line."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


def user_errors_exit_2(command):
    """Turn a UserError into one line on stderr and exit code 2; a command run with --json also
    prints {"ok": false, "error": LINE} on stdout, so a script reading it gets an object either way."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            if kwargs.get("debug"):
                raise
            typer.echo(f"error: {error}", err=True)
            if kwargs.get("as_json"):
                figures = error.figures if isinstance(error, RefusedWithFigures) else {}
                typer.echo(json.dumps({"ok": False, "error": str(error), **figures}, indent=2))
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt as stop:  # Ctrl-C exits 130, SIGTERM 143 (Stopped)
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=interrupted_exit_code(stop)) from None

    return wrapper
