"""docs/RELIABILITY.md names the test behind every promise; each test it names must exist.

Every backticked `tests/...py`, `tests/...py::test_name[ids]`, `::test_name` (in the file named just
before) and bare `test_name[ids]` (in the file named last, e.g. a table's heading) is resolved: the
file exists, the function is defined in it, and each listed parameter id appears in it.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "RELIABILITY.md"
TOKEN = re.compile(r"`([^`]+)`")
REFERENCE = re.compile(r"^(?P<file>tests/[\w/]+\.py)?(?:::)?(?P<test>test_\w+)?(?:\[(?P<ids>[^\]]*)\])?$")


def named_tests(text: str) -> list[tuple[str, str | None, list[str]]]:
    """(file, test or None, parameter ids) for every test reference, in document order."""
    found, current = [], None
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)  # code blocks hold no references
    for token in (token for line in prose.splitlines() for token in TOKEN.findall(line)):
        match = REFERENCE.match(token.strip())
        if match is None or not (match["file"] or (match["test"] and (token.startswith(("::", "test_"))))):
            continue
        current = match["file"] or current
        assert current is not None, f"{token!r} names no file and follows none"
        ids = [part.strip() for part in (match["ids"] or "").split(",") if part.strip() not in ("", "*")]
        found.append((current, match["test"], ids))
    return found


def test_every_test_reliability_md_names_exists():
    references = named_tests(DOC.read_text())
    assert len(references) > 50, "the parser found too few references"
    missing = []
    for file, test, ids in references:
        path = REPO / file
        if not path.is_file():
            missing.append(f"{file}: no such file")
            continue
        source = path.read_text()
        if test and not re.search(rf"^(?:async )?def {test}\(", source, re.MULTILINE):
            missing.append(f"{file}::{test}: no such test")
        missing += [f"{file}::{test}[{case}]: no such case" for case in ids if case not in source]
    assert not missing, "\n".join(missing)


def test_the_checker_catches_a_missing_test_and_a_missing_case():
    text = (
        "`tests/test_reliability_doc.py::test_nope` and `::test_every_test_reliability_md_names_exists[no-such-case]`"
    )
    references = named_tests(text)
    assert references == [
        ("tests/test_reliability_doc.py", "test_nope", []),
        ("tests/test_reliability_doc.py", "test_every_test_reliability_md_names_exists", ["no-such-case"]),
    ]
