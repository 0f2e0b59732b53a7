"""The evaluation settings of the spec: defaults, the run fingerprint, chat-template files.

Promises: runs started before these settings existed keep their fingerprint (they still resume),
while setting one away from its default changes it; fewshot_as_multiturn follows lm-eval's default
(on with a chat template); a chat template is found in any of the files transformers saves it to,
without building a tokenizer.
"""

from __future__ import annotations

import json

import pytest

from evomerge.evaluation.checks import has_chat_template
from evomerge.evaluation.config import EvaluationSpec
from evomerge.spec import Spec

SPEC = {
    "name": "fingerprint",
    "models": {"base": "/models/base", "experts": ["/models/a", "/models/b"]},
    "evaluation": {"tasks": ["tiny_add"]},
}


def spec_with(**evaluation) -> Spec:
    return Spec.model_validate(SPEC | {"evaluation": SPEC["evaluation"] | evaluation})


def test_new_settings_at_their_defaults_leave_the_fingerprint_alone():
    plain = spec_with()
    spelled_out = spec_with(
        backend="native",
        token_budget=None,
        apply_chat_template=False,
        system_instruction=None,
        fewshot_as_multiturn=None,
        heldout_fraction=None,
        tasks=[{"name": "tiny_add", "gen_kwargs": None}],
    )
    assert spelled_out.fingerprint() == plain.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"backend": "lm_eval"},
        {"token_budget": 4096},
        {"apply_chat_template": True},
        {"system_instruction": "be brief"},
        {"tasks": [{"name": "tiny_add", "gen_kwargs": {"until": ["\n"]}}]},
        {"heldout_fraction": 0.5},
    ],
)
def test_each_new_setting_away_from_its_default_changes_the_fingerprint(change):
    assert spec_with(**change).fingerprint() != spec_with().fingerprint()


def test_a_raced_run_started_before_successive_halving_keeps_its_fingerprint():
    raced = {"fidelity": {"rungs": [0.1, 0.3, 1.0], "z": 1.5}}
    assert spec_with(**raced).fingerprint() == "32304e8c675199a1"  # what the spec hashed to before `keep`
    assert spec_with(fidelity=raced["fidelity"] | {"keep": None}).fingerprint() == "32304e8c675199a1"
    assert spec_with(fidelity=raced["fidelity"] | {"keep": 0.34}).fingerprint() != "32304e8c675199a1"


def test_multiturn_few_shot_follows_the_chat_template_unless_set():
    assert EvaluationSpec(tasks=["t"]).multiturn_fewshot is False
    assert EvaluationSpec(tasks=["t"], apply_chat_template=True).multiturn_fewshot is True
    assert EvaluationSpec(tasks=["t"], apply_chat_template=True, fewshot_as_multiturn=False).multiturn_fewshot is False


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, False),
        ({"tokenizer_config.json": json.dumps({"eos_token": "</s>"})}, False),
        ({"tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"})}, True),
        ({"chat_template.jinja": "{{ messages }}"}, True),
        ({"chat_template.json": json.dumps({"chat_template": "{{ messages }}"})}, True),
        ({"tokenizer_config.json": "{not json"}, False),
    ],
)
def test_chat_template_is_found_in_the_tokenizer_files(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert has_chat_template(tmp_path) is expected
