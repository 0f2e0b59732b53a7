"""Smoke tests for the benchmark scripts: each runs end to end in its tiny `--smoke` mode.

Timings are never asserted (they depend on the machine); what is checked is that every table row
the script promises is there and that the figures which do not depend on timing are right.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One checkpoint cache for bench_merge and bench_search, so the tiny models are built once."""
    return tmp_path_factory.mktemp("bench_cache")


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    finished = subprocess.run(
        [sys.executable, str(SCRIPTS / name), "--smoke", *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert finished.returncode == 0, f"{name} failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}"
    return finished.stdout


def table_rows(output: str, header_start: str) -> list[list[str]]:
    """Cells of the markdown table whose header line starts with `header_start`."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_bench_scheduler_smoke_runs_every_configuration():
    output = run_script("bench_scheduler.py")
    scaling = table_rows(output, "| workers |")
    assert [(row[0], row[1], row[2]) for row in scaling] == [("1", "2", "4"), ("2", "2", "8")]
    assert scaling[0][5] == "1.00"  # W=1 is its own reference
    assert all(0 < float(row[6]) <= 1 for row in scaling)  # busy share: slept time / (W x wall)
    overhead = table_rows(output, "| optimizer |")
    assert [(row[0], row[1]) for row in overhead] == [("cmaes", "12"), ("tpe", "12"), ("random", "12")]
    assert all(float(cell) >= 0 for row in overhead for cell in row[2:9])


def test_bench_merge_smoke_matches_mergekit_api(cache):
    output = run_script("bench_merge.py", "--device", "cpu", "--cache", str(cache))
    rows = {row[1]: row for row in table_rows(output, "| model |")}
    assert list(rows) == ["linear", "ties", "dare_ties"]
    # The mergekit API got the same per-tensor parameters, so deterministic merges agree.
    assert float(rows["linear"][10]) < 1e-2 and float(rows["ties"][10]) < 1e-2
    assert rows["dare_ties"][10] == "-"  # random masks differ between the two tools
    assert float(rows["linear"][11]) > 0  # mergekit-yaml ran (smoke times it for linear only)
    # Timings are printed, never asserted: a tiny smoke model can round to 0.00 ms.
    assert all(float(row[2]) >= 0 and float(row[3]) >= 0 for row in rows.values())


def test_bench_search_smoke_scores_candidates(cache):
    output = run_script("bench_search.py", "--device", "cpu", "--cache", str(cache))
    (row,) = table_rows(output, "| candidates timed |")
    assert row[0] == "2"
    wall, merge, evaluation = map(float, row[1:4])
    assert 0 <= merge <= wall and 0 <= evaluation <= wall
    assert 0 < float(row[4].rstrip("%")) < 100  # share outside evaluation
    assert "24 loglikelihood docs" in output
    assert 0 < float(row[11].rstrip("%")) <= 100  # derived GPU busy: a fraction of the wall time


def test_bench_eval_smoke_compares_every_contender(cache):
    output = run_script("bench_eval.py", "--device", "cpu", "--cache", str(cache))
    rows = table_rows(output, "| work |")
    contenders = [row[1] for row in rows]
    assert contenders[:3] == ["native", "lm_eval", "plain forward"]
    assert contenders[4:6] == ["native", "lm_eval"] and any(c.startswith("HF generate") for c in contenders[6:])
    assert any("(best HF)" in c for c in contenders)
    assert all(float(row[2]) > 0 for row in rows if row[2])
    # Each ratio is against the same run's reference, so the reference's own ratio is exactly 1.
    assert rows[1][5] == "1.00" and rows[2][4] == "1.00"


def test_device_check_script_parses_and_runs_the_three_gpu_steps():
    script = SCRIPTS / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for step in ("tests/merge/test_fused_merge.py", "scripts/bench_search.py", "scripts/bench_eval.py"):
        assert step in text
