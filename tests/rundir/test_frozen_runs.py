"""Run directories written by earlier versions (tests/fixtures/runs) still read and resume.

Every future version must pass these unchanged: `status`, `export` and `report` read the frozen
run, and a copy cut at any point resumes to the very asks, scores and held-out scores the run
originally reached (the fake workers score a candidate as a pure function of its merge config).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fake_workers import FIXTURE_RUNS, fake_scheduler, open_search
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.rundir.journal import read_events
from evomerge.search.runs import open_run

V0 = FIXTURE_RUNS / "v0-cmaes"


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


def search_state(run_dir: Path) -> dict:
    """What a resume must reproduce: every asked point with its score, and the held-out scores."""
    events = read_events(run_dir / "journal.jsonl")
    scores = {e["trial"]: e.get("score") for e in events if e["event"] in ("completed", "failed")}
    return {
        "asked": {e["trial"]: (e["label"], e["x"], scores.get(e["trial"])) for e in events if e["event"] == "asked"},
        "heldout": {e["trial"]: e["score"] for e in events if e["event"] == "heldout"},
        "finished": [e["completed"] for e in events if e["event"] == "run_finished"],
    }


def test_v0_run_reads_in_status_export_and_report(tmp_path):
    run_dir = copy_of(V0, tmp_path)
    runner = CliRunner()
    shown = runner.invoke(app, ["status", str(run_dir), "--json"])
    assert shown.exit_code == 0, shown.output
    figures = json.loads(shown.stdout)
    assert (figures["asked"], figures["completed"], figures["failed"], figures["finished"]) == (19, 18, 1, True)
    assert (figures["best_trial"], figures["best_score"], figures["heldout_winner"]) == (4, 0.802821, 4)
    assert figures["failures"] == [{"trial": 5, "reason": "merged weights are not finite (model.norm.weight)"}]
    exported = runner.invoke(app, ["export", str(run_dir)])
    assert exported.exit_code == 0, exported.output
    assert exported.stdout.startswith("# evomerge export: trial 4, search score 0.802821\n")
    assert "merge_method: ties" in exported.stdout and "/frozen-run/expert_a" in exported.stdout
    reported = runner.invoke(app, ["report", str(run_dir), "-o", str(tmp_path / "report")])
    assert reported.exit_code == 0, reported.output
    assert "trial 4" in (tmp_path / "report" / "report.html").read_text()


# Cut after: the first baseline result; mid-generation 0 (trials 0-2 told, 3 in flight); right
# after the first snapshot line; during the held-out re-scoring; and a finished run's last line gone.
CUTS = {"baseline": 4, "mid-generation": 23, "after-snapshot": 34, "heldout": 45, "before-run-finished": 53}


@pytest.mark.parametrize("cut", CUTS.values(), ids=CUTS.keys())
def test_v0_run_cut_anywhere_resumes_to_the_end_it_originally_reached(tmp_path, cut):
    run_dir = copy_of(V0, tmp_path)
    lines = (run_dir / "journal.jsonl").read_bytes().splitlines(keepends=True)
    (run_dir / "journal.jsonl").write_bytes(b"".join(lines[:cut]))
    run, spec, _ = open_run(run_dir)
    open_search(spec, run).run_with(fake_scheduler())
    assert search_state(run_dir) == search_state(V0)
