"""Records each refused input's one stderr line, so docs/RELIABILITY.md's tables are copied from real runs.

Off unless EVOMERGE_RECORD_REFUSALS names a file: then every bad-input test appends
{"test": node id, "line": the line} to it. `python scripts/refusal_tables.py` runs those tests
with it set and prints the markdown tables.
"""

from __future__ import annotations

import json
import os


def record_refusal(line: str) -> None:
    path = os.environ.get("EVOMERGE_RECORD_REFUSALS")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"test": test, "line": line}) + "\n")
