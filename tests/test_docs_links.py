"""Every file and command the user docs name exists: README.md and docs/*.md.

Paths under tests/, scripts/, docs/ and search_spaces/ must exist; each `evomerge COMMAND` (in code
spans and code blocks) must be a command the CLI registers; a test named with its file
(`tests/x.py::test_name`) must be defined there (the parser of test_reliability_doc.py, which also
checks docs/RELIABILITY.md's parameter ids).
"""

from __future__ import annotations

import re
from pathlib import Path

from test_reliability_doc import named_tests

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w./-])((?:tests|scripts|docs|search_spaces)/[\w./-]*\w/?)")
BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
SPAN = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"^\s*(?:\$ )?evomerge ([a-z][a-z-]*)", re.MULTILINE)  # a line or span that runs it


def named_paths(text: str) -> set[str]:
    return set(PATH.findall(text))


def named_commands(text: str) -> set[str]:
    """The word after `evomerge` where a code block's line or a code span starts by running it (prose
    says "evomerge finds", an error message "evomerge never")."""
    blocks = BLOCK.findall(text)
    spans = SPAN.findall(BLOCK.sub("", text))
    return {command for code in blocks + spans for command in COMMAND.findall(code)}


def registered_commands() -> set[str]:
    import typer

    from evomerge.cli import app

    return set(typer.main.get_command(app).commands)


def problems(text: str, registered: set[str]) -> list[str]:
    found = [f"{path}: no such file or folder" for path in sorted(named_paths(text)) if not (REPO / path).exists()]
    found += [f"evomerge {command}: no such command" for command in sorted(named_commands(text) - registered)]
    for file, test, _ in named_tests(text):
        path = REPO / file
        if test and path.is_file() and not re.search(rf"^(?:async )?def {test}\(", path.read_text(), re.MULTILINE):
            found.append(f"{file}::{test}: no such test")
    return found


def test_every_file_and_command_the_docs_name_exists():
    registered = registered_commands()
    assert {"search", "resume", "export", "validate"} <= registered
    texts = {doc.relative_to(REPO): doc.read_text() for doc in DOCS}
    assert sum(len(named_paths(text)) for text in texts.values()) > 30, "the parser found too few paths"
    assert sum(len(named_commands(text)) for text in texts.values()) > 5, "the parser found too few commands"
    missing = [f"{doc}: {problem}" for doc, text in texts.items() for problem in problems(text, registered)]
    assert not missing, "\n".join(missing)


def test_the_checker_catches_a_missing_file_command_and_test():
    text = (
        "See scripts/no_such_script.py and `tests/test_docs_links.py::test_nope`.\n"
        "```bash\nevomerge search spec.yaml\nevomerge frobnicate runs/x\n```\n"
        "evomerge finds merges; `evomerge export runs/x`; `error: ... evomerge never runs it`\n"
    )
    assert named_commands(text) == {"search", "frobnicate", "export"}
    assert problems(text, {"search", "export"}) == [
        "scripts/no_such_script.py: no such file or folder",
        "evomerge frobnicate: no such command",
        "tests/test_docs_links.py::test_nope: no such test",
    ]
