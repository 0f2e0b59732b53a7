"""The verdict of a run: parents, default merges and evolved merges side by side, margins in SE.

Pure functions over the journal's trials, so the end of `search` and `resume`, `status`, the HTML
report and scripts/run_demo.py all say the same thing: which trial `export` gives (the held-out
winner), how far the best evolved merge is ahead of the best parent and the best default merge in
standard errors, how fast the search got there, and, when it did not clearly beat the baselines,
one plain sentence saying so and what to try.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from evomerge.errors import UserError
from evomerge.rundir.events import RESULT_EVENTS, EventName, TrialResult
from evomerge.rundir.ledger import Ledger
from evomerge.rundir.results import default_export, result_se
from evomerge.rundir.trials import BASE_LABEL, Trial, is_parent

REACH_FRACTION = 0.95
HELDOUT = "held-out"
SEARCH = "search"


class RowKind(str, Enum):
    BASE = "base"
    PARENT = "parent"
    DEFAULT_MERGE = "default merge"
    EVOLVED = "evolved"


def row_kind(trial: Trial) -> RowKind:
    if trial.kind == "optimizer":
        return RowKind.EVOLVED
    if trial.label == BASE_LABEL:
        return RowKind.BASE
    return RowKind.PARENT if is_parent(trial.label) else RowKind.DEFAULT_MERGE


@dataclass(frozen=True)
class Measured:
    """A score, its standard error and the per-task metrics behind it."""

    score: float
    se: float
    tasks: dict[str, float]

    @classmethod
    def of(cls, result: TrialResult | None) -> Measured | None:
        if result is None or not result.ok or result.score is None:
            return None
        return cls(float(result.score), result_se(result) or 0.0, dict(result.metrics or {}))

    def __str__(self) -> str:
        return f"{self.score:.4f} ± {self.se:.4f}"


@dataclass(frozen=True)
class VerdictRow:
    trial: int
    label: str
    kind: RowKind
    search: Measured | None
    heldout: Measured | None
    winner: bool  # what `export` gives without --trial

    def on(self, basis: str) -> Measured | None:
        return self.heldout if basis == HELDOUT else self.search

    @property
    def name(self) -> str:
        """'evolved', 'evolved (seeded: parent:x)' or the baseline's label."""
        if self.kind != RowKind.EVOLVED:
            return self.label
        seeded = self.label.partition("(")[2].rstrip(")")
        return f"evolved ({seeded})" if seeded else "evolved"


@dataclass(frozen=True)
class Margin:
    """The best evolved merge minus a rival, with the SE of that difference."""

    rival: VerdictRow
    gap: float
    se: float

    @property
    def sigmas(self) -> float:
        if self.se > 0:
            return self.gap / self.se
        return math.copysign(math.inf, self.gap) if self.gap else 0.0

    def describe(self, basis: str, rival_kind: str) -> str:
        return f"{basis} margin over the best {rival_kind} ({self.rival.label}): {self.gap:+.4f} = {self.sigmas:.1f} SE"


@dataclass(frozen=True)
class TieCut:
    """Trials tied on the search score at the top-k cut: how many were re-scored, how many skipped."""

    score: float
    top_k: int
    cap: int  # at most this many evolved trials are re-scored in all
    tied: int
    rescored: int
    skipped: int

    def describe(self) -> str:
        skipped = (
            f"{self.rescored} re-scored on held-out, {self.skipped} skipped (at most {self.cap} trials are re-scored)"
            if self.skipped
            else "all re-scored on held-out"
        )
        return f"{self.tied} trials tied at search score {self.score:.4f} at the top-{self.top_k} cut: {skipped}"


@dataclass(frozen=True)
class RacingTally:
    """What fidelity racing saved: documents scored against what scoring every candidate whole costs."""

    candidates: int
    stopped_early: int
    docs_scored: int
    docs_unraced: int

    @classmethod
    def of(cls, ledger: Ledger) -> RacingTally | None:
        """None unless the run raced (its results say how many rungs they scored)."""
        scored = ledger.scored_results
        if not any(result.rungs for result in scored):
            return None
        per_candidate = max(result.docs_scored for result in scored if not result.stopped_early)
        return cls(
            candidates=len(scored),
            stopped_early=sum(bool(result.stopped_early) for result in scored),
            docs_scored=ledger.docs_scored,
            docs_unraced=per_candidate * len(scored),
        )

    @property
    def share(self) -> float:
        return self.docs_scored / max(1, self.docs_unraced)

    def describe(self) -> str:
        return (
            f"fidelity racing: {self.stopped_early} of {self.candidates} scored candidates stopped early; "
            f"{self.share:.0%} of the search documents scoring each whole would take "
            f"({self.docs_scored:,} of {self.docs_unraced:,})"
        )


