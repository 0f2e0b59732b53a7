"""Budgets: how many documents a search has scored (`budget.max_docs`), and budgets that extend:
`evomerge resume RUN --max-evals N --time-limit-min M --max-docs D`.

The frozen spec is never rewritten (its hash is the run's first event). A larger budget is
journaled as a `budget_extended` event instead, and every later start reads the frozen spec with
the last such budget applied (`effective_spec`), so the journal stays the whole history. Any other
difference between a spec given to resume and the frozen one is refused, naming the field.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from pydantic import ValidationError

from evomerge.errors import UserError
from evomerge.rundir.events import EventName
from evomerge.rundir.journal import Journal
from evomerge.rundir.layout import RunDir
from evomerge.rundir.ledger import EXTENDABLE, Ledger, budget_extension
from evomerge.spec import BudgetSpec, Spec


@dataclass(frozen=True)
class BudgetRequest:
    """The budget a resume asks for; None keeps the run's current value."""

    max_evals: int | None = None
    time_limit_min: float | None = None
    max_docs: int | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, key) is None for key in EXTENDABLE)


class DocsSpent:
    """The search documents scored, per block of `block` asks (baselines before every block), for
    `budget.max_docs`, a ceiling the search never crosses.

    A candidate is asked only if it fits even when it, the earlier candidates of its block and those
    of earlier blocks still in flight are all scored whole: the documents the earlier blocks scored,
    plus that many whole scores. A whole score's documents also come from earlier blocks, as racing's
    incumbent does, so under CMA-ES's generation barrier (block = popsize), where the earlier
    generations are all told when the next one is asked, a run stops at the same candidate
    whichever worker finished first, and a resumed run stops where the uninterrupted one would.
    """

    def __init__(self, block: int):
        self.block = max(1, block)
        self.by_block: dict[int, int] = defaultdict(int)
        self.whole_by_block: dict[int, int] = defaultdict(int)  # the most documents one result scored
        self.in_flight_by_block: dict[int, int] = defaultdict(int)

    def _block(self, trial_id: int) -> int:
        return trial_id // self.block if trial_id >= 0 else -1  # the baselines come before block 0

    def asked(self, trial_id: int) -> None:
        self.in_flight_by_block[self._block(trial_id)] += 1

    def add(self, trial_id: int, docs: int, was_in_flight: bool = False) -> None:
        """A result's documents; `was_in_flight` when its ask went through `asked`."""
        block = self._block(trial_id)
        self.by_block[block] += docs
        self.whole_by_block[block] = max(self.whole_by_block[block], docs)
        self.in_flight_by_block[block] -= was_in_flight

    def fits(self, trial_id: int, max_docs: int) -> bool:
        """Whether candidate `trial_id` may be asked without the search crossing `max_docs`."""
        block = self._block(trial_id)
        earlier = [index for index in self.by_block.keys() | self.in_flight_by_block.keys() if index < block]
        whole = max((self.whole_by_block[index] for index in earlier), default=0)
        in_flight = sum(self.in_flight_by_block[index] for index in earlier)
        place = trial_id - block * self.block + 1
        return sum(self.by_block[index] for index in earlier) + (in_flight + place) * whole <= max_docs


def docs_spent_of(trials, block: int) -> DocsSpent:
    """The documents each block of asks scored, from the journal's results (`budget.max_docs`)."""
    spent = DocsSpent(block)
    for trial in trials.values():
        if trial.result is not None:
            spent.add(trial.trial_id, trial.result.docs_scored)
        else:
            spent.asked(trial.trial_id)  # re-queued: in flight again
    return spent


def effective_spec(frozen: Spec, journal: Ledger | list[dict]) -> Spec:
    """The frozen spec with the budget in force: that of the last `budget_extended` event, if any."""
    extension = journal.budget_extension if isinstance(journal, Ledger) else budget_extension(journal)
    if extension is None:
        return frozen
    budget = frozen.budget.model_copy(update=extension)
    return frozen.model_copy(update={"budget": budget})


