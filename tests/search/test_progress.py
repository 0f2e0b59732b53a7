"""What a search prints without a terminal (search/progress.py): status lines, new-best lines, quiet.

A fake tally is fed to SearchProgress with a fake clock and a list as its output, as the search
loop feeds it after each result and once per poll; no Ray, no models.
"""

from __future__ import annotations

import io
import re

import pytest

from evomerge.rundir.events import TrialResult
from evomerge.rundir.trials import Tally, Trial
from evomerge.search.progress import ProgressMode, ProgressSettings, SearchProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSearch:
    """Records results into a real Tally, the way the loop does, and feeds the progress."""

    def __init__(self, progress: SearchProgress, clock: FakeClock, trials: dict[int, Trial] | None = None):
        self.progress, self.clock = progress, clock
        self.trials = trials or {}
        self.tally = Tally.of(self.trials)
        self.next_id = max(self.trials, default=-1) + 1

    def finish(self, score: float | None, seconds: float = 6.0, kind: str = "optimizer", label: str = "") -> Trial:
        self.clock.now += seconds
        trial_id = self.next_id
        self.next_id += 1
        result = (
            TrialResult(trial_id, ok=True, score=score, n_docs={"task": 40})
            if score is not None
            else TrialResult.failure(trial_id, "boom")
        )
        status = "completed" if score is not None else "failed"
        trial = Trial(trial_id, kind, label or f"trial {trial_id}", {}, status=status, result=result)
        self.trials[trial_id] = trial
        self.tally.add_asked(trial)
        self.tally.add_finished(trial)
        self.progress.update(self.tally, trial)
        return trial


def lines_progress(total=100, log_every=10, trials=()):
    clock, printed = FakeClock(), []
    settings = ProgressSettings(ProgressMode.LINES, log_every=log_every)
    progress = SearchProgress(total, settings, trials, clock=clock, write=printed.append)
    return progress, clock, printed


def test_a_status_line_every_n_evaluations_with_counts_best_rate_failures_and_eta():
    progress, clock, printed = lines_progress(total=100, log_every=10)
    with progress:
        search = FakeSearch(progress, clock)
        progress.update(search.tally)
        for index in range(25):
            search.finish(None if index % 5 == 4 else 0.1 + 0.01 * min(index, 7))
    statuses = [line for line in printed if "] search: " in line and "new best" not in line]
    assert [re.search(r"search: (\d+)/100", line).group(1) for line in statuses] == ["10", "20"]
    last = statuses[-1]
    # 20 evaluations in 20 x 6 s = 2 minutes: 10 per minute; 80 left: 8 minutes.
    assert "best 0.1700 (trial 7)" in last and "10.0 evals/min" in last and "4 failed" in last, last
    assert "ETA 8m00s" in last, last
    assert printed[0].endswith("search started: 0/100 evaluations, best -, 0.0 evals/min, 0 failed")
    assert "search done: 25/100 evaluations" in printed[-1] and "5 failed" in printed[-1]


def test_one_line_per_new_best_and_none_for_a_tie_or_a_worse_score():
    progress, clock, printed = lines_progress(log_every=1000)
    with progress:
        search = FakeSearch(progress, clock)
        progress.update(search.tally)
        for score in (0.2, 0.5, 0.5, 0.3, None, 0.6):
            search.finish(score)
    bests = [line.split("] ", 1)[1] for line in printed if "new best" in line]
    assert bests == [
        "search: new best 0.2000 (trial 0) at 1/100 evaluations",
        "search: new best 0.5000 (trial 1) at 2/100 evaluations",
        "search: new best 0.6000 (trial 5) at 6/100 evaluations",
    ]


def test_a_baseline_best_is_named_by_its_label():
    progress, clock, printed = lines_progress(log_every=1000)
    with progress:
        search = FakeSearch(progress, clock)
        progress.update(search.tally)
        search.finish(0.4, kind="baseline", label="parent:expert_a")
    assert any("new best 0.4000 (trial 0: parent:expert_a)" in line for line in printed), printed


def test_a_status_line_every_minute_even_without_results():
    progress, clock, printed = lines_progress(log_every=1000)
    with progress:
        search = FakeSearch(progress, clock)
        progress.update(search.tally)
        search.finish(0.3, seconds=30)
        progress.update(search.tally)  # the loop's per-poll call: 30 s since the first line, nothing
        clock.now += 31
        progress.update(search.tally)
        clock.now += 10
        progress.update(search.tally)
    statuses = [line for line in printed if "] search: 1/100" in line]
    assert len(statuses) == 1, printed


