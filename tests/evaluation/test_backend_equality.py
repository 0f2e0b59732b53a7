"""`evaluation.backend: native` against `lm_eval` (the reference) through the Evaluator, on CPU in float32.

Promise: identical per-doc results (loglikelihoods within 1e-5, the same greedy
flags, identical generated strings) and identical metrics, on the demo tasks, a multiple-choice
task, a generate_until task with stop strings and a regex filter, few-shot tasks, tasks scored with
a chat template, and a loglikelihood_rolling task. Discrete metrics (acc, exact_match) must be
equal; a perplexity-like metric is a smooth function of the loglikelihoods and agrees to 1e-6.
Also: native builds lm-eval's requests once, and is the default.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lm_eval.utils
import pytest
import torch
from scoring_fixtures import CHAT_TEMPLATE, FIXTURES, char_model, char_tokenizer, eval_set, single_torch_thread  # noqa: F401 - single_torch_thread is an autouse fixture

from evomerge.evaluation.backend import BackendName
from evomerge.evaluation.config import EvaluationSpec
from evomerge.evaluation.evaluate import Evaluator

REPO = Path(__file__).resolve().parents[2]
DISCRETE_METRICS = ("acc", "acc_norm", "exact_match")


@pytest.fixture(scope="module")
def model():
    return char_model(seed=3)


def both_backends(model, tokenizer, settings) -> dict[str, Evaluator]:
    return {backend: Evaluator(model, tokenizer, settings, backend=backend) for backend in ("native", "lm_eval")}


def assert_same_results(evaluators: dict[str, Evaluator]) -> dict[str, object]:
    """Evaluate both backends; compare every doc's answers and every metric. Returns native's result."""
    native, reference = evaluators["native"].evaluate(), evaluators["lm_eval"].evaluate()
    native_answers, reference_answers = evaluators["native"].responses(), evaluators["lm_eval"].responses()
    assert native_answers.keys() == reference_answers.keys()
    assert native.subtasks == reference.subtasks  # a group's or tag's leaves: the same scores and docs
    docs_of = native.n_docs | {leaf: n for part in native.subtasks.values() for leaf, n in part["n_docs"].items()}
    for task, docs in native_answers.items():
        assert len(docs) == len(reference_answers[task]) == docs_of[task]
        for doc, expected_doc in zip(docs, reference_answers[task], strict=True):
            for answer, expected in zip(doc, expected_doc, strict=True):
                assert_same_answer(answer, expected, task)
    for task, value in native.metrics.items():
        metric = evaluators["native"].eval_set.tasks[list(native.metrics).index(task)].metric.partition(",")[0]
        if metric in DISCRETE_METRICS:
            assert value == reference.metrics[task], task
        else:
            assert value == pytest.approx(reference.metrics[task], rel=1e-6), task
    return native


def assert_same_answer(answer, expected, task: str) -> None:
    if isinstance(expected, str):
        assert answer == expected, task
    elif isinstance(expected, tuple):  # (logprob, is_greedy)
        assert abs(answer[0] - expected[0]) < 1e-5, task
        assert answer[1] == expected[1], task
    else:  # a rolling total
        assert abs(answer - expected) < 1e-5, task


def test_multiple_choice_and_few_shot_loglikelihood(model):
    settings = eval_set(
        [{"name": "tiny_choice", "metric": "acc"}, {"name": "tiny_add", "metric": "perplexity", "num_fewshot": 2}],
        limit=30,
    )
    assert_same_results(both_backends(model, char_tokenizer(), settings))


def test_generate_until_with_stop_strings_regex_filter_and_few_shot(model):
    # tiny_generate: stop strings "+" and " a", 3 few-shot examples, filters strict-match (regex) and whole.
    settings = eval_set([{"name": "tiny_generate", "metric": "exact_match,strict-match"}])
    evaluators = both_backends(model, char_tokenizer(), settings)
    assert_same_results(evaluators)
    answers = [doc[0] for doc in evaluators["native"].responses()["tiny_generate"]]
    # The fixture is only a test of stop strings if some generations were cut by one.
    assert min(map(len, answers)) < 10 < 1 + max(map(len, answers))


def test_generation_overrides_from_the_spec(model):
    settings = eval_set([{"name": "tiny_generate", "metric": "exact_match,whole", "gen_kwargs": {"until": ["k"]}}])
    evaluators = both_backends(model, char_tokenizer(), settings)
    assert_same_results(evaluators)
    assert not any("k" in doc[0] for doc in evaluators["native"].responses()["tiny_generate"])


def test_chat_template_with_system_instruction_and_multiturn_few_shot(model):
    settings = eval_set(
        [
            {"name": "tiny_add", "metric": "acc", "num_fewshot": 2},
            {"name": "tiny_generate", "metric": "exact_match,strict-match"},
        ],
        limit=20,
        apply_chat_template=True,
        system_instruction="add the numbers",
        fewshot_as_multiturn=True,
    )
    evaluators = both_backends(model, char_tokenizer(CHAT_TEMPLATE), settings)
    assert_same_results(evaluators)
    prompt = evaluators["native"]._tasks["tiny_add"].instances[0].args[0]
    assert prompt.startswith("s add the numbers u ") and prompt.endswith(" a ")


def test_loglikelihood_rolling_over_several_windows(model):
    settings = eval_set([{"name": "tiny_rolling", "metric": "word_perplexity"}], max_length=8)
    evaluators = both_backends(model, char_tokenizer(), settings)
    assert_same_results(evaluators)
    assert min(len(windows) for windows in evaluators["native"].requests.rolling) >= 2


def test_a_group_of_tasks_aggregated_without_size_weights(model, tmp_path):
    (tmp_path / "tiny_mixed.yaml").write_text(
        "group: tiny_mixed\ntask: [tiny_choice, tiny_generate]\n"
        "aggregate_metric_list: [{metric: exact_match, filter_list: [whole], weight_by_size: false}]\n"
    )
    settings = eval_set(
        [{"name": "tiny_mixed", "metric": "exact_match"}, "tiny_add"],
        include=[str(FIXTURES), str(tmp_path)],
        limit=15,
    )
    native = assert_same_results(both_backends(model, char_tokenizer(), settings))
    assert native.subtasks["tiny_mixed"]["weighting"] == "equal"
    assert list(native.subtasks["tiny_mixed"]["metrics"]) == ["tiny_generate"]  # tiny_choice has no exact_match


@pytest.fixture(scope="module")
def quick_demo_zoo(tmp_path_factory) -> Path:
    script = importlib.util.spec_from_file_location("build_demo_zoo", REPO / "scripts" / "build_demo_zoo.py")
    build_demo_zoo = importlib.util.module_from_spec(script)
    script.loader.exec_module(build_demo_zoo)
    return build_demo_zoo.build_zoo(tmp_path_factory.mktemp("demo_zoo"), quick=True, threads=1, check=False)


def test_demo_tasks(quick_demo_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = quick_demo_zoo / "expert_reverse"
    expert = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    demo = EvaluationSpec(
        include=[str(REPO / "evals" / "demo")],
        tasks=["demo_reverse_search", "demo_increment_search", "demo_rotate_search"],
        limit=40,
        batch_size=16,
    ).eval_sets()["search"]
    evaluators = both_backends(expert, AutoTokenizer.from_pretrained(folder), demo)
    native = assert_same_results(evaluators)
    assert native.score == evaluators["lm_eval"].evaluate().score


def test_native_builds_requests_and_renders_docs_once(model, monkeypatch):
    settings = eval_set([{"name": "tiny_choice"}, {"name": "tiny_generate", "metric": "exact_match,whole"}], limit=8)
    evaluator = Evaluator(model, char_tokenizer(), settings)
    first = evaluator.evaluate()

    def rebuilt(*args, **kwargs):
        raise AssertionError("requests rebuilt or re-tokenized for a candidate")

    for task in evaluator._tasks.values():
        monkeypatch.setattr(task, "build_all_requests", rebuilt)
    monkeypatch.setattr(evaluator._lm, "tok_encode", rebuilt)
    monkeypatch.setattr(evaluator._lm, "tok_batch_encode", rebuilt)
    # process_results asks for each doc's target and choices again: rendered once, not per candidate.
    monkeypatch.setattr(lm_eval.utils, "apply_template", rebuilt)

    again = evaluator.evaluate()
    assert (again.score, again.metrics, again.n_docs) == (first.score, first.metrics, first.n_docs)


def test_native_is_the_default_backend(model):
    assert EvaluationSpec(tasks=["tiny_add"]).backend is BackendName.NATIVE
    evaluator = Evaluator(model, char_tokenizer(), eval_set([{"name": "tiny_add"}], limit=4))
    assert evaluator.backend is BackendName.NATIVE and evaluator.requests is not None
