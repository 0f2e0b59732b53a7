"""A search stopped in its held-out phase, the held-out phase's progress lines, and resuming a finished run.

The searches run in process on fake workers (tests/fake_workers.py): the real `Search` and
`Scheduler`, no Ray, no model. A Ctrl-C or SIGTERM is raised by the worker itself, at an exact
point of the held-out re-scoring.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from fake_workers import FakeCalls, fake_prepared, fake_scheduler, fake_score, fake_spec_data, open_search

from evomerge.errors import Stopped
from evomerge.rundir.journal import read_events
from evomerge.rundir.results import export_trial, load_trials, status_of
from evomerge.rundir.verdict import build_verdict, where_it_stopped
from evomerge.search.loop import Search
from evomerge.search.progress import ProgressMode, ProgressSettings
from evomerge.search.runs import create_run_dir
from evomerge.spec import parse_spec


def new_run(tmp_path: Path, name: str = "stopped") -> tuple:
    spec = parse_spec(fake_spec_data(tmp_path / "runs", name), "spec", tmp_path)
    return spec, Path(create_run_dir(spec))


def stopping_after(heldout_results: int, stop: BaseException):
    """A score function that raises `stop` when asked for held-out result number `heldout_results` + 1."""
    seen = []

    def score(trial: int, config: dict, eval_set: str) -> float:
        if eval_set == "heldout":
            if len(seen) == heldout_results:
                raise stop
            seen.append(trial)
        return fake_score(config, eval_set)

    return score


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), Stopped(signal.SIGTERM)], ids=["sigint", "sigterm"])
def test_a_search_stopped_while_re_scoring_names_the_search_winner_until_resume_completes_it(tmp_path, stop):
    spec, run_dir = new_run(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        open_search(spec, run_dir).run_with(fake_scheduler(score=stopping_after(2, stop)))
    events, trials = load_trials(run_dir)
    assert sum(e["event"] == "heldout" for e in events) == 2, "the base and a parent were re-scored"
    figures = status_of(run_dir, events, trials)
    best = max((t for t in trials.values() if t.score is not None), key=lambda t: t.score)
    assert figures["heldout_unfinished"] and figures["heldout_winner"] is None
    assert export_trial(run_dir)[0].trial_id == best.trial_id, "the search winner, not a partly re-scored one"
    verdict = build_verdict(run_dir, events, trials)
    assert verdict.winner is not None and verdict.winner.trial == best.trial_id
    assert any("held-out re-scoring unfinished" in line for line in verdict.lines())
    stopped = where_it_stopped(run_dir)
    assert f"best so far trial {best.trial_id}" in stopped and "held-out re-scoring is unfinished" in stopped
    assert f"'evomerge resume {run_dir}'" in stopped
    open_search(spec, run_dir).run_with(fake_scheduler())
    events, trials = load_trials(run_dir)
    figures = status_of(run_dir, events, trials)
    assert not figures["heldout_unfinished"] and figures["heldout_winner"] is not None
    assert export_trial(run_dir)[0].trial_id == figures["heldout_winner"]


def test_the_held_out_phase_prints_a_line_per_re_scored_trial(tmp_path, capsys):
    spec, run_dir = new_run(tmp_path, "progress")
    search = Search(fake_prepared(spec), run_dir, progress=ProgressSettings(ProgressMode.LINES))
    search.current_inputs = dict
    search.run_with(fake_scheduler())
    lines = [line for line in capsys.readouterr().err.splitlines() if "held-out: " in line]
    rescored = sum(e["event"] == "heldout" for e in read_events(run_dir / "journal.jsonl"))
    assert len(lines) == rescored > 0
    assert lines[-1].split("] ", 1)[1].startswith(f"held-out: {rescored}/{rescored} re-scored (trial ")


def test_the_held_out_phase_says_how_far_it_is_while_a_slow_trial_runs(tmp_path, capsys):
    """One line at least every log_seconds (here 0: every poll) while nothing finishes."""
    spec, run_dir = new_run(tmp_path, "slow")
    polls = []
    search = Search(fake_prepared(spec), run_dir, progress=ProgressSettings(ProgressMode.LINES, log_seconds=0.0))
    search.current_inputs = dict
    search.run_with(fake_scheduler(FakeCalls(on_poll=lambda: polls.append(1))))
    waiting = [line for line in capsys.readouterr().err.splitlines() if "s so far" in line]
    assert waiting and all("held-out: " in line and "re-scored" in line for line in waiting)


def test_resuming_a_finished_run_starts_no_worker_and_says_so(tmp_path, capsys):
    spec, run_dir = new_run(tmp_path, "finished")
    open_search(spec, run_dir).run_with(fake_scheduler())
    before = (run_dir / "journal.jsonl").read_bytes()
    started = []
    search = Search(fake_prepared(spec), run_dir, progress=ProgressSettings(ProgressMode.LINES))
    search.current_inputs = dict
    search.run_with(fake_scheduler(FakeCalls(on_poll=lambda: started.append(1))))
    assert (run_dir / "journal.jsonl").read_bytes() == before and not started
    assert "the run has finished; nothing to resume" in capsys.readouterr().err
