"""Budgets that extend: resume gives a stopped or finished run more evaluations,
time or documents, journaled as an event (the frozen spec is never rewritten); anything else is refused naming the field."""

from __future__ import annotations

import re

import pytest
import yaml
from fake_workers import fake_scheduler, fake_spec_data, open_search

from evomerge.errors import UserError
from evomerge.rundir.journal import read_events
from evomerge.rundir.results import docs_scored
from evomerge.rundir.trials import replay
from evomerge.search.budget import BudgetRequest, effective_spec, extended_spec, journal_budget, requested_budget
from evomerge.search.loop import create_run_dir
from evomerge.search.runs import open_run
from evomerge.search.start import resume_search
from evomerge.spec import Spec


def finished_run(tmp_path, max_evals: int = 12):
    spec = Spec.model_validate(fake_spec_data(tmp_path, "extend", budget={"max_evals": max_evals}))
    run_dir = create_run_dir(spec)
    open_search(spec, run_dir).run_with(fake_scheduler())
    return run_dir


def resume_with(run_dir, request: BudgetRequest):
    """What `evomerge resume RUN --max-evals N` does, minus preflight (the fake models do not exist)."""
    run, frozen, events = open_run(run_dir)
    spec = effective_spec(frozen, events)
    asked = sum(1 for e in events if e["event"] == "asked")
    extended = extended_spec(spec, request, asked, docs_scored(replay(events)))
    journal_budget(run, spec, extended)
    return open_search(extended, run).run_with(fake_scheduler())


def test_a_finished_run_searches_on_to_the_extended_budget_and_the_frozen_spec_is_untouched(tmp_path):
    run_dir = finished_run(tmp_path)
    frozen = (run_dir / "spec.yaml").read_bytes()
    trials = resume_with(run_dir, BudgetRequest(max_evals=16))
    assert len(trials) == 16 and all(t.status == "completed" or t.trial_id == 5 for t in trials.values())
    assert (run_dir / "spec.yaml").read_bytes() == frozen
    events = read_events(run_dir / "journal.jsonl")
    extended = [e for e in events if e["event"] == "budget_extended"]
    assert [(e["max_evals"], e["previous"]["max_evals"]) for e in extended] == [(16, 12)]
    assert [e["event"] for e in events].count("run_finished") == 2
    # A later plain resume keeps the journaled budget: nothing more to ask.
    run, frozen_spec, events = open_run(run_dir)
    assert effective_spec(frozen_spec, events).budget.max_evals == 16
    assert len(resume_with(run_dir, BudgetRequest())) == 16


@pytest.mark.parametrize(
    "request_, message",
    [
        (BudgetRequest(max_evals=10), "--max-evals: the run has already asked 12 evaluations; give at least 13"),
        (BudgetRequest(max_evals=12), "--max-evals: the run has already asked 12 evaluations; give at least 13"),
        (BudgetRequest(time_limit_min=-1.0), "--time-limit-min: "),
        (BudgetRequest(max_evals=0), "--max-evals: "),
        # 7 baselines and 5 candidates of 32 documents each
        (BudgetRequest(max_docs=384), "--max-docs: the run has already scored 384 documents; give at least 385"),
        # more documents, but the evaluation budget that ended the run is spent: it would search nothing
        (BudgetRequest(max_docs=1000), "--max-docs: budget.max_evals (12) is spent too (12 evaluations asked)"),
        (BudgetRequest(max_docs=0), "--max-docs: "),
    ],
)
def test_a_budget_that_does_not_extend_is_refused_in_one_line_and_nothing_is_journaled(tmp_path, request_, message):
    run_dir = finished_run(tmp_path)
    before = (run_dir / "journal.jsonl").read_bytes()
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        resume_with(run_dir, request_)
    assert "\n" not in str(caught.value)
    assert (run_dir / "journal.jsonl").read_bytes() == before


def write_spec(tmp_path, **sections) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(fake_spec_data(tmp_path, "extend", **sections)))
    return str(path)


def test_a_document_budget_extends_a_run_that_an_evaluation_budget_ended(tmp_path):
    run_dir = finished_run(tmp_path)
    # The baselines (7 x 32 documents) and generation 0 (4 x 32) scored 352, so generation 1 fits
    # 480 if all of it is scored whole: candidates 5-7 are asked after candidate 4. Candidate 5 fails
    # and scores nothing, so generation 2's first candidate still fits (352 + 96 + 32), its second not.
    trials = resume_with(run_dir, BudgetRequest(max_evals=100, max_docs=480))
    assert sorted(t.trial_id for t in trials.values() if t.kind == "optimizer") == list(range(9))
    events = read_events(run_dir / "journal.jsonl")
    [extended] = [e for e in events if e["event"] == "budget_extended"]
    assert (extended["max_docs"], extended["previous"]["max_docs"]) == (480, None)


def test_a_spec_given_to_resume_may_only_change_the_budget_and_any_other_field_is_named(tmp_path):
    run_dir = finished_run(tmp_path)
    _, frozen, _ = open_run(run_dir)
    from evomerge.spec import load_spec

    bigger = load_spec(write_spec(tmp_path, budget={"max_evals": 20, "time_limit_min": 5}))
    assert requested_budget(bigger, frozen, "spec.yaml") == BudgetRequest(20, 5)
    changed = load_spec(
        write_spec(tmp_path, budget={"max_evals": 20}, optimizer={"name": "cmaes", "seed": 8, "popsize": 4})
    )
    with pytest.raises(UserError, match=r"spec.yaml: optimizer.seed: differs from the spec frozen in the run"):
        requested_budget(changed, frozen, "spec.yaml")
    before = (run_dir / "journal.jsonl").read_bytes()
    with pytest.raises(UserError, match="optimizer.seed"):
        resume_search(run_dir, progress=False, spec_path=write_spec(tmp_path, optimizer={"seed": 9}))
    assert (run_dir / "journal.jsonl").read_bytes() == before


def test_the_command_line_refuses_a_smaller_budget_with_exit_2_and_one_line(tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    run_dir = finished_run(tmp_path)
    result = CliRunner().invoke(app, ["resume", str(run_dir), "--max-evals", "5", "--quiet"])
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == "error: --max-evals: the run has already asked 12 evaluations; give at least 13 to search further"
    )
    assert len(resume_with(run_dir, BudgetRequest(max_evals=13))) == 13  # the figure the refusal names is accepted


def test_the_document_ceiling_counts_every_earlier_candidate_in_flight_as_scored_whole():
    from evomerge.search.budget import DocsSpent

    spent = DocsSpent(block=2)
    for baseline in (-1, -2):  # two baselines of 10 documents: a whole score is 10
        spent.asked(baseline)
        spent.add(baseline, 10, was_in_flight=True)
    assert spent.fits(0, 30) and not spent.fits(1, 30) and spent.fits(1, 40)  # its place in its block counts
    spent.asked(0)
    spent.asked(1)
    spent.add(0, 3, was_in_flight=True)  # raced out early; candidate 1 is still in flight (no barrier)
    assert spent.fits(2, 43) and not spent.fits(2, 42)  # 23 scored + candidate 1 and itself whole
    spent.add(1, 3, was_in_flight=True)
    assert spent.fits(2, 36) and not spent.fits(2, 35)
