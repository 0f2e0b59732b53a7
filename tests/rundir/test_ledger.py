"""The run ledger: one reading of the journal that every command agrees with.

A run is searched, given more budget by `resume --max-evals`, SIGKILLed mid-search (the test-only
EVOMERGE_TEST_KILL_AFTER_EVENT hook) and resumed to the end; `status`, `report`, `export` and the
verdict `resume` ends with then all say what the ledger says: the extended budget, the trials, the
documents scored, the best trial and the winner. And each command reads the journal once.

The searches run on the real `Search` and `Scheduler` with in-process fake workers
(tests/fake_workers.py); preflight is replaced by `fake_prepared` (the fake models do not exist).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fake_workers import fake_prepared, fake_scheduler, fake_spec_data, open_search
from typer.testing import CliRunner

import evomerge.rundir.journal as journal_module
from evomerge.cli import app
from evomerge.rundir.journal import KILL_HOOK_VARIABLE, read_events
from evomerge.rundir.ledger import Ledger
from evomerge.rundir.results import describe
from evomerge.rundir.verdict import verdict_of
from evomerge.search.runs import create_run_dir
from evomerge.spec import parse_spec

TESTS = Path(__file__).resolve().parents[1]
FIRST_BUDGET, EXTENDED_BUDGET = 12, 20
# Patches that make `evomerge resume` search with fake workers: no model files, no Ray.
FAKE_RESUME = """
import evomerge.search.loop as loop
import evomerge.search.start as start
from fake_workers import fake_prepared, fake_scheduler
start.preflight = lambda spec, *args: fake_prepared(spec)
loop.Search.current_inputs = lambda self: {}
loop.Search.run = lambda self: self.run_with(fake_scheduler())
"""


@pytest.fixture
def fake_resume(monkeypatch):
    """`evomerge resume` in this process, on fake workers."""
    import evomerge.search.loop as loop
    import evomerge.search.start as start

    monkeypatch.setattr(start, "preflight", lambda spec, *args: fake_prepared(spec))
    monkeypatch.setattr(loop.Search, "current_inputs", lambda self: {})
    monkeypatch.setattr(loop.Search, "run", lambda self: self.run_with(fake_scheduler()))


def finished_run(tmp_path: Path) -> Path:
    data = fake_spec_data(tmp_path / "runs", "ledger", budget={"max_evals": FIRST_BUDGET})
    spec = parse_spec(data, "spec", tmp_path)
    run_dir = Path(create_run_dir(spec))
    open_search(spec, run_dir).run_with(fake_scheduler())
    return run_dir


def resume_killed(run_dir: Path, kill_after: str, *flags: str) -> None:
    """`evomerge resume RUN FLAGS` in a child process that SIGKILLs itself after `kill_after`."""
    script = f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n{FAKE_RESUME}\n"
    script += f"from evomerge.cli import app\napp(['resume', {str(run_dir)!r}, '--quiet', *{list(flags)!r}])\n"
    env = {**os.environ, KILL_HOOK_VARIABLE: kill_after}
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]


def cli(*args: str):
    shown = CliRunner().invoke(app, list(args))
    assert shown.exit_code == 0, shown.output
    return shown


def test_an_extended_killed_and_resumed_run_reads_the_same_in_every_command(tmp_path, fake_resume):
    run_dir = finished_run(tmp_path)
    resume_killed(run_dir, "completed:3", "--max-evals", str(EXTENDED_BUDGET))
    killed = Ledger.read(run_dir)
    assert killed.budget["max_evals"] == EXTENDED_BUDGET and not killed.finished_for_good
    assert FIRST_BUDGET < len(killed.trials) < EXTENDED_BUDGET

    summary = cli("resume", str(run_dir), "--quiet").stdout  # no flag: the journaled budget stands
    ledger = Ledger.read(run_dir)
    events = read_events(run_dir / "journal.jsonl")
    documents = sum(sum(e["n_docs"].values()) for e in events if e["event"] == "completed")
    winner = verdict_of(ledger).winner
    assert ledger.budget["max_evals"] == EXTENDED_BUDGET and ledger.frozen_spec["budget"]["max_evals"] == FIRST_BUDGET
    assert len(ledger.trials) == EXTENDED_BUDGET and ledger.finished_for_good
    assert ledger.docs_scored == documents and winner is not None

    figures = json.loads(cli("status", str(run_dir), "--json").stdout)
    assert figures["budget"]["max_evals"] == EXTENDED_BUDGET
    assert (figures["asked"], figures["completed"], figures["failed"]) == (
        len(ledger.trials),
        len(ledger.with_status("completed")),
        len(ledger.with_status("failed")),
    )
    assert figures["docs_scored"] == documents
    assert (figures["best_trial"], figures["heldout_winner"]) == (ledger.best.trial_id, winner.trial)
    assert f"winner: trial {winner.trial} " in summary

    exported = cli("export", str(run_dir)).stdout
    assert exported.startswith(f"# evomerge export: {describe(ledger.trials[winner.trial])}, search score")

    cli("report", str(run_dir), "-o", str(tmp_path / "report"))
    page = (tmp_path / "report" / "report.html").read_text()
    assert f'<span class="pm"> / {EXTENDED_BUDGET}</span>' in page  # evaluations over the budget in force
    assert f"max_evals {EXTENDED_BUDGET}" in page and f"max_evals {FIRST_BUDGET}" not in page


@pytest.mark.parametrize(
    "command",
    [
        ["status", "--json"],
        ["status"],
        ["export"],
        ["export", "--pareto"],
        ["report", "-o", "REPORT"],
        ["resume", "--quiet", "--max-evals", "16"],
        ["resume", "--quiet"],
    ],
    ids=lambda command: " ".join(command),
)
def test_a_command_reads_the_journal_once(tmp_path, monkeypatch, fake_resume, command):
    run_dir = finished_run(tmp_path)
    readings = []
    parse = journal_module._parsed

    def counted(path, lines, warn):
        readings.append(path)
        return parse(path, lines, warn)

    monkeypatch.setattr(journal_module, "_parsed", counted)
    args = [str(tmp_path / "report") if word == "REPORT" else word for word in command]
    shown = CliRunner().invoke(app, [args[0], str(run_dir), *args[1:]])
    assert shown.exit_code == (2 if "--pareto" in command else 0), shown.output  # a single-objective run has no front
    assert readings == [run_dir / "journal.jsonl"]


def test_a_journal_changed_between_its_reading_and_the_lock_is_refused(tmp_path):
    from evomerge.rundir.events import EventName
    from evomerge.rundir.journal import Journal, RunLocked

    run_dir = finished_run(tmp_path)
    ledger = Ledger.read(run_dir)
    other = Journal(run_dir)
    other.append(EventName.BUDGET_EXTENDED, max_evals=30)
    other.close()
    with pytest.raises(RunLocked, match="wrote to this run while it was being opened"):
        Journal(run_dir, ledger)
    journal = Journal(run_dir, Ledger.read(run_dir))  # a fresh reading opens
    journal.close()