def test_a_resumed_search_starts_from_the_journaled_best_and_counts_only_its_own_rate():
    done = {}
    for trial_id, score in enumerate([0.3, 0.7, 0.5]):
        result = TrialResult(trial_id, ok=True, score=score)
        done[trial_id] = Trial(trial_id, "optimizer", f"trial {trial_id}", {}, status="completed", result=result)
    progress, clock, printed = lines_progress(total=10, log_every=2, trials=done.values())
    with progress:
        search = FakeSearch(progress, clock, dict(done))
        progress.update(search.tally)
        search.finish(0.6, seconds=30)
        search.finish(0.8, seconds=30)
    assert printed[0].endswith("search resumed at 3/10 evaluations, best 0.7000 (trial 1), 0.0 evals/min, 0 failed")
    assert any("new best 0.8000 (trial 4)" in line for line in printed)
    status = next(line for line in printed if "] search: 5/10" in line)
    assert "2.0 evals/min" in status and "ETA 2m30s" in status, status


def test_a_phase_line_is_printed_and_the_last_line_says_where_the_search_ended():
    progress, clock, printed = lines_progress(total=2, log_every=1000)
    with progress:
        search = FakeSearch(progress, clock)
        progress.update(search.tally)
        search.finish(0.1)
        search.finish(0.2)
        progress.say("re-scoring on the held-out tasks")
    assert printed[-2].endswith("] re-scoring on the held-out tasks")
    assert printed[-1].endswith("search done: 2/2 evaluations, best 0.2000 (trial 1), 10.0 evals/min, 0 failed")


def test_quiet_prints_nothing():
    clock, printed = FakeClock(), []
    progress = SearchProgress(50, ProgressSettings(ProgressMode.QUIET), clock=clock, write=printed.append)
    with progress:
        search = FakeSearch(progress, clock)
        progress.update(search.tally)
        for _ in range(60):
            search.finish(0.5)
        clock.now += 600
        progress.update(search.tally)
        progress.say("re-scoring on the held-out tasks")
    assert printed == []


def test_without_a_budget_of_evaluations_there_is_no_eta():
    progress, clock, printed = lines_progress(total=None, log_every=2)
    with progress:
        search = FakeSearch(progress, clock)
        progress.update(search.tally)
        search.finish(0.1)
        search.finish(0.2)
    status = next(line for line in printed if "] search: 2 evaluations" in line)
    assert "ETA" not in status


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("tty", "quiet", "mode"),
    [(True, False, ProgressMode.BAR), (False, False, ProgressMode.LINES), (True, True, ProgressMode.QUIET)],
)
def test_the_bar_on_a_terminal_lines_elsewhere_nothing_when_quiet(tty, quiet, mode):
    assert ProgressSettings.for_stream(Stream(tty), quiet=quiet, log_every=7) == ProgressSettings(mode, 7)


def test_callers_passing_a_bool_get_the_bar_or_nothing():
    assert ProgressSettings.of(True).mode is ProgressMode.BAR
    assert ProgressSettings.of(False).mode is ProgressMode.QUIET


def test_log_every_below_one_is_refused_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    result = CliRunner().invoke(app, ["search", str(tmp_path / "spec.yaml"), "--log-every", "0"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: --log-every: must be at least 1 evaluation, got 0"]


def test_with_a_document_budget_each_status_line_counts_documents_against_it():
    clock, printed = FakeClock(), []
    settings = ProgressSettings(ProgressMode.LINES, log_every=10)
    progress = SearchProgress(None, settings, clock=clock, write=printed.append, max_docs=5000)
    with progress:
        search = FakeSearch(progress, clock)
        progress.update(search.tally)
        for index in range(12):
            search.finish(None if index == 3 else 0.5)  # the failed one scored no document
    assert printed[0].endswith("search started: 0 evaluations, best -, 0.0 evals/min, 0 failed, 0/5,000 docs")
    assert "search: 10 evaluations" in printed[-2] and printed[-2].endswith("1 failed, 360/5,000 docs")
    assert printed[-1].endswith("440/5,000 docs")


def test_search_done_and_status_show_the_same_evals_per_minute(tmp_path, capsys):
    """One definition (rundir.results.rate_per_min): evolved candidates per minute of search time."""
    from fake_workers import fake_prepared, fake_scheduler, fake_spec_data

    from evomerge.rundir.results import status
    from evomerge.search.loop import Search
    from evomerge.search.runs import create_run_dir
    from evomerge.spec import parse_spec

    spec = parse_spec(fake_spec_data(tmp_path / "runs", "rate"), "spec", tmp_path)
    search = Search(fake_prepared(spec), create_run_dir(spec), progress=ProgressSettings(ProgressMode.LINES))
    search.current_inputs = dict
    search.run_with(fake_scheduler())
    done = next(line for line in capsys.readouterr().err.splitlines() if "search done:" in line)
    figure = status(search.run_dir)["evals_per_min"]
    assert figure and f", {figure:.1f} evals/min," in done, (figure, done)
