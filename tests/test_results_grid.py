"""scripts/results_grid.py without searching: the per-cell spec, the overrides, the records and the tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import results_grid as grid  # scripts/ is on sys.path (conftest)

REPO = Path(__file__).resolve().parents[1]
DEMO_SPEC = REPO / "search_spaces" / "demo.yaml"


def args_for(tmp_path: Path, *overrides: str) -> argparse.Namespace:
    return grid.parse_args(["--max-evals", "30", "--out", str(tmp_path), *(f"--set={item}" for item in overrides)])


def test_cell_spec_uses_the_methods_default_space_and_applies_overrides_last(tmp_path):
    spec = grid.cell_spec(DEMO_SPEC, "demo", "della", 2, args_for(tmp_path, "evaluation.limit=60"))
    assert (spec.name, spec.merge.method, spec.optimizer.seed, spec.budget.max_evals) == (
        "demo-della-seed2",
        "della",
        2,
        30,
    )
    assert spec.genome.params is None and spec.searched_params == ["weight", "density", "lambda"]
    assert spec.evaluation.limit == 60 and Path(spec.runs_dir) == tmp_path.resolve()
    pinned = grid.cell_spec(DEMO_SPEC, "demo", "ties", 0, args_for(tmp_path, "genome.params=[weight]"))
    assert pinned.searched_params == ["weight"]


def test_a_method_list_is_a_method_gene_and_another_spec_of_the_zoo_runs_in_its_place(tmp_path):
    spec = grid.cell_spec(DEMO_SPEC, "demo", "ties+task_arithmetic", 1, args_for(tmp_path))
    assert spec.merge.methods == ["ties", "task_arithmetic"] and spec.name == "demo-ties-or-task_arithmetic-seed1"
    args = grid.parse_args(
        ["--zoo", "stacking", "--spec", str(REPO / "search_spaces" / "stacking_layers.yaml"), "--out", str(tmp_path)]
    )
    layers = grid.cell_spec(args.spec.resolve(), "stacking", "task_arithmetic", 0, args)
    assert layers.search.space == "layers" and layers.search.max_steps == 16
    with pytest.raises(SystemExit):
        grid.parse_args(["--methods", "ties+nonsense"])


def test_settings_the_method_cannot_take_are_dropped_with_a_note():
    data = {
        "merge": {"method": "task_arithmetic", "fixed": {"epsilon": 0.1, "lambda": 1.0}},
        "genome": {"params": ["weight", "density"], "bounds": {"density": [0.2, 0.8], "weight": [0, 1]}},
    }
    notes = grid.fit_to_method(data, "task_arithmetic")
    assert data["merge"]["fixed"] == {"lambda": 1.0}
    assert data["genome"] == {"bounds": {"weight": [0, 1]}}
    assert notes == [
        "task_arithmetic: dropped merge.fixed.epsilon",
        "task_arithmetic: dropped genome.bounds.density (not searched)",
    ]


def test_overrides_are_dotted_keys_with_yaml_values():
    data: dict = {"evaluation": {"limit": 120}}
    for item in ("evaluation.limit=60", "evaluation.fidelity={min: 0.25}", "workers.count=1"):
        grid.apply_override(data, *grid.parse_override(item))
    assert data == {"evaluation": {"limit": 60, "fidelity": {"min": 0.25}}, "workers": {"count": 1}}
    for bad in ("evaluation.limit", "=3", "a..b=1"):
        with pytest.raises(SystemExit):
            grid.parse_override(bad)


def record(method: str, seed: int, over_base: float | None) -> grid.CellRecord:
    return grid.CellRecord(
        **{"zoo": "demo", "method": method, "seed": seed, "max_evals": 30, "run_dir": "r", "fingerprint": "f"},
        **{"basis": "held-out", "evolved_trial": 9, "evolved_name": "evolved (seeded: parent:x)"},
        **{"evolved": [0.5, 0.01], "base": [0.1, 0.01], "baseline_label": "parent:x", "baseline": [0.4, 0.01]},
        **{"over_base_se": over_base, "over_baseline_se": 1.0, "reach": 4, "searched": 22, "failed": 0},
        **{"search_s": 20.0, "wall_s": None},
    )


def test_records_round_trip_and_a_torn_line_is_skipped(tmp_path):
    log = tmp_path / "grid.jsonl"
    grid.append_record(log, record("ties", 0, 1.5))
    grid.append_record(log, record("ties", 0, 3.0))  # a later line for the same cell wins
    with open(log, "a") as handle:
        handle.write(json.dumps(dataclasses.asdict(record("della", 1, 3.0)))[:40])
    assert grid.read_records(log) == {("demo", "ties", 0, "f"): record("ties", 0, 3.0)}


def test_tables_mark_two_se_over_the_base_as_a_pass():
    records = [record("ties", 0, 2.0), record("ties", 1, 1.9), record("della", 0, None)]
    cells = grid.cell_table(records).splitlines()
    assert cells[2].endswith("| 4 of 22 | 100 % | 0 | 20 | - | pass |") and "(trial 9, seeded: parent:x)" in cells[2]
    assert cells[3].endswith("| FAIL |") and cells[4].endswith("| FAIL |")
    summary = grid.method_table(records).splitlines()
    assert summary[2:] == ["| ties | 1 of 2 | +1.9 | 4 |", "| della | 0 of 1 | - | 4 |"]


@pytest.mark.long
def test_the_demo_search_reaches_95_percent_of_its_final_best_within_150_evaluations(tmp_path):
    """The step size on the demo's own spec (step size 0.07 of each gene's range): seed 0 under
    the generation barrier and pinned numerics asks and scores the same on every machine, so its
    reach is a fixed number (99-134 over seeds 0-2 in docs/RESULTS.md). Minutes: builds the demo zoo."""
    command = [sys.executable, str(REPO / "scripts" / "results_grid.py"), "--zoo", "demo"]
    command += ["--methods", "task_arithmetic", "--seeds", "0", "--max-evals", "300", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, cwd=REPO)
    (cell,) = grid.read_records(tmp_path / "grid.jsonl").values()
    assert cell.reach is not None and cell.reach <= 150
    assert cell.passed and cell.over_baseline_se is not None and cell.over_baseline_se >= 2
