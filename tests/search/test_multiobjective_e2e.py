"""A 2-objective NSGA-II search on the bundled demo: a Pareto front of at least 3 points, any of
which exports and merges; its Optuna storage loads with optuna.load_study; and the demo run's
report renders in headless Chromium with no console errors and every image loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# The report's browser fixture lives beside the report tests; found by path so this file runs alone.
sys.path.insert(0, str(REPO / "tests" / "rundir"))
from test_report import browser, render  # noqa: E402, F401  (browser is a fixture)

pytestmark = pytest.mark.slow
EVOMERGE = str(Path(sys.executable).with_name("evomerge"))


def cli(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([EVOMERGE, *map(str, args)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def demo_zoo():
    sys.path.insert(0, str(REPO / "scripts"))
    import build_demo_zoo

    return build_demo_zoo.build_zoo(build_demo_zoo.DEFAULT_OUT)  # cached after the first build


@pytest.fixture(scope="module")
def pareto_run(tmp_path_factory, demo_zoo):
    tmp_path = tmp_path_factory.mktemp("pareto")
    spec = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())
    spec.update(name="pareto", runs_dir=str(tmp_path / "runs"))
    spec["models"] = {
        "base": str(demo_zoo / "base"),
        "experts": [str(demo_zoo / f"expert_{s}") for s in ("reverse", "increment", "rotate")],
    }
    spec["genome"] = {"params": ["weight"], "layer_groups": 2}
    spec["optimizer"] = {"name": "nsga2", "seed": 0, "popsize": 8}
    evaluation = spec["evaluation"]
    evaluation.update(include=[str(REPO / "evals" / "demo")], limit=60, heldout_tasks=[])
    evaluation["objectives"] = [
        {"name": "reverse", "tasks": ["demo_reverse_search"]},
        {"name": "increment", "tasks": ["demo_increment_search"]},
    ]
    spec["budget"] = {"max_evals": 40, "baselines": False}
    # One worker: NSGA-II proposes from the results told so far, so two workers racing would make the
    # front depend on which finished first (on a loaded machine, a different front).
    spec["workers"] = {**spec.get("workers", {}), "count": 1}
    spec_path = tmp_path / "pareto.yaml"
    spec_path.write_text(yaml.safe_dump(spec))

    cli("search", spec_path)
    return tmp_path, tmp_path / "runs" / "pareto"


def test_two_objective_search_gives_a_pareto_front_that_exports(pareto_run):
    tmp_path, run_dir = pareto_run
    front = json.loads(cli("status", run_dir, "--json").stdout)["pareto_front"]
    assert len(front) >= 3, front
    assert "objectives" in cli("export", run_dir, "--pareto").stdout
    chosen = front[len(front) // 2]["trial"]
    cli("export", run_dir, "--trial", chosen, "-o", tmp_path / "point.yaml")
    cli("merge", tmp_path / "point.yaml", tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists()

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.log")))
    study = optuna.load_study(study_name="evomerge", storage=storage)
    assert len(study.directions) == 2 and len(study.trials) == 40


def test_the_demo_runs_report_renders_in_chromium(pareto_run, browser):  # noqa: F811
    from evomerge.rundir.report import write_report

    _, run_dir = pareto_run
    page = render(browser, write_report(run_dir))
    assert page["errors"] == [] and page["loaded"] and page["count"] >= 3