@dataclass(frozen=True)
class Verdict:
    run_dir: str
    rows: list[VerdictRow]  # best first on the basis
    basis: str  # HELDOUT when held-out scores exist, else SEARCH
    winner: VerdictRow | None
    best_evolved: VerdictRow | None
    over_parent: Margin | None
    over_default_merge: Margin | None
    over_best_baseline: Margin | None
    reach: int | None
    searched: int
    ties: TieCut | None
    finished: bool
    racing: RacingTally | None = None
    heldout_unfinished: bool = False  # held-out re-scoring started but did not complete: the search winner stands

    @property
    def export_command(self) -> str | None:
        if self.winner is None:
            return None
        return f"evomerge export {shlex.quote(self.run_dir)} -o best.yaml"

    @property
    def beats_baselines(self) -> bool | None:
        """Whether the best evolved merge beats every baseline by at least 1 SE; None if undecided."""
        margin = self.over_best_baseline
        return None if margin is None else margin.sigmas >= 1.0

    @property
    def advice(self) -> str | None:
        """One sentence when the finished search did not beat the best baseline by 1 SE, else None."""
        if not self.finished or self.beats_baselines is not False:
            return None
        margin = self.over_best_baseline
        assert margin is not None
        return (
            f"No evolved merge beats the best baseline ({margin.rival.label}) by at least 1 SE on the {self.basis} "
            f"tasks (best evolved: {margin.gap:+.4f} = {margin.sigmas:.1f} SE); try more budget (budget.max_evals), "
            f"another method (merge.method) or a wider search space (genome.layer_groups, genome.params, genome.bounds)."
        )

    @property
    def tasks(self) -> list[str]:
        """The per-task columns: the basis's tasks, in the order the journal holds them."""
        names: dict[str, None] = {}
        for row in self.rows:
            measured = row.on(self.basis)
            names.update(dict.fromkeys(measured.tasks if measured else ()))
        return list(names)

    def lines(self) -> list[str]:
        """The text under the table: reach, margins, ties, the winner, the export command, advice."""
        lines = []
        if self.reach is not None:
            lines.append(
                f"evaluations to reach 95% of the final best: {self.reach} of {self.searched} evolved candidates searched"
            )
        for margin, kind in ((self.over_parent, "parent"), (self.over_default_merge, "default merge")):
            if margin is not None:
                lines.append(margin.describe(self.basis, kind))
        if self.racing is not None:
            lines.append(self.racing.describe())
        if self.ties is not None:
            lines.append(self.ties.describe())
        if self.winner is not None:
            what = "held-out winner" if self.winner.heldout is not None else "best search score (no held-out scores)"
            if self.heldout_unfinished:
                what = (
                    f"best search score (held-out re-scoring unfinished; 'evomerge resume {self.run_dir}' completes it)"
                )
            lines.append(f"winner: trial {self.winner.trial} ({self.winner.name}), the {what}; export it with:")
            lines.append(f"  {self.export_command}")
        if self.advice:
            lines.append(self.advice)
        return lines


def build_verdict(run_dir: str | Path, events: list[dict], trials: dict[int, Trial]) -> Verdict:
    """The verdict of a run from its journal's events and replayed trials."""
    return verdict_of(Ledger.of(run_dir, events, trials), str(run_dir))


def verdict_of(ledger: Ledger, run_dir: str | None = None) -> Verdict:
    """The verdict of a run from its ledger; `run_dir` as the user wrote it (for the export command)."""
    trials = ledger.trials
    chosen = default_export(trials)
    rows = [
        VerdictRow(
            t.trial_id,
            t.label,
            row_kind(t),
            Measured.of(t.result),
            Measured.of(t.heldout),
            chosen is not None and t.trial_id == chosen.trial_id,
        )
        for t in trials.values()
        if t.status == EventName.COMPLETED and (t.kind != "optimizer" or t.heldout is not None)
    ]
    # Without held-out scores the best evolved trial by search score stands for the search.
    extra = chosen if chosen is not None and chosen.kind == "optimizer" else _best_searched(trials)
    if extra is not None and all(row.trial != extra.trial_id for row in rows):
        is_chosen = chosen is not None and extra.trial_id == chosen.trial_id
        rows.append(
            VerdictRow(extra.trial_id, extra.label, RowKind.EVOLVED, Measured.of(extra.result), None, is_chosen)
        )
    basis = HELDOUT if any(row.heldout for row in rows) else SEARCH
    rows.sort(key=lambda row: (-_score(row, basis), row.trial))
    evolved = _best(rows, basis, {RowKind.EVOLVED})
    searched = searched_scores(ledger.events, trials)
    return Verdict(
        run_dir=run_dir if run_dir is not None else str(ledger.run),
        rows=rows,
        basis=basis,
        winner=next((row for row in rows if row.winner), None),
        best_evolved=evolved,
        over_parent=_margin(evolved, _best(rows, basis, {RowKind.PARENT}), basis),
        over_default_merge=_margin(evolved, _best(rows, basis, {RowKind.DEFAULT_MERGE}), basis),
        over_best_baseline=_margin(evolved, _best(rows, basis, set(RowKind) - {RowKind.EVOLVED}), basis),
        reach=evals_to_reach(searched),
        searched=len(searched),
        ties=journaled_ties(ledger),
        finished=ledger.finished,
        racing=RacingTally.of(ledger),
        heldout_unfinished=ledger.heldout_unfinished,
    )


