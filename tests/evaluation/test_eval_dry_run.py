"""Evaluation problems are caught on the driver, before any worker starts (evaluation/dry_run.py).

Each case breaks one task YAML, its data, its `!function` code or the base model's tokenizer, then
runs `evomerge search` (or `validate`) in-process and expects exit code 2, one stderr line naming
the task (or model field), the file and the fix, no run directory and no Ray. Before the dry run,
each of these passed `validate` and then killed every worker in turn for minutes. The model folders
hold garbage after their safetensors headers, so a command that read a weight first would fail
with a safetensors error instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from refusals import assert_refused_in_one_line, run_cli_in_process
from search_zoo import FIXTURE_EVALS
from tiny_models import write_corrupt_checkpoint

TINY_ADD = (FIXTURE_EVALS / "tiny_add.yaml").read_text()
TINY_CHOICE = (FIXTURE_EVALS / "tiny_choice.yaml").read_text()
TINY_DATA = (FIXTURE_EVALS / "data" / "tiny.jsonl").read_text()


def tiny_add_variant(**replacements: str) -> str:
    text = TINY_ADD.replace("task: tiny_add", "task: broken")
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def with_lines(edit) -> str:
    lines = TINY_DATA.splitlines()
    edit(lines)
    return "\n".join(lines) + "\n"


def drop_field_on_line(lines: list[str], index: int) -> None:
    lines[index] = lines[index].replace('"prompt"', '"question"')


# name -> (files written into a copy of the fixture evals folder, words the one stderr line must contain)
CASES = {
    "jinja-syntax-error": (
        {"broken.yaml": tiny_add_variant(**{'doc_to_text: "{{prompt}}"': 'doc_to_text: "{{prompt"'})},
        ["evaluation.tasks[0]", "'broken'", "broken.yaml", "doc_to_text is not a valid jinja template", "fix"],
    ),
    "empty-jsonl": (
        {"broken.yaml": tiny_add_variant(**{"data/tiny.jsonl": "data/empty.jsonl"}), "data/empty.jsonl": "\n"},
        ["evaluation.tasks[0]", "empty.jsonl", "is empty", "one json object per line"],
    ),
    "malformed-jsonl": (
        {
            "broken.yaml": tiny_add_variant(**{"data/tiny.jsonl": "data/torn.jsonl"}),
            "data/torn.jsonl": with_lines(lambda lines: lines.__setitem__(6, lines[6][:-3])),
        },
        ["evaluation.tasks[0]", "line 7 of", "torn.jsonl", "not valid json", "fix that line"],
    ),
    "jsonl-line-not-an-object": (
        {
            "broken.yaml": tiny_add_variant(**{"data/tiny.jsonl": "data/list.jsonl"}),
            "data/list.jsonl": with_lines(lambda lines: lines.__setitem__(2, "[1, 2]")),
        },
        ["line 3 of", "list.jsonl", "not an object"],
    ),
    "jsonl-missing-the-prompt-field": (
        {
            "broken.yaml": tiny_add_variant(**{"data/tiny.jsonl": "data/renamed.jsonl"}),
            "data/renamed.jsonl": TINY_DATA.replace('"prompt"', '"question"'),
        },
        ["evaluation.tasks[0]", "renamed.jsonl", "'prompt' is undefined", "doc_to_text"],
    ),
    "jsonl-missing-the-prompt-field-on-one-line": (
        {
            "broken.yaml": tiny_add_variant(**{"data/tiny.jsonl": "data/partial.jsonl"}),
            "data/partial.jsonl": with_lines(lambda lines: drop_field_on_line(lines, 11)),
        },
        ["line 12 of", "partial.jsonl", "no 'prompt'", "add the field"],
    ),
    "function-naming-a-missing-module": (
        {"broken.yaml": TINY_CHOICE.replace("task: tiny_choice", "task: broken").replace("utils.", "helpers.")},
        ["evaluation.tasks[0]", "broken.yaml", "!function", "helpers", "put the module next to the yaml"],
    ),
    "function-naming-a-missing-function": (
        {"broken.yaml": TINY_CHOICE.replace("task: tiny_choice", "task: broken").replace("add_choices", "nope")},
        ["evaluation.tasks[0]", "broken.yaml", "!function", "nope", "define the function"],
    ),
    "data-files-naming-a-folder": (
        {"broken.yaml": tiny_add_variant(**{"data/tiny.jsonl": "data"})},
        ["evaluation.tasks[0]", "data_files", "is a folder", "*.jsonl"],
    ),
}


@pytest.fixture(scope="module")
def models(zoo, tmp_path_factory) -> dict[str, str]:
    """Garbage-weight copies of the tiny zoo, and a base without any tokenizer file."""
    root = tmp_path_factory.mktemp("dry_run_models")
    for name in ("base", "ft_a", "ft_b"):
        write_corrupt_checkpoint(Path(zoo.model(name)), root / name)
        with (root / name / "model.safetensors").open("ab") as weights:
            weights.write(name.encode())  # distinct garbage: preflight refuses byte-identical models
    shutil.copytree(root / "base", root / "no_tokenizer")
    for path in (root / "no_tokenizer").iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab")):
            path.unlink()
    return {path.name: str(path) for path in root.iterdir()}


def write_spec(root: Path, models: dict, task: str = "broken", base: str = "base") -> Path:
    spec = {
        "name": "dry-run",
        "runs_dir": str(root / "runs"),
        "models": {"base": models[base], "experts": [models["ft_a"], models["ft_b"]]},
        "merge": {"method": "ties"},
        "genome": {"layer_groups": 2},
        "evaluation": {"include": [str(root / "evals")], "tasks": [task], "limit": 8},
        "budget": {"max_evals": 20},
        "workers": {"count": 1, "device": "cpu"},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root / "spec.yaml"


def evals_folder(root: Path, files: dict[str, str]) -> None:
    shutil.copytree(FIXTURE_EVALS, root / "evals")
    for name, text in files.items():
        (root / "evals" / name).write_text(text)


@pytest.mark.parametrize("case", list(CASES))
def test_a_task_that_would_kill_every_worker_is_refused_by_search_in_one_line(case, models, tmp_path):
    import ray

    files, expected = CASES[case]
    evals_folder(tmp_path, files)
    code, lines = run_cli_in_process("search", write_spec(tmp_path, models))
    assert_refused_in_one_line(code, lines, expected)
    assert not (tmp_path / "runs").exists(), "a run directory was created"
    assert not ray.is_initialized(), "Ray was started for a spec whose tasks cannot be built"


def test_validate_refuses_the_same_task(models, tmp_path):
    files, expected = CASES["jsonl-missing-the-prompt-field"]
    evals_folder(tmp_path, files)
    assert_refused_in_one_line(*run_cli_in_process("validate", write_spec(tmp_path, models)), expected)


def test_a_broken_held_out_task_is_named_as_one(models, tmp_path):
    files, _ = CASES["empty-jsonl"]
    evals_folder(tmp_path, files)
    spec_path = write_spec(tmp_path, models, task="tiny_add")
    spec = yaml.safe_load(spec_path.read_text())
    spec["evaluation"]["heldout_tasks"] = ["broken"]
    spec_path.write_text(yaml.safe_dump(spec))
    assert_refused_in_one_line(
        *run_cli_in_process("validate", spec_path), ["evaluation.heldout_tasks[0]", "empty.jsonl"]
    )


def test_a_base_model_without_a_tokenizer_is_refused_before_any_worker_starts(models, tmp_path):
    evals_folder(tmp_path, {})
    code, lines = run_cli_in_process("search", write_spec(tmp_path, models, task="tiny_add", base="no_tokenizer"))
    assert_refused_in_one_line(code, lines, ["models.base", "no_tokenizer", "tokenizer"])
    assert not (tmp_path / "runs").exists()


def test_good_tasks_rehearse_silently(models, tmp_path, capfd):
    """The fixture tasks (include:, !function process_docs, fewshot) pass, and print nothing."""
    evals_folder(tmp_path, {})
    spec_path = write_spec(tmp_path, models, task="tiny_add")
    spec = yaml.safe_load(spec_path.read_text())
    spec["evaluation"]["tasks"] = ["tiny_add", {"name": "tiny_choice", "num_fewshot": 2}]
    spec_path.write_text(yaml.safe_dump(spec))
    code, lines = run_cli_in_process("validate", spec_path)
    assert code == 0 and not lines, lines
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "Generating" not in captured.err, captured.err[-2000:]
