"""The memory plan with `evaluation.backend: vllm`: the engine's copy of the weights, its KV cache and
activations on the worker's first device, and `evaluation.vllm.gpu_memory_utilization` beside the
resident sources. Arithmetic over header-only folders: no vLLM needed (validate is told it is there).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from header_only import MISTRAL_7B, llama_shapes, write_header_only_model
from refusals import assert_refused_in_one_line, run_cli_in_process
from search_zoo import FIXTURE_EVALS, char_tokenizer

from evomerge.errors import UserError
from evomerge.evaluation.config import EvaluationSpec
from evomerge.evaluation.vllm_memory import (
    KV_CACHE_BYTES,
    context_tokens,
    engine_bytes,
    engine_memory_arguments,
    kv_bytes_per_token,
    plan_for_backend,
)
from evomerge.merge.io import ModelFolder, TensorInfo
from evomerge.merge.memory_plan import PlanRequest, plan_memory
from evomerge.merge.methods import METHODS

GIB = 1024**3
TASKS = {"include": [str(FIXTURE_EVALS)], "tasks": ["tiny_add"], "limit": 4}


def mistral() -> ModelFolder:
    config, shapes = llama_shapes(MISTRAL_7B)
    tensors = {name: TensorInfo(s, torch.bfloat16, Path("model.safetensors")) for name, s in shapes.items()}
    return ModelFolder(Path("/in-memory"), config.to_dict(), tensors)


def request(experts: int, method: str = "ties", gpu_bytes: int = 80 * GIB) -> PlanRequest:
    return PlanRequest(mistral(), experts, METHODS[method], torch.bfloat16, torch.bfloat16, gpu_bytes=gpu_bytes, gpus=1)


def evaluation(**vllm) -> EvaluationSpec:
    return EvaluationSpec(**TASKS, backend="vllm", vllm=vllm or None)


def weight_bytes() -> int:
    return 2 * sum(math.prod(s) for s in llama_shapes(MISTRAL_7B)[1].values())


def test_the_engine_s_weights_kv_cache_and_activations_sit_on_the_worker_s_first_device():
    native = plan_memory(request(3))
    plan = plan_for_backend(request(3), evaluation())
    config = mistral().config
    engine = engine_bytes(config, weight_bytes(), 2, context_tokens(config, None), 80 * GIB)
    # Its own copy of the weights (in the merge dtype), a 1 GiB KV cache and a step's activations.
    assert (engine.weights, engine.kv_cache) == (weight_bytes(), KV_CACHE_BYTES)
    assert plan.devices[0].workspace == engine.total > native.devices[0].workspace
    assert native.placement.value == "device" and native.fits
    # Beside the engine the three experts' sources no longer fit the GPU: they stream from host memory.
    assert plan.placement.value == "host" and plan.fits
    assert any("vLLM engine" in note for note in plan.notes)


def test_the_kv_cache_holds_at_least_one_request_of_the_longest_length():
    config = mistral().config
    long = engine_bytes(config, weight_bytes(), 2, context_tokens(config, 32768), None)
    assert long.kv_cache == (32768 + 2) * kv_bytes_per_token(config, 2) > KV_CACHE_BYTES
    assert engine_bytes(config, weight_bytes(), 2, context_tokens(config, None), None).kv_cache == KV_CACHE_BYTES
    assert context_tokens(config, None) == config["max_position_embeddings"] + 2


def test_a_share_the_sources_leave_no_room_for_names_the_field_and_the_largest_that_fits():
    plan = plan_for_backend(request(1, "task_arithmetic"), evaluation(gpu_memory_utilization=0.9))
    assert not plan.fits
    assert plan.fix.startswith("evaluation.vllm.gpu_memory_utilization: 0.9")
    most = float(plan.fix.rsplit("at most ", 1)[1])
    assert 0.3 < most < 0.9
    assert plan_for_backend(request(1, "task_arithmetic"), evaluation(gpu_memory_utilization=most)).fits
    assert not plan_for_backend(request(1, "task_arithmetic"), evaluation(gpu_memory_utilization=most + 0.02)).fits


def test_a_share_too_small_for_the_engine_s_weights_is_refused_with_the_least_that_works():
    with pytest.raises(UserError) as refused:
        plan_for_backend(request(1, "task_arithmetic"), evaluation(gpu_memory_utilization=0.1))
    message = str(refused.value)
    assert message.startswith("evaluation.vllm.gpu_memory_utilization: 0.1") and "raise it to at least" in message
    least = float(message.split("at least ")[1].split()[0])
    assert plan_for_backend(request(1, "task_arithmetic"), evaluation(gpu_memory_utilization=least)).fits


def test_vllm_gets_the_planned_share_and_kv_cache():
    config, gpu = mistral().config, 80 * GIB
    planned = engine_bytes(config, weight_bytes(), 2, context_tokens(config, None), gpu)
    arguments = engine_memory_arguments(planned, gpu)
    assert arguments["kv_cache_memory_bytes"] == KV_CACHE_BYTES
    # vLLM checks this share is free when it starts: just what the engine needs, rounded up.
    assert planned.total <= arguments["gpu_memory_utilization"] * gpu < planned.total + gpu / 1000
    shared = engine_bytes(config, weight_bytes(), 2, context_tokens(config, None), gpu, 0.5)
    assert engine_memory_arguments(shared, gpu) == {"gpu_memory_utilization": 0.5}
    assert shared.total == int(0.5 * gpu)


def test_the_native_backend_s_plan_is_unchanged():
    assert plan_for_backend(request(3), EvaluationSpec(**TASKS)) == plan_memory(request(3))


# ---- evomerge validate over a header-only 7B ------------------------------------------------------


@pytest.fixture
def vllm_installed(monkeypatch):
    """validate's check that vLLM is importable passes; the plan itself never imports it."""
    found = importlib.util.find_spec
    present = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *rest: present if name == "vllm" else found(name, *rest)
    )