def requested_budget(current: Spec, frozen: Spec, source: str) -> BudgetRequest:
    """The budget a spec given to resume asks for; refused (naming the field) when anything else differs."""
    ours, theirs = _comparable(current), _comparable(frozen)
    differing = first_difference(ours, theirs)
    if differing is not None:
        raise UserError(
            f"{source}: {differing}: differs from the spec frozen in the run; resume changes only budget.max_evals, budget.time_limit_min and budget.max_docs, start a new run for any other change"
        )
    if all(getattr(current.budget, key) == getattr(frozen.budget, key) for key in EXTENDABLE):
        return BudgetRequest()
    return BudgetRequest(*(getattr(current.budget, key) for key in EXTENDABLE))


def _comparable(spec: Spec) -> dict:
    """A spec's dump minus what resume may change or what does not change the search."""
    dump = spec.model_dump(mode="json", exclude={"name", "runs_dir", "version", "logging"})
    dump["budget"] = {key: value for key, value in dump["budget"].items() if key not in EXTENDABLE}
    return dump


def first_difference(ours, theirs, path: str = "") -> str | None:
    """The dotted path of the first field where two dumped specs differ, None when equal."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in list(ours) + [k for k in theirs if k not in ours]:
            found = first_difference(ours.get(key), theirs.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            found = first_difference(a, b, f"{path}[{index}]")
            if found:
                return found
        return None
    return None if ours == theirs else path


def extended_spec(spec: Spec, request: BudgetRequest, asked: int, docs_scored: int = 0) -> Spec:
    """`spec` with the requested budget; refused in one line when it is invalid, smaller, already
    spent, or when another budget the request leaves alone would still stop the search at once."""
    if request.empty:
        return spec
    wanted = {key: getattr(request, key) for key in EXTENDABLE if getattr(request, key) is not None}
    used = {"max_evals": (asked, "asked", "evaluations"), "max_docs": (docs_scored, "scored", "documents")}
    for key, value in wanted.items():
        flag = "--" + key.replace("_", "-")
        try:
            BudgetSpec.model_validate({**spec.budget.model_dump(), key: value})
        except ValidationError as error:
            raise UserError(f"{flag}: {error.errors()[0]['msg']}; give a larger value") from None
        current = getattr(spec.budget, key)
        spent, verb, unit = used.get(key, (-1, "", ""))
        floor = max(current or 0, spent + 1)  # one number that is accepted, whichever rule binds
        if value >= floor:
            continue
        if spent + 1 >= (current or 0):
            raise UserError(
                f"{flag}: the run has already {verb} {spent:,} {unit}; give at least {floor} to search further"
            )
        raise UserError(f"{flag}: {value} is below the run's {current}; resume extends a budget, give at least {floor}")
    extended = spec.model_copy(update={"budget": spec.budget.model_copy(update=wanted)})
    for key, (spent, verb, unit) in used.items():
        limit = getattr(extended.budget, key)
        if key not in wanted and limit is not None and spent >= limit:
            given = ", ".join("--" + name.replace("_", "-") for name in wanted)
            raise UserError(
                f"{given}: budget.{key} ({limit:,}) is spent too ({spent:,} {unit} {verb}), so the run would search nothing; also give --{key.replace('_', '-')} above {spent}"
            )
    return extended


def journal_budget(run: RunDir | Ledger, before: Spec, after: Spec) -> None:
    """Append `budget_extended` when the budget changed (the frozen spec stays as it was); a run's
    ledger gets the event too."""
    if after.budget == before.budget:
        return
    journal = Journal(run.run, run) if isinstance(run, Ledger) else Journal(run)
    try:
        journal.append(
            EventName.BUDGET_EXTENDED,
            **{key: getattr(after.budget, key) for key in EXTENDABLE},
            previous={key: getattr(before.budget, key) for key in EXTENDABLE},
        )
    finally:
        journal.close()


def refuse_a_broken_setup(tally, deaths_in_a_row: int, workers: int, run_dir) -> None:
    """Every evaluation so far failed, or workers died on every recent candidate: the setup is
    broken, not the candidates; say why and stop."""
    enough = max(6, 3 * workers)
    if tally.completed == 0 and tally.failed >= enough:
        raise UserError(
            f"the first {tally.failed} evaluations all failed (last: {tally.last_failure}); fix the cause and run 'evomerge resume {run_dir}'"
        )
    if deaths_in_a_row >= enough:
        raise UserError(
            f"workers died on each of the last {deaths_in_a_row} candidates (last: {tally.last_failure}); fix what kills them (memory, a model or task file), then run 'evomerge resume {run_dir}'"
        )
