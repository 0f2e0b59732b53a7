"""What a running search shows: a live bar on a terminal, log lines without one, nothing when quiet.

The rich bar draws only on a terminal, so under nohup, SLURM or a pipe a search used to print
nothing until its final table. Without a terminal it now prints one status line every `log_every`
evaluations or every `log_seconds`, whichever comes first (done/total, best score and its trial,
evaluations per minute, failures, ETA), and one line for each new best score.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evomerge.rundir.trials import Tally, Trial

DEFAULT_LOG_EVERY = 25


class ProgressMode(str, Enum):
    BAR = "bar"  # a terminal: the live rich bar
    LINES = "lines"  # a log file or a pipe: status lines
    QUIET = "quiet"  # nothing but errors and the final table


@dataclass(frozen=True)
class ProgressSettings:
    mode: ProgressMode = ProgressMode.BAR
    log_every: int = DEFAULT_LOG_EVERY  # evaluations between two status lines
    log_seconds: float = 60.0  # and at most this long between two

    @classmethod
    def for_stream(cls, stream, quiet: bool = False, log_every: int = DEFAULT_LOG_EVERY) -> ProgressSettings:
        """The bar on a terminal, lines elsewhere, nothing when `quiet`."""
        if quiet:
            return cls(ProgressMode.QUIET, log_every)
        return cls(ProgressMode.BAR if stream.isatty() else ProgressMode.LINES, log_every)

    @classmethod
    def of(cls, progress: bool | ProgressSettings) -> ProgressSettings:
        """Callers that only say "a bar or nothing" (benchmarks, the demo script) pass a bool."""
        if isinstance(progress, ProgressSettings):
            return progress
        return cls(ProgressMode.BAR if progress else ProgressMode.QUIET)


@dataclass(frozen=True)
class Best:
    score: float
    trial: Trial

    def describe(self) -> str:
        where = f"trial {self.trial.trial_id}"
        return (
            f"{self.score:.4f} ({where}: {self.trial.label})"
            if self.trial.kind == "baseline"
            else f"{self.score:.4f} ({where})"
        )


def _write_to_stderr(line: str) -> None:
    # Looked up per call: a batch job's stderr is a file, and tests swap sys.stderr.
    print(line, file=sys.stderr, flush=True)


class SearchProgress:
    """Fed the driver's running tally after each result (and once per poll); shows it per `settings`."""

    def __init__(
        self,
        total: int | None,
        settings: ProgressSettings | bool = True,
        trials: Iterable[Trial] = (),
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] = _write_to_stderr,
        max_docs: int | None = None,
        rate: Callable[[], float | None] | None = None,
    ):
        self.total = total
        self.rate = rate  # the run's evals/min (rundir.results.rate_per_min); None: this process's own
        self.max_docs = max_docs  # budget.max_docs: the summary also counts documents against it
        self.settings = ProgressSettings.of(settings)
        self.clock = clock
        self.write = write
        self.started = clock()
        self.best = _best_of(trials)
        self._done_at_start: int | None = None
        self._tally: Tally | None = None
        self._logged_done = 0
        self._logged_at = self.started
        self.progress = Progress(
            TextColumn("[bold]search"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[summary]}"),
            TimeElapsedColumn(),
            disable=self.settings.mode != ProgressMode.BAR,
        )
        self.task = self.progress.add_task("search", total=total, summary="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, error_type, *rest):
        if self.settings.mode == ProgressMode.LINES and self._tally is not None and error_type is None:
            self._log_status("search done:")
        return self.progress.__exit__(error_type, *rest)

    def update(self, tally: Tally, finished: Trial | None = None) -> None:
        """Redraw or log from the tally; `finished` is the trial whose result was just recorded."""
        done = tally.completed + tally.failed
        first = self._done_at_start is None
        if first:
            self._done_at_start = done
        self._tally = tally
        new_best = finished is not None and self._is_new_best(finished)
        if self.settings.mode == ProgressMode.BAR:
            self.progress.update(self.task, completed=done, summary=self._summary(tally, done, bar=True))
        elif self.settings.mode == ProgressMode.LINES:
            if first:
                self._log_status("search resumed at" if done else "search started:")
            if new_best and self.best is not None:
                self.write(self._stamped(f"search: new best {self.best.describe()} at {self._count(done)}"))
            if done - self._logged_done >= self.settings.log_every or self._since_logged() >= self.settings.log_seconds:
                self._log_status("search:")

    def say(self, message: str) -> None:
        """One line about a phase of the run (not shown when quiet; above the bar on a terminal)."""
        if self.settings.mode == ProgressMode.BAR:
            self.progress.console.print(message)
        elif self.settings.mode == ProgressMode.LINES:
            self.write(self._stamped(message))

    def _is_new_best(self, trial: Trial) -> bool:
        score = trial.score
        if score is None or (self.best is not None and score <= self.best.score):
            return False
        self.best = Best(score, trial)
        return True

    def _log_status(self, prefix: str) -> None:
        assert self._tally is not None, "update() comes first"
        done = self._tally.completed + self._tally.failed
        self.write(self._stamped(f"{prefix} {self._summary(self._tally, done, bar=False)}"))
        self._logged_done, self._logged_at = done, self.clock()

    def _summary(self, tally: Tally, done: int, bar: bool) -> str:
        rate = self._rate(done)  # every evaluation this process finished per minute: what the ETA needs
        shown = rate if self.rate is None else (self.rate() or 0.0)
        best = "-" if self.best is None else self.best.describe()
        parts = [f"best {best}", f"{shown:.1f} evals/min", f"{tally.failed} failed"]
        if self.max_docs:
            parts.append(f"{tally.docs_scored:,}/{self.max_docs:,} docs")
        if bar:
            return " | ".join(parts)
        eta = self._eta(done, rate)
        return ", ".join([self._count(done), *parts] + ([f"ETA {eta}"] if eta else []))

    def _count(self, done: int) -> str:
        return f"{done}/{self.total} evaluations" if self.total else f"{done} evaluations"

    def _rate(self, done: int) -> float:
        minutes = max((self.clock() - self.started) / 60, 1e-9)
        return (done - (self._done_at_start or 0)) / minutes

    def _eta(self, done: int, rate: float) -> str | None:
        if not self.total or rate <= 0 or done >= self.total:
            return None
        return _duration((self.total - done) / rate * 60)

    def _since_logged(self) -> float:
        return self.clock() - self._logged_at

    def _stamped(self, line: str) -> str:
        return f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}"


def _best_of(trials: Iterable[Trial]) -> Best | None:
    scored = [(trial.score, trial) for trial in trials if trial.score is not None]
    if not scored:
        return None
    score, trial = max(scored, key=lambda pair: pair[0])
    return Best(score, trial)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
