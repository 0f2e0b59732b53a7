"""Loading a spec and the read-only commands (`status`, `report`, `export`) import neither torch nor Ray.

Each runs in a fresh interpreter under `python -X importtime`, whose report names every module
imported; none may be torch or Ray (or a module of theirs).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FROZEN_RUN = REPO / "tests" / "fixtures" / "runs" / "v0-cmaes"
HEAVY = {"torch", "ray"}


def imported_modules(stderr: str) -> set[str]:
    """The modules named by `-X importtime`'s report ('import time: self | cumulative | name')."""
    modules = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the report's header line
                modules.add(name)
    return modules


def heavy_imports(code: str) -> set[str]:
    """The torch and Ray modules that running `code` from this checkout imports."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    modules = imported_modules(run.stderr)
    assert "evomerge" in modules  # the report was read
    return {name for name in modules if name.split(".")[0] in HEAVY}


def test_the_importtime_report_is_read():
    report = "import time: self [us] | cumulative | imported package\nimport time:  5 |  9 |   torch.nn\n"
    assert imported_modules(report) == {"torch.nn"}


def test_loading_a_spec_imports_neither_torch_nor_ray(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: light\nmodels: {base: ./base, experts: [./a, ./b]}\nmerge: {method: della}\n"
        "evaluation: {tasks: [{name: arc_easy}]}\n"
    )
    code = f"from evomerge.spec import load_spec; print(load_spec({str(spec)!r}).searched_params)"
    assert heavy_imports(code) == set()


def test_a_spec_refused_by_validate_imports_neither_torch_nor_ray(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: light\nmodels: {base: ./base, experts: [./a]}\nmerge: {method: tie}\n")
    code = (
        "import sys\nfrom evomerge.cli import app\n"
        f"sys.argv = ['evomerge', 'validate', {str(spec)!r}]\n"
        "try:\n    app()\nexcept SystemExit as stop:\n    assert stop.code == 2, stop.code\n"
    )
    assert heavy_imports(code) == set()


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["report"], ["export"]])
def test_read_only_commands_import_neither_torch_nor_ray(tmp_path, command):
    run_dir = tmp_path / "run"
    shutil.copytree(FROZEN_RUN, run_dir)
    argv = ["evomerge", *command[:1], str(run_dir), *command[1:]]
    code = (
        "import sys\nfrom evomerge.cli import app\n"
        f"sys.argv = {argv!r}\n"
        "try:\n    app()\nexcept SystemExit as stop:\n    assert not stop.code, stop.code\n"
    )
    assert heavy_imports(code) == set()
