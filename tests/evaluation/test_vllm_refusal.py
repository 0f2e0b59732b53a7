"""`evaluation.backend: vllm` without vLLM installed: `validate` refuses in one line that says how to install it."""

from __future__ import annotations

import importlib.util

import yaml
from refusals import assert_refused_in_one_line, run_cli_in_process
from scoring_fixtures import FIXTURES


def test_validate_says_how_to_install_vllm(zoo, tmp_path, monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "vllm" else found(name, *rest))
    spec = {
        "name": "vllm-missing",
        "runs_dir": str(tmp_path / "runs"),
        "models": {"base": zoo.model("base"), "experts": [zoo.model("ft_a"), zoo.model("ft_b")]},
        "merge": {"method": "ties"},
        "evaluation": {"include": [str(FIXTURES)], "tasks": ["tiny_add"], "limit": 8, "backend": "vllm"},
        "budget": {"max_evals": 10},
        "workers": {"count": 1, "device": "cpu"},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    code, lines = run_cli_in_process("validate", spec_path)
    assert_refused_in_one_line(code, lines, ["evaluation.backend", "vllm is not installed", "pip install"])
