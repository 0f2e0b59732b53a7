"""The `evomerge` command line: a thin layer over the library, one function per command.

User errors print one line and exit 2 (a traceback only with --debug); everything else is a bug
and keeps its traceback. `app.py` holds the app; each module registers its commands on import.
"""

from evomerge.cli import checking, inspecting, merging, prefetching, searching  # noqa: F401 - registers the commands
from evomerge.cli.app import app
from evomerge.cli.searching import print_summary

__all__ = ["app", "main", "print_summary"]


def main() -> None:  # pragma: no cover - console entry
    app()
