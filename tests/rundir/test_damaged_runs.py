"""A damaged run directory is said to be damaged, in one line, by every command that reads it.

Each case damages a copy of the frozen run, then runs `status`, `report`, `export` and `resume` on
it: exit 2, one line naming the journal and the fix, and the run byte-identical afterwards (above
all, `resume` never starts the search over in place of a journal it cannot read).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from merge.cli_runner import snapshot  # noqa: E402
from refusals import assert_refused_in_one_line, run_cli_in_process  # noqa: E402

FROZEN_RUN = TESTS / "fixtures" / "runs" / "v0-cmaes"


def emptied(journal: Path) -> None:
    journal.write_bytes(b"")


def deleted(journal: Path) -> None:
    journal.unlink()


def lost_run_created(journal: Path) -> None:
    """A current run without its first line: its run_started carries input fingerprints."""
    events = [json.loads(line) for line in journal.read_text().splitlines()]
    events[0]["inputs"] = {}
    journal.write_text("".join(json.dumps(event) + "\n" for event in events))


def a_folder(journal: Path) -> None:
    journal.unlink()
    journal.mkdir()


def every_line_doubled(journal: Path) -> None:
    journal.write_text("".join(line + "\n" + line + "\n" for line in journal.read_text().splitlines()))


# name -> (damage done to runs/NAME/journal.jsonl, substrings of the one line every command prints)
DAMAGED = {
    "emptied-journal": (emptied, ["journal.jsonl", "holds no event", "damaged", "backup"]),
    "deleted-journal": (deleted, ["journal.jsonl", "is missing", "damaged"]),
    "journal-lost-run-created": (lost_run_created, ["lost its first line (run_created)", "damaged"]),
    "journal-is-a-folder": (a_folder, ["journal.jsonl", "is a directory", "backup"]),
    "journal-lines-doubled": (every_line_doubled, ["line 2 repeats line 1", "duplicated lines"]),
}
COMMANDS = {
    "status": lambda run, tmp: ["status", run],
    "report": lambda run, tmp: ["report", run, "-o", tmp / "report"],
    "export": lambda run, tmp: ["export", run, "-o", tmp / "best.yaml"],
    "resume": lambda run, tmp: ["resume", run],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("damage", list(DAMAGED))
def test_a_damaged_journal_is_named_in_one_line_and_nothing_starts_over(damage, command, tmp_path):
    run = Path(shutil.copytree(FROZEN_RUN, tmp_path / "runs" / FROZEN_RUN.name))
    DAMAGED[damage][0](run / "journal.jsonl")
    before = snapshot(tmp_path)
    code, lines = run_cli_in_process(*COMMANDS[command](run, tmp_path))
    assert_refused_in_one_line(code, lines, DAMAGED[damage][1])
    assert snapshot(tmp_path) == before, "the damaged run was changed, or something was written"


def test_an_intact_run_of_the_older_format_still_reads():
    """The frozen run predates run_created: its run_started (without input fingerprints) opens it."""
    code, lines = run_cli_in_process("status", FROZEN_RUN)
    assert code == 0, lines
