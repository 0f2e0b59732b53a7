"""Tests for the search worker's evaluator: task resolution, the seeded doc subset,
repeatability, and that in-place weight updates are what gets scored.

The fixture tasks live in tests/fixtures/evals/: `tiny_add` (loglikelihood over 40
additions, relative data_files) and `tiny_choice` (the same data as multiple choice,
reached through `include:` and built with a `!function` process_docs).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scoring_fixtures import single_torch_thread  # noqa: F401 - an autouse fixture
from tiny_models import SPECIAL_TOKENS, build_base, tiny_llama_config
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from evomerge.errors import UserError
from evomerge.evaluation.config import EvalSet, EvaluationSpec
from evomerge.evaluation.evaluate import Evaluator, resolve_tasks, seeded_subset, weighted_score

TESTS_DIR = Path(__file__).resolve().parents[1]
FIXTURES = TESTS_DIR / "fixtures" / "evals"
FIXTURE_DATA = FIXTURES / "data" / "tiny.jsonl"
FIXTURE_DOCS = 40
CHARACTERS = "0123456789+= abcdefghijklmnopqrstuvwxyz"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: a BPE model with no merges never joins characters."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_model(seed: int):
    return build_base(tiny_llama_config(vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS)), seed=seed)


def fixture_settings(**changes) -> EvalSet:
    """The search set of an evaluation section: the fixture tasks, overridden by `changes`."""
    evaluation = {
        # perplexity varies continuously with the weights; fewshot exercises the fewshot seed.
        "tasks": [
            {"name": "tiny_add", "metric": "perplexity", "num_fewshot": 2},
            {"name": "tiny_choice", "weight": 3.0},
        ],
        "include": [str(FIXTURES)],
        "limit": 12,
        "batch_size": 8,
    }
    return EvaluationSpec.model_validate(evaluation | changes).eval_sets()["search"]


def build_evaluator(seed: int = 0, **changes) -> Evaluator:
    return Evaluator(build_model(seed), build_char_tokenizer(), fixture_settings(**changes))


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    return build_evaluator(seed=0)


def data_file_of(resolved, name: str) -> str:
    task = next(task for task in resolved.tasks if task.name == name)
    return task.overrides["dataset_kwargs"]["data_files"]["test"]


# ---------------------------------------------------------------- resolution


def test_relative_data_files_are_anchored_at_the_yaml_folder(tmp_path, monkeypatch):
    clone = tmp_path / "clone" / "evals"
    shutil.copytree(FIXTURES, clone)
    monkeypatch.chdir(tmp_path)

    resolved = resolve_tasks(fixture_settings(include=[str(clone)]))

    expected = str((clone / "data" / "tiny.jsonl").resolve())
    assert data_file_of(resolved, "tiny_add") == expected
    # tiny_choice inherits data_files through `include:`; it is anchored the same way.
    assert data_file_of(resolved, "tiny_choice") == expected


def test_unknown_task_names_the_closest_task():
    settings = fixture_settings(tasks=["tiny_add", "tiny_ad"])

    with pytest.raises(UserError) as caught:
        resolve_tasks(settings)

    message = str(caught.value)
    assert message.startswith("evaluation.tasks[1].name: unknown lm-eval task 'tiny_ad' (did you mean 'tiny_add'?); ")
    assert "evaluation.include" in message
    assert "\n" not in message


def test_a_held_out_task_error_names_the_held_out_field():
    evaluation = EvaluationSpec.model_validate(
        {"tasks": ["tiny_add"], "heldout_tasks": ["tiny_choice", "tiny_chioce"], "include": [str(FIXTURES)]}
    )
    with pytest.raises(UserError, match=r"^evaluation\.heldout_tasks\[1\]\.name: unknown lm-eval task 'tiny_chioce'"):
        resolve_tasks(evaluation.eval_sets()["heldout"])


def test_the_worker_gets_the_spec_s_own_task_models():
    evaluation = EvaluationSpec.model_validate({"tasks": ["tiny_add"], "heldout_tasks": ["tiny_choice"], "limit": 3})
    search, heldout = evaluation.eval_sets().values()
    assert search.tasks[0] is evaluation.tasks[0] and heldout.tasks[0] is evaluation.heldout_tasks[0]
    assert (search.limit, heldout.limit, search.evaluation) == (3, None, evaluation)


def test_a_bundled_task_reads_its_hub_dataset():
    (task,) = resolve_tasks(fixture_settings(tasks=["arc_easy"])).tasks
    (leaf,) = task.leaves
    assert (leaf.hub_dataset.path, leaf.hub_dataset.name) == ("allenai/ai2_arc", "ARC-Easy")


def test_a_tag_expands_to_its_tasks():
    (task,) = resolve_tasks(fixture_settings(tasks=["ai2_arc"])).tasks
    assert (task.kind.value, [leaf.name for leaf in task.leaves]) == ("tag", ["arc_challenge", "arc_easy"])


def test_missing_data_file_names_the_yaml_and_the_path(tmp_path):
    (tmp_path / "broken.yaml").write_text(
        (FIXTURES / "tiny_add.yaml").read_text().replace("data/tiny.jsonl", "data/nope.jsonl")
    )
    settings = fixture_settings(tasks=["tiny_add"], include=[str(tmp_path)])

    with pytest.raises(UserError) as caught:
        resolve_tasks(settings)

    message = str(caught.value)
    assert message.startswith("evaluation.tasks[0].name: ")
    assert str(tmp_path / "broken.yaml") in message
    assert str(tmp_path / "data" / "nope.jsonl") in message


def test_unknown_metric_lists_the_task_metrics():
    with pytest.raises(UserError) as caught:
        resolve_tasks(fixture_settings(tasks=[{"name": "tiny_choice", "metric": "accuracy"}]))

    message = str(caught.value)
    assert message.startswith("evaluation.tasks[0].metric: task 'tiny_choice' has no metric 'accuracy'")
    assert message.endswith("choose one of: acc, acc_norm")


def test_metric_may_name_its_filter():
    resolved = resolve_tasks(fixture_settings(tasks=[{"name": "tiny_add", "metric": "acc,none"}]))
    assert resolved.tasks[0].result_key == "acc,none"

    with pytest.raises(UserError, match="has no filter 'strict-match'; choose one of: none"):
        resolve_tasks(fixture_settings(tasks=[{"name": "tiny_add", "metric": "acc,strict-match"}]))


# ---------------------------------------------------------------- doc subset


def test_subset_has_limit_sorted_distinct_docs_chosen_by_seed(evaluator):
    subsets = evaluator.subset_indices()

    for indices in subsets.values():
        assert len(indices) == 12
        assert indices == sorted(set(indices))
        assert all(0 <= index < FIXTURE_DOCS for index in indices)
    # The task name is part of the seed, so tasks of one run get different subsets.
    assert subsets["tiny_add"] != subsets["tiny_choice"]
    assert seeded_subset(FIXTURE_DOCS, 12, 0, "tiny_add") == subsets["tiny_add"]
    assert seeded_subset(FIXTURE_DOCS, 12, 1, "tiny_add") != subsets["tiny_add"]


def test_subset_is_the_same_in_another_process(evaluator, tmp_path):
    script = (
        f"import json, sys; sys.path[:0] = [{str(Path(__file__).resolve().parent)!r}, {str(TESTS_DIR)!r}]; "
        "import torch; torch.set_num_threads(1); "
        "from test_evaluate import build_evaluator; "
        "print(json.dumps(build_evaluator(seed=7).subset_indices()))"
    )
    # Another hash seed, another working directory and other weights: none may matter.
    env = os.environ | {"PYTHONHASHSEED": "4242", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == evaluator.subset_indices()


def test_limit_above_the_dataset_scores_every_doc():
    evaluator = build_evaluator(limit=1000)

    assert evaluator.subset_indices()["tiny_choice"] == list(range(FIXTURE_DOCS))
    assert evaluator.evaluate().n_docs == {"tiny_add": FIXTURE_DOCS, "tiny_choice": FIXTURE_DOCS}


# ---------------------------------------------------------------- evaluation


def test_repeated_evaluation_gives_identical_results(evaluator):
    first = evaluator.evaluate()
    second = evaluator.evaluate()

    assert first.metrics == second.metrics
    assert first.score == second.score
    assert first.n_docs == second.n_docs == {"tiny_add": 12, "tiny_choice": 12}


def test_evaluation_does_not_reprocess_docs(evaluator, monkeypatch):
    import datasets

    original_map = datasets.Dataset.map
    calls = []

    def counting_map(self, *args, **kwargs):
        calls.append(args)
        return original_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", counting_map)
    evaluator.evaluate()

    # tiny_choice's process_docs maps the dataset; that belongs to __init__ only.
    assert calls == []


def test_evaluation_restores_the_global_random_states(evaluator):
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)

    evaluator.evaluate()

    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_in_place_weight_update_is_what_gets_scored():
    model = build_model(seed=0)
    other = build_model(seed=1)
    evaluator = Evaluator(model, build_char_tokenizer(), fixture_settings())
    before = evaluator.evaluate()

    with torch.no_grad():
        for parameter, replacement in zip(model.parameters(), other.parameters(), strict=True):
            parameter.data.copy_(replacement)
    after = evaluator.evaluate()
    fresh = Evaluator(other, build_char_tokenizer(), fixture_settings()).evaluate()

    assert after.metrics["tiny_add"] != before.metrics["tiny_add"]
    assert after.metrics == fresh.metrics
    assert after.score == fresh.score


def test_score_is_the_weighted_mean_of_the_task_metrics(evaluator):
    result = evaluator.evaluate()

    expected = (1.0 * result.metrics["tiny_add"] + 3.0 * result.metrics["tiny_choice"]) / 4.0
    assert result.score == pytest.approx(expected)
    assert weighted_score({"a": 0.5, "b": 1.0}, {"a": 1.0, "b": 3.0}) == pytest.approx(0.875)
