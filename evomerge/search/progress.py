"""The live search bar: evaluations done, best score so far, evaluations per minute, failures."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class SearchProgress:
    def __init__(self, total: int | None, enabled: bool = True):
        self.total = total
        self.started = time.monotonic()
        self.progress = Progress(
            TextColumn("[bold]search"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[summary]}"),
            TimeElapsedColumn(),
            disable=not enabled,
        )
        self.task = self.progress.add_task("search", total=total, summary="")
        self._done_at_start: int | None = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, tally) -> None:
        """Redraw from a trials.Tally (counts kept by the driver, not recounted per call)."""
        finished = tally.completed + tally.failed
        if self._done_at_start is None:
            self._done_at_start = finished
        minutes = max((time.monotonic() - self.started) / 60, 1e-9)
        rate = (finished - self._done_at_start) / minutes
        best = "-" if tally.best_score is None else f"{tally.best_score:.4f}"
        self.progress.update(
            self.task, completed=finished, summary=f"best {best} | {rate:.1f} evals/min | {tally.failed} failed"
        )
