"""Helpers for the `evomerge merge`/`export` tests: the command run in process, and folder snapshots."""

from __future__ import annotations

import hashlib
import subprocess
import traceback
from pathlib import Path


def run_cli_in_process(*args: str | Path) -> subprocess.CompletedProcess:
    """The `evomerge` command run in this process (no 3 s of imports per case); an escaped exception shows as a traceback.

    Not thread-safe: the runner swaps sys.stdout and sys.stderr while it runs.
    """
    from typer.testing import CliRunner

    from evomerge.cli import app

    result = CliRunner().invoke(app, [str(arg) for arg in args])
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


def snapshot(folder: str | Path) -> dict[str, str]:
    """Every file and folder under `folder` (hidden ones too) with its content hash."""
    root = Path(folder)
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        for path in sorted(root.rglob("*"))
    }
