"""The run ledger: a run's journal read once and folded into every fact a command asks about.

`Ledger.read` reads `journal.jsonl` once, checks that it is whole, and replays its trials; every
other fact (the budget in force, the trial counts, the one tally of documents scored, the seeds,
the search seconds, the gene table, the held-out phase, the hub pins and input fingerprints) is
answered from those events and trials without reading again. `status`, `report`, `export`, the
verdict, `resume` and the search loop all ask a ledger. The search loop keeps the ledger in step
while it runs: its journal appends each record it writes to `events`, and it adds and settles the
trials itself, so the facts below stay true for the running search too.

The journal's format history lives here, where it is read, and nowhere else:
* runs before `run_created` began with a `run_started` holding no input fingerprints
  (`check_intact` accepts them; `frozen_spec_check` names the fingerprint to compare);
* runs before the gene table was journaled get one rebuilt from the trials' gene names (`gene_table`);
* runs before results carried `search_s` are timed by the clock (`search_rate`, `wall_seconds`);
* runs before seeding was journaled have candidates but no `seeded` event (`seeds` is []);
* runs before `budget_extended` existed have the frozen budget (`budget_extension` is None).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from evomerge.errors import UserError
from evomerge.rundir.events import RESULT_EVENTS, EventName, TrialResult
from evomerge.rundir.genes import GeneRow, rows_from_names
from evomerge.rundir.journal import read_journal
from evomerge.rundir.layout import RunDir
from evomerge.rundir.trials import Tally, Trial, replay, search_seconds

# The budget fields `resume --max-evals/--time-limit-min/--max-docs` may extend.
EXTENDABLE = ("max_evals", "time_limit_min", "max_docs")
# Events that open or close a phase of the run; the last of them says whether it is finished.
PHASES = (EventName.RUN_STARTED, EventName.RUN_FINISHED, EventName.BUDGET_EXTENDED)
# The `run_finished` field where the search says which trials tied at the top-k cut.
TIES_FIELD = "heldout_ties"


@dataclass
class Ledger:
    """One run's journal events and the trials they replay to; every fact is read off these two."""

    run: RunDir
    events: list[dict]
    trials: dict[int, Trial]
    journal_bytes: int = 0  # the journal's size as read, then as an open `Journal` keeps it

    @classmethod
    def read(cls, run_dir: str | Path | RunDir, for_search: bool = False, warn: bool = True) -> Ledger:
        """The journal read once and checked whole; `warn=False` leaves telling its damage to another reading.

        A command's ledger sets a partial held-out re-scoring aside (`heldout_unfinished`), so the
        search winner stands; the search's (`for_search`) keeps it, re-scoring only what lacks one.
        """
        run = RunDir.of(run_dir)
        if not run.journal.exists() and not run.spec.is_file():
            raise UserError(f"{run}: no {run.journal.name} here; give a run directory such as runs/NAME")
        events, size = read_journal(run.journal, warn)
        check_intact(run, events)
        ledger = cls(run, events, replay(events), size)
        if not for_search and ledger.heldout_unfinished:
            for trial in ledger.trials.values():  # a partial re-scoring would crown whichever trial it scored first
                trial.heldout = None
        return ledger

    @classmethod
    def of(cls, run_dir: str | Path | RunDir, events: list[dict], trials: dict[int, Trial]) -> Ledger:
        """A ledger over events and trials already read (the older `(events, trials)` call sites)."""
        return cls(RunDir.of(run_dir), events, trials)

    # The frozen spec and the budget in force.

    @functools.cached_property
    def frozen_spec(self) -> dict:
        """spec.yaml as plain data ({} when missing or unreadable): a spec an older or newer evomerge
        would not validate still reports."""
        try:
            data = yaml.safe_load(self.run.spec.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def budget_extension(self) -> dict | None:
        """The extendable budget of the last `budget_extended` event; None for a run never extended."""
        return budget_extension(self.events)

    @property
    def budget(self) -> dict:
        """The budget in force: the frozen spec's, with the last extension applied."""
        frozen = self.frozen_spec.get("budget")
        return {**(frozen if isinstance(frozen, dict) else {}), **(self.budget_extension or {})}

    def frozen_spec_check(self) -> tuple[str, str | None]:
        """('sha256', the frozen spec's hash) from `run_created`; for a run from before that event,
        ('fingerprint', its first start's spec fingerprint), or ('nothing', None) before any start."""
        created = next((e for e in self.events if e["event"] == EventName.CREATED and "spec_sha256" in e), None)
        if created is not None:
            return "sha256", created["spec_sha256"]
        if not self.starts:
            return "nothing", None
        return "fingerprint", self.starts[0].get("spec_fingerprint")

    # Phases.

    @property
    def starts(self) -> list[dict]:
        """Every `run_started` event: the first search and each resume."""
        return [e for e in self.events if e["event"] == EventName.RUN_STARTED]

    @property
    def finished(self) -> bool:
        """Whether the run ever finished (a later extension may have reopened it)."""
        return any(e["event"] == EventName.RUN_FINISHED for e in self.events)

    @property
    def finished_for_good(self) -> bool:
        """Finished and given no more budget since: a resume has nothing to search or re-score."""
        last = next((e["event"] for e in reversed(self.events) if e["event"] in PHASES), None)
        return last == EventName.RUN_FINISHED

    @property
    def heldout_unfinished(self) -> bool:
        """Held-out scores were journaled but the run has not finished since it last started: the
        held-out phase is incomplete (or stale, for a run given more budget), so the search winner stands."""
        phases = [e["event"] for e in self.events if e["event"] in (EventName.RUN_STARTED, EventName.RUN_FINISHED)]
        unfinished = bool(phases) and phases[-1] == EventName.RUN_STARTED
        return unfinished and any(e["event"] == EventName.HELDOUT for e in self.events)

    @property
    def phase_change(self) -> tuple[int, dict] | None:
        """(its position in `events`, the event) of a params_then_layers run's change to its layer
        phase; None before it (or in a run of one space). Trials from the event's `first_trial` on
        are the layer phase's (`in_layer_phase`)."""
        return next(((i, e) for i, e in enumerate(self.events) if e["event"] == EventName.PHASE_CHANGED), None)

    @property
    def phased(self) -> bool:
        """Whether the frozen spec searches params_then_layers."""
        search = self.frozen_spec.get("search")
        return isinstance(search, dict) and search.get("space") == "params_then_layers"

    def in_layer_phase(self, trial_id: int) -> bool:
        """Whether a trial belongs to a params_then_layers run's layer phase."""
        change = self.phase_change
        return change is not None and trial_id >= change[1]["first_trial"]

    @property
    def phase_status(self) -> str | None:
        """What `status` says of a params_then_layers run's phase; None for a run of one space."""
        if not self.phased:
            return None
        change = self.phase_change
        if change is None:
            return "params (the layer phase follows)"
        event = change[1]
        return f"layers (from trial {event['first_trial']}; {event['name']} is trial {event['winner']}, search score {event['score']:.4f})"

    def intermediates_of(self, trial_id: int) -> list[tuple[str, dict]]:
        """(name, merge config) of the named merges a trial's config builds on: a layer-phase trial's
        parameter winner; [] for every other trial. What `export` writes as the earlier documents."""
        if not self.in_layer_phase(trial_id):
            return []
        change = self.phase_change[1]  # type: ignore[index]  # in_layer_phase: there is one
        return [(change["name"], change["merge_config"])]

    @property
    def ties(self) -> dict | None:
        """The last tie report the search journaled on `run_finished`; None when nothing tied."""
        for event in reversed(self.events):
            ties = event.get(TIES_FIELD) if event["event"] == EventName.RUN_FINISHED else None
            if isinstance(ties, dict):
                return ties
        return None

    # Trials and their tallies.

    def with_status(self, status: str) -> list[Trial]:
        return [t for t in self.trials.values() if t.status == status]

    @property
    def tally(self) -> Tally:
        return Tally.of(self.trials)

    @property
    def best(self) -> Trial | None:
        """The completed trial with the best search score (partial scores included, as `status` shows)."""
        return max(self.with_status(EventName.COMPLETED), key=lambda t: t.score, default=None)

    @property
    def scored_results(self) -> list[TrialResult]:
        """The search results that have a score: baselines and candidates, partial scores included."""
        return [t.result for t in self.trials.values() if t.score is not None and t.result is not None]

    @property
    def docs_scored(self) -> int:
        """The search documents the run scored, raced or not: what its scoring cost, and what
        `budget.max_docs` bounds."""
        return sum(trial.docs_scored for trial in self.trials.values())

    @property
    def failure_reasons(self) -> Counter:
        return Counter(
            (t.result.reason if t.result else None) or "no reason recorded" for t in self.with_status(EventName.FAILED)
        )

    @property
    def seeds(self) -> list[tuple[str, np.ndarray]] | None:
        """(label, x) of the baselines the run seeded the optimizer with; None before it chose them,
        [] for a run journaled before seeding existed."""
        seeded = [e for e in self.events if e["event"] == EventName.SEEDED]
        if seeded:
            return [(s["label"], np.asarray(s["x"], dtype=float)) for s in seeded[-1]["seeds"]]
        return [] if any(t.kind == "optimizer" for t in self.trials.values()) else None

    # Time.

    @property
    def results(self) -> list[dict]:
        """The journaled search results of known trials, in the order they finished."""
        return [e for e in self.events if e["event"] in RESULT_EVENTS and e["trial"] in self.trials]

    @property
    def search_seconds(self) -> float:
        """The search's time so far, over every start and resume: each result journals it."""
        return search_seconds(self.events)

    @property
    def result_clock(self) -> list[tuple[bool, float]]:
        """(evolved?, search seconds) of every result that has its search time: what `rate_per_min` reads."""
        return [
            (self.trials[e["trial"]].kind == "optimizer", e["search_s"])
            for e in self.results
            if isinstance(e.get("search_s"), (int, float))
        ]

    @property
    def search_rate(self) -> float | None:
        """Evolved-candidate evaluations per minute of search time; the baseline phase is left out.

        Time is the search time journaled with each result, so the hours a stopped run sat idle do
        not count; journals without it use clock time.
        """
        results = self.results
        evolved = [e for e in results if self.trials[e["trial"]].kind == "optimizer"]
        if not evolved:
            return None
        if all(isinstance(e.get("search_s"), (int, float)) for e in results):
            return rate_per_min(self.result_clock)
        asked = [e["time"] for e in self.events if e["event"] == EventName.ASKED and e.get("kind") == "optimizer"]
        start = min(asked, default=evolved[0].get("time", 0.0))
        minutes = (max(e.get("time", 0.0) for e in evolved) - start) / 60
        return round(len(evolved) / minutes, 2) if minutes > 0 else None

    @property
    def wall_seconds(self) -> float | None:
        """The search time journaled with the results; for journals without it, the clock time from
        the first start to the last result. None before any result."""
        if self.search_seconds > 0:
            return self.search_seconds
        results = [e["time"] for e in self.events if e["event"] in RESULT_EVENTS and "time" in e]
        starts = [e["time"] for e in self.starts if "time" in e]
        return max(results) - min(starts) if results and starts else None

    # What the starts journaled: the gene table, the hub pins, the input fingerprints.

    @property
    def gene_table(self) -> list[GeneRow] | None:
        """The gene table the search journaled on `run_started`; for runs journaled before it existed,
        the rows read back from the trials' gene names; None when there are neither."""
        for event in self.starts:
            if event.get("genes"):
                return [GeneRow.from_json(row) for row in event["genes"]]
        names = dict.fromkeys(name for trial in self.trials.values() for name in trial.params)
        return rows_from_names(names) or None

    @property
    def pins(self) -> dict[str, dict]:
        """Model name -> {repo, revision, commit} of each hub model, as the run's first start pinned it."""
        for event in self.starts:
            if isinstance(event.get("models"), dict):
                return event["models"]
        return {}

    @property
    def last_inputs(self) -> dict[str, str] | None:
        """The input fingerprints of the latest start; None for a run journaled before they existed."""
        started = [e for e in self.starts if isinstance(e.get("inputs"), dict)]
        return started[-1]["inputs"] if started else None


def check_intact(run: RunDir, events: list[dict]) -> None:
    """Refuse a run whose journal lost its first event: read as it is, it would pass for a new run.

    Every run journals `run_created` first; runs from before that event began with a `run_started`
    that had no input fingerprints. Anything else (a missing or emptied journal, a cut head) is
    damage, and a resume must not start the search over on top of what is left.
    """
    if any(event["event"] == EventName.CREATED for event in events):
        return
    started = [event for event in events if event["event"] == EventName.RUN_STARTED]
    if started and "inputs" not in started[0]:
        return
    if not run.journal.exists():
        what = "is missing"
    elif not events:
        what = "holds no event"
    else:
        what = f"lost its first line ({EventName.CREATED})"
    raise UserError(
        f"{run.journal}: the journal {what}, so the run is damaged; restore the journal from a backup, or start a new run under another name"
    )


def rate_per_min(results: list[tuple[bool, float]]) -> float | None:
    """The evals/min every command shows (the live status lines, `search done`, `status`): evolved
    candidates finished per minute of search time after the last baseline finished. `results` holds
    (evolved?, the search seconds when it finished) for each result."""
    evolved = [seconds for is_evolved, seconds in results if is_evolved]
    if not evolved:
        return None
    start = max((seconds for is_evolved, seconds in results if not is_evolved), default=0.0)
    minutes = (max(evolved) - start) / 60
    return round(len(evolved) / minutes, 2) if minutes > 0 else None


def budget_extension(events: list[dict]) -> dict | None:
    """The extendable budget of the last `budget_extended` event; None for a run never extended."""
    extended = [e for e in events if e["event"] == EventName.BUDGET_EXTENDED]
    return {key: extended[-1].get(key) for key in EXTENDABLE} if extended else None
