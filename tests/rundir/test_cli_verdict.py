"""What the commands print about a finished run: the verdict `search` and `resume` end with, the
same advice sentence in `status`, and `export --merge OUT`, which exports and materializes at once."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evomerge.cli import app, print_summary
from evomerge.rundir.results import export_trial, load_trials
from evomerge.rundir.verdict import build_verdict

TESTS = Path(__file__).resolve().parents[1]
FROZEN_RUN = TESTS / "fixtures" / "runs" / "v0-cmaes"
sys.path.insert(0, str(TESTS))


def cli(*args) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def flat_run(tmp_path) -> Path:
    """A finished fake search whose candidates barely differ from the best parent."""
    from fake_workers import fake_scheduler, fake_spec_data, open_search

    from evomerge.search.runs import create_run_dir
    from evomerge.spec import parse_spec

    spec = parse_spec(fake_spec_data(tmp_path / "runs", "flat", budget={"max_evals": 19}), "spec", tmp_path)
    run_dir = create_run_dir(spec)
    open_search(spec, run_dir).run_with(fake_scheduler())
    return Path(run_dir)


def test_the_summary_shows_per_task_held_out_scores_margins_the_winner_and_its_export(flat_run, capsys):
    print_summary(flat_run)
    printed = capsys.readouterr().out
    events, trials = load_trials(flat_run)
    verdict = build_verdict(flat_run, events, trials)
    winner, _ = export_trial(flat_run)
    (winner_row,) = [line for line in printed.splitlines() if "winner: export gives this" in line]
    assert winner_row.split("│")[1].strip() == str(winner.trial_id)
    assert "tiny_choice" in printed, "a column per held-out task"
    for line in verdict.lines():
        assert line in printed
    assert f"winner: trial {winner.trial_id} " in printed
    assert f"evomerge export {flat_run} -o best.yaml" in printed
    assert "held-out margin over the best parent" in printed and " SE" in printed


def test_status_prints_the_same_advice_and_its_evals_per_minute_leave_out_the_baselines(flat_run):
    events, trials = load_trials(flat_run)
    advice = build_verdict(flat_run, events, trials).advice
    assert advice, "the fake candidates do not beat the parents by 1 SE"
    printed = cli("status", flat_run)
    assert advice in printed
    assert "(evolved candidates; the baseline phase excluded)" in printed
    assert f"export: evomerge export {flat_run} -o best.yaml" in printed


def test_export_merge_exports_and_materializes_the_winner_in_one_step(zoo, tmp_path):
    run_dir = shutil.copytree(FROZEN_RUN, tmp_path / "run")
    journal = run_dir / "journal.jsonl"
    text = journal.read_text()
    for frozen, ours in (("base", "base"), ("expert_a", "ft_a"), ("expert_b", "ft_b")):
        text = text.replace(f"/frozen-run/{frozen}", zoo.model(ours))
    journal.write_text(text)

    cli("export", run_dir, "--merge", tmp_path / "one-step", "-o", tmp_path / "best.yaml")
    cli("merge", tmp_path / "best.yaml", tmp_path / "two-steps")
    one, two = tmp_path / "one-step", tmp_path / "two-steps"
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    card = (one / "README.md").read_text()
    assert f"trial {export_trial(run_dir)[0].trial_id} of the run" in card

    cli("export", run_dir, "--merge", tmp_path / "no-yaml")  # without -o the YAML goes to a temporary file
    assert (tmp_path / "no-yaml" / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()


def test_the_summary_table_prints_names_that_look_like_rich_markup_as_they_are(tmp_path, capsys):
    from fake_workers import fake_scheduler, fake_spec_data, open_search

    from evomerge.search.runs import create_run_dir
    from evomerge.spec import parse_spec

    models = {"base": "/frozen-run/base", "experts": ["/frozen-run/expert[a]", "/frozen-run/[bold]b"]}
    data = fake_spec_data(tmp_path / "runs", "markup", budget={"max_evals": 12}, models=models)
    spec = parse_spec(data, "spec", tmp_path)
    run_dir = create_run_dir(spec)
    open_search(spec, run_dir).run_with(fake_scheduler())
    print_summary(run_dir)
    printed = capsys.readouterr().out
    assert "expert[a]" in printed and "[bold]b" in printed
