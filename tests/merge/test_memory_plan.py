"""The memory plan `evomerge validate` prints: placements, bytes per device, and the fix when nothing fits.

Unit cases plan real Llama shapes from headers built in memory; the CLI cases run `validate` over
header-only 7B and 70B folders (sparse files made like `truncate -s`), as a laptop would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from header_only import LLAMA_70B, MISTRAL_7B, llama_shapes, write_header_only_model
from search_zoo import FIXTURE_EVALS, char_tokenizer
from typer.testing import CliRunner

from evomerge.merge.io import ModelFolder, TensorInfo
from evomerge.merge.memory_plan import PlanRequest, parse_bytes, plan_memory
from evomerge.merge.methods import METHODS

GIB = 1024**3


def folder_of(shape: dict) -> ModelFolder:
    config, shapes = llama_shapes(shape)
    tensors = {name: TensorInfo(s, torch.bfloat16, Path("model.safetensors")) for name, s in shapes.items()}
    return ModelFolder(Path("/in-memory"), config.to_dict(), tensors)


def request(shape: dict, experts: int, method: str = "ties", **options) -> PlanRequest:
    return PlanRequest(folder_of(shape), experts, METHODS[method], torch.bfloat16, torch.bfloat16, **options)


def parameters(shape: dict) -> int:
    return sum(int(torch.Size(s).numel()) for s in llama_shapes(shape)[1].values())


def test_7b_ties_over_three_fine_tunes_fits_one_80gib_gpu_within_76gb():
    plan = plan_memory(request(MISTRAL_7B, 3, gpu_bytes=80 * GIB, gpus=8))
    device = plan.devices[0]
    assert plan.placement.value == "device" and plan.fits and plan.merge_path == "fused"
    assert plan.workers_per_node == 8 and plan.gpus_per_worker == 1
    # 2 (base) + 2 x 3 (deltas) bytes per parameter for the sources, 2 for the model, nothing per element else.
    assert abs(device.sources - 8 * parameters(MISTRAL_7B)) < 0.001 * device.sources
    assert abs(device.model - 2 * parameters(MISTRAL_7B)) < 0.001 * device.model
    assert device.tables < 0.05 * (device.sources + device.model)
    assert device.resident <= 76e9 and plan.bytes_per_device <= 80 * GIB


def test_the_plan_runs_no_more_workers_per_node_than_workers_count():
    assert plan_memory(request(MISTRAL_7B, 3, gpu_bytes=80 * GIB, gpus=8, gpu_workers=2)).workers_per_node == 2
    assert plan_memory(request(MISTRAL_7B, 3, gpu_bytes=80 * GIB, gpus=8, gpu_workers=20)).workers_per_node == 8


def test_7b_on_a_smaller_gpu_streams_its_sources_from_one_host_copy():
    plan = plan_memory(request(MISTRAL_7B, 3, gpu_bytes=40 * GIB, gpus=4))
    assert plan.placement.value == "host" and plan.fits
    assert plan.host_bytes_per_node > 50e9 and plan.devices[0].sources <= 1 * GIB
    assert plan.as_json()["sources_on"] == "host"


@pytest.mark.parametrize(("experts", "sources_on"), [(2, "device"), (3, "host")])
def test_70b_splits_over_eight_80gib_gpus(experts, sources_on):
    plan = plan_memory(request(LLAMA_70B, experts, gpus_per_worker=8, gpu_bytes=80 * GIB, gpus=8))
    summary = plan.as_json()
    assert summary["placement"] == "split" and summary["gpus_per_worker"] == 8 and summary["fits"]
    assert len(summary["devices"]) == 8 and summary["sources_on"] == sources_on
    assert summary["bytes_per_device"] <= 80 * GIB
    models = [device["model"] for device in summary["devices"]]
    assert max(models) < 1.3 * min(models), "layers are spread evenly"


def test_70b_on_one_gpu_per_worker_names_the_fix():
    plan = plan_memory(request(LLAMA_70B, 2, gpu_bytes=80 * GIB, gpus=8))
    assert not plan.fits and "workers.gpus_per_worker: 8" in plan.fix and "sources on the GPUs" in plan.fix


def test_more_gpus_per_worker_than_the_node_has_is_refused():
    plan = plan_memory(request(MISTRAL_7B, 2, gpus_per_worker=4, gpu_bytes=80 * GIB, gpus=2))
    assert not plan.fits and "at most 2" in plan.fix


def test_a_method_without_a_kernel_keeps_every_fine_tune_resident():
    fused = plan_memory(request(MISTRAL_7B, 2, "ties", gpu_bytes=80 * GIB)).devices[0].sources
    reference = plan_memory(request(MISTRAL_7B, 2, "breadcrumbs", gpu_bytes=80 * GIB)).devices[0].sources
    assert reference > 2 * fused


def test_cpu_workers_plan_the_reference_path_in_host_memory():
    plan = plan_memory(request(MISTRAL_7B, 1, gpu_bytes=None))
    assert plan.devices[0].device == "cpu" and plan.merge_path == "reference"


def test_the_plan_counts_the_bytes_the_fused_sources_hold(zoo):
    pytest.importorskip("triton")
    from shared_host_worker import union

    from evomerge.merge.fused.sources import FusedSources
    from evomerge.merge.io import inspect_model_folder

    base, experts = zoo.model("base", "bf16"), [zoo.model(n, "bf16") for n in ("ft_a", "ft_b", "ft_c")]
    planned = plan_memory(
        PlanRequest(
            inspect_model_folder(base, "base"), 3, METHODS["ties"], torch.bfloat16, torch.bfloat16, gpu_bytes=GIB
        )
    )
    assert planned.devices[0].sources == FusedSources.estimate_bytes(union(base, experts, "bfloat16"), "ties")


@pytest.mark.parametrize(("text", "expected"), [("80GiB", 80 * GIB), ("141 GB", 141 * 10**9), ("512MiB", 512 * 2**20)])
def test_memory_sizes_parse(text, expected):
    assert parse_bytes(text, "--gpu-memory") == expected


@pytest.mark.parametrize("text", ["lots", "80XB", "-3GB", "0GiB"])
def test_bad_memory_sizes_name_the_flag(text):
    with pytest.raises(ValueError, match="--gpu-memory: .* like 80GiB"):
        parse_bytes(text, "--gpu-memory")


# ---- evomerge validate over header-only folders -------------------------------------------------


@pytest.fixture(scope="module")
def header_only_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("header_only")
    tokenizer = char_tokenizer()
    zoo = {}
    for size, shape in (("7b", MISTRAL_7B), ("70b", LLAMA_70B)):
        names = ("base", "ft1", "ft2", "ft3")
        zoo[size] = [str(write_header_only_model(root / size / n, shape, f"{size}-{n}", tokenizer)) for n in names]
    return root, zoo


def validate(root: Path, models: list[str], *flags: str, workers: dict | None = None):
    from evomerge.cli import app

    spec = {
        "name": "plan",
        "models": {"base": models[0], "experts": models[1:]},
        "merge": {"method": "ties", "dtype": "bfloat16"},
        "evaluation": {"include": [str(FIXTURE_EVALS)], "tasks": ["tiny_add"], "limit": 4},
        "workers": workers or {"device": "cuda"},
    }
    spec_path = root / f"spec-{len(list(root.glob('spec-*')))}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    return CliRunner().invoke(app, ["validate", str(spec_path), *flags])


def test_validate_plans_a_header_only_7b_on_one_80gib_gpu(header_only_zoo):
    root, zoo = header_only_zoo
    assert Path(zoo["7b"][0], "model.safetensors").stat().st_blocks * 512 < 1 << 20, "the weights are a hole"
    result = validate(root, zoo["7b"], "--gpu-memory", "80GiB", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["placement"] == "device" and plan["gpus_per_worker"] == 1 and plan["fits"] is True
    assert plan["devices"][0]["resident"] <= 76e9 and plan["bytes_per_device"] <= 80 * GIB
    assert plan["search_docs_per_candidate"] == 4  # evaluation.limit: 4 of tiny_add's documents
    text = validate(root, zoo["7b"], "--gpu-memory", "80GiB")
    assert text.exit_code == 0 and "memory plan: device" in text.stdout and "fits" in text.stdout
    assert "(4 search documents per candidate)" in text.stdout.splitlines()[0]


def test_validate_plans_a_header_only_70b_split_over_eight_gpus(header_only_zoo):
    root, zoo = header_only_zoo
    workers = {"device": "cuda", "gpus_per_worker": 8}
    result = validate(root, zoo["70b"][:3], "--gpu-memory", "80GiB", "--gpus", "8", "--json", workers=workers)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["placement"] == "split" and plan["gpus_per_worker"] == 8 and plan["fits"] is True
    assert len(plan["devices"]) == 8 and plan["bytes_per_device"] <= 80 * GIB


def test_validate_refuses_a_plan_that_fits_nowhere_in_one_line(header_only_zoo):
    root, zoo = header_only_zoo
    result = validate(root, zoo["70b"][:3], "--gpu-memory", "80GiB", "--gpus", "8")
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "workers.gpus_per_worker: 8" in lines[0], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans for this machine's GPUs when it has some")
def test_validate_of_gpu_workers_on_a_machine_without_one_asks_for_the_gpu_size(header_only_zoo):
    root, zoo = header_only_zoo
    result = validate(root, zoo["70b"][:3])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: ") and "--gpu-memory" in result.stdout


@pytest.mark.parametrize(
    ("flags", "words"),
    [(["--gpu-memory", "lots"], ["--gpu-memory", "80GiB"]), (["--gpus", "8"], ["--gpus", "--gpu-memory"])],
)
def test_bad_plan_flags_are_one_line(header_only_zoo, flags, words):
    root, zoo = header_only_zoo
    result = validate(root, zoo["7b"], *flags)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, lines
    assert all(word in lines[0] for word in words), lines
