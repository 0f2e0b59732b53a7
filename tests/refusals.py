"""Running the CLI in-process and checking a refusal: exit 2, one stderr line, no traceback.

Each refusal's line is also recorded, so docs/RELIABILITY.md's tables are copied from real runs.

Off unless EVOMERGE_RECORD_REFUSALS names a file: then every bad-input test appends
{"test": node id, "line": the line} to it. `python scripts/refusal_tables.py` runs those tests
with it set and prints the markdown tables.
"""

from __future__ import annotations

import json
import os


def record_refusal(line: str) -> None:
    path = os.environ.get("EVOMERGE_RECORD_REFUSALS")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"test": test, "line": line}) + "\n")


def run_cli_in_process(*args) -> tuple[int, list[str]]:
    """Exit code and non-blank stderr lines of `evomerge ARGS`, run through typer's CliRunner."""
    from typer.testing import CliRunner

    from evomerge.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, [line for line in result.stderr.splitlines() if line.strip()]


def assert_refused_in_one_line(code: int, lines: list[str], expected: list[str]) -> None:
    assert code == 2, f"exit {code}: {lines}"
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    record_refusal(lines[0])
    assert "Traceback" not in lines[0]
    for word in expected:
        assert word.lower() in lines[0].lower(), f"{word!r} not in: {lines[0]}"