@pytest.fixture(scope="module")
def header_only_7b(tmp_path_factory):
    root = tmp_path_factory.mktemp("header_only_vllm")
    names = ("base", "ft1")
    return root, [str(write_header_only_model(root / n, MISTRAL_7B, f"7b-{n}", char_tokenizer())) for n in names]


def vllm_spec(root: Path, models: list[str], vllm: dict | None) -> Path:
    spec = {
        "name": "plan",
        "models": {"base": models[0], "experts": models[1:]},
        "merge": {"method": "task_arithmetic", "dtype": "bfloat16"},
        "evaluation": {**TASKS, "backend": "vllm", **({"vllm": vllm} if vllm else {})},
        "workers": {"device": "cuda"},
    }
    spec_path = root / f"spec-{len(list(root.glob('spec-*')))}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    return spec_path


def test_validate_refuses_a_share_that_does_not_fit_in_one_line(header_only_7b, vllm_installed):
    root, models = header_only_7b
    spec = vllm_spec(root, models, {"gpu_memory_utilization": 0.9})
    code, lines = run_cli_in_process("validate", spec, "--gpu-memory", "80GiB")
    assert_refused_in_one_line(code, lines, ["evaluation.vllm.gpu_memory_utilization: 0.9", "lower it to at most"])


def test_validate_refuses_a_share_that_leaves_no_kv_cache_in_one_line(header_only_7b, vllm_installed):
    root, models = header_only_7b
    spec = vllm_spec(root, models, {"gpu_memory_utilization": 0.1})
    code, lines = run_cli_in_process("validate", spec, "--gpu-memory", "80GiB")
    assert_refused_in_one_line(code, lines, ["evaluation.vllm.gpu_memory_utilization: 0.1", "raise it to at least"])


def test_validate_prints_the_engine_in_the_plan(header_only_7b, vllm_installed):
    from typer.testing import CliRunner

    from evomerge.cli import app

    root, models = header_only_7b
    spec = vllm_spec(root, models, None)
    result = CliRunner().invoke(app, ["validate", str(spec), "--gpu-memory", "80GiB", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["fits"] is True and plan["devices"][0]["workspace"] > weight_bytes() + KV_CACHE_BYTES
    text = CliRunner().invoke(app, ["validate", str(spec), "--gpu-memory", "80GiB"])
    assert "note: the vLLM engine is the scorer" in text.stdout


def test_a_spec_that_sets_no_engine_share_keeps_its_fingerprint():
    from evomerge.spec import parse_frozen_spec

    frozen = yaml.safe_load((Path(__file__).parents[1] / "fixtures/runs/v0-cmaes/spec.yaml").read_text())
    plain = parse_frozen_spec(frozen, "spec.yaml", Path("/tmp")).fingerprint()
    assert plain == "171a2d624136b02c"  # what runs of this spec journaled before evaluation.vllm existed
    frozen["evaluation"]["vllm"] = None
    assert parse_frozen_spec(frozen, "spec.yaml", Path("/tmp")).fingerprint() == plain
    frozen["evaluation"]["vllm"] = {"gpu_memory_utilization": 0.5}
    assert parse_frozen_spec(frozen, "spec.yaml", Path("/tmp")).fingerprint() != plain


@pytest.mark.parametrize("share", [0, 1.5, "half"])
def test_a_share_outside_zero_to_one_is_refused_in_one_line(header_only_7b, share):
    root, models = header_only_7b
    code, lines = run_cli_in_process("validate", vllm_spec(root, models, {"gpu_memory_utilization": share}))
    assert_refused_in_one_line(code, lines, ["evaluation.vllm.gpu_memory_utilization"])