def where_it_stopped(run_dir: str | Path) -> str:
    """The line `search` and `resume` end with when stopped (Ctrl-C, SIGTERM): where the run stands."""
    try:
        ledger = Ledger.read(run_dir)
    except UserError:
        return "interrupted"
    done = sum(t.status != EventName.ASKED for t in ledger.trials.values())
    chosen = default_export(ledger.trials)
    best = (
        ""
        if chosen is None
        else f"; best so far trial {chosen.trial_id} ({chosen.label}, search score {chosen.score:.4f})"
    )
    if ledger.heldout_unfinished:
        best += ", the search winner, since the held-out re-scoring is unfinished"
    return f"interrupted: {done} evaluations of {run_dir} done{best}; 'evomerge resume {run_dir}' goes on from there"


def searched_scores(events: list[dict], trials: dict[int, Trial]) -> list[float | None]:
    """The evolved candidates' search scores in trial order (None for a failure).

    Trial order is the order the optimizer asked them in, the same on every machine; the order
    results came back in depends on which worker happened to be faster.
    """
    finished = {e["trial"] for e in events if e["event"] in RESULT_EVENTS}
    return [
        trials[trial_id].score
        for trial_id in sorted(finished)
        if trial_id in trials and trials[trial_id].kind == "optimizer"
    ]


def journaled_ties(ledger: Ledger) -> TieCut | None:
    """The last tie report the search journaled on `run_finished`; None when nothing tied."""
    ties = ledger.ties
    if ties is None:
        return None
    counts = (int(ties[key]) for key in ("top_k", "cap", "tied", "rescored", "skipped"))
    return TieCut(float(ties["score"]), *counts)


def _best_searched(trials: dict[int, Trial]) -> Trial | None:
    completed = [t for t in trials.values() if t.kind == "optimizer" and t.whole_score is not None]
    return max(completed, key=lambda t: (t.score, -t.trial_id), default=None)


def _score(row: VerdictRow, basis: str) -> float:
    measured = row.on(basis)
    return measured.score if measured else -math.inf


def _best(rows: list[VerdictRow], basis: str, kinds: set[RowKind]) -> VerdictRow | None:
    scored = [row for row in rows if row.kind in kinds and row.on(basis) is not None]
    return scored[0] if scored else None  # rows are sorted best first


def _margin(evolved: VerdictRow | None, rival: VerdictRow | None, basis: str) -> Margin | None:
    if evolved is None or rival is None:
        return None
    ours, theirs = evolved.on(basis), rival.on(basis)
    assert ours is not None and theirs is not None
    return Margin(rival, ours.score - theirs.score, math.hypot(ours.se, theirs.se))


def best_so_far(scores) -> np.ndarray:
    """Running maximum that skips failures (NaN); NaN until the first success."""
    return np.fmax.accumulate(np.asarray(scores, dtype=float))


def reach_threshold(final_best: float, fraction: float = REACH_FRACTION) -> float:
    """`fraction` of the final best, measured as a distance below it so that it also means
    "within 5 %" for a best at or below zero (0.95 x -2 would lie above -2 and never be reached)."""
    return final_best - (1.0 - fraction) * abs(final_best)


def evals_to_reach(scores, fraction: float = REACH_FRACTION) -> int | None:
    """How many evaluations (failures counted, None = failed) until the best so far first came
    within `fraction` of the final best; None when nothing succeeded."""
    running = best_so_far([math.nan if s is None else s for s in scores])
    if running.size == 0 or np.isnan(running[-1]):
        return None
    reached = np.flatnonzero(running >= reach_threshold(running[-1], fraction))
    return int(reached[0]) + 1
