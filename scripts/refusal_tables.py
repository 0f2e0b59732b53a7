"""Print docs/RELIABILITY.md's bad-input tables from real runs: each case's one stderr line.

    python scripts/refusal_tables.py > /tmp/tables.md

Runs the bad-input tests (spec, evaluation data, merge and export cases) with
EVOMERGE_RECORD_REFUSALS set, then prints one markdown table per test file. Temporary folders in
the lines are shortened to DIR, so the tables do not change from run to run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_FILES = [
    "tests/test_bad_specs.py",
    "tests/evaluation/test_eval_dry_run.py",
    "tests/merge/test_merge_errors.py",
    "tests/test_hub_models.py",
]
TEMPORARY = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/\s']+")
STANDIN_HUB = re.compile(r"http://127\.0\.0\.1:\d+")  # the stand-in hub's port changes from run to run


def record(path: Path) -> None:
    env = os.environ | {"EVOMERGE_RECORD_REFUSALS": str(path)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *TEST_FILES]
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


def tables(path: Path) -> str:
    rows: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for raw in path.read_text().splitlines():
        entry = json.loads(raw)
        file, _, test = entry["test"].partition("::")
        line = STANDIN_HUB.sub("HF_ENDPOINT", TEMPORARY.sub("DIR", entry["line"]))
        line = line.replace(str(REPO), "REPO").replace("|", "\\|")
        rows[file].append((test, line))
    out = []
    for file in TEST_FILES:
        out += [f"\n`{file}`:\n", "| test | the one line on stderr |", "|---|---|"]
        out += [f"| `{test}` | `{line}` |" for test, line in rows.get(file, [])]
    return "\n".join(out) + "\n"


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "refusals.jsonl"
        record(path)
        print(tables(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
