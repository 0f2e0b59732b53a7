"""The fused GPU merge kernel, run on CPU by Triton's interpreter, against the reference path.

Task arithmetic and TIES must equal `merge_into_model` (itself equal to mergekit) bit for bit, in
float32 and bfloat16, with sources on the device or streamed from host memory in chunks. DARE's
masks come from another RNG, so it is checked by what a DARE trim must do: keep the density's
share, restore the L1 norm, repeat for a seed, and reduce to TIES when nothing is trimmed.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tiny_models import build_base, build_tokenizer, save_checkpoint, tiny_llama_config, with_deltas

pytest.importorskip("triton")

from evomerge.genome import Genome  # noqa: E402
from evomerge.merge.config import MergeConfig  # noqa: E402
from evomerge.merge.fused.candidate import CandidateMerger  # noqa: E402
from evomerge.merge.fused.sources import FlatLayout, FusedSources  # noqa: E402
from evomerge.merge.resident import ResidentSources, merge_into_model  # noqa: E402
from evomerge.spec import Spec  # noqa: E402

EXPERTS = ("ft_a", "ft_b", "ft_c")


# conftest.py sets TRITON_INTERPRET=1 on machines without CUDA; with CUDA the kernels compile and
# these tests run on the GPU.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("neither CUDA nor Triton's interpreter is available", allow_module_level=True)


def union(base: str, experts: list[str], dtype: str) -> MergeConfig:
    return MergeConfig.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "dtype": dtype,
            "models": [{"model": path, "parameters": {"weight": 1.0}} for path in experts],
        }
    )


def genome_candidate(base: str, experts: list[str], method: str, dtype: str, seed: int) -> MergeConfig:
    """A candidate as a search writes it: per layer group and attention/MLP, as `slices:`."""
    spec = Spec.model_validate(
        {
            "name": "fused",
            "models": {"base": base, "experts": experts},
            "merge": {"method": method, "dtype": dtype},
            "genome": {"layer_groups": 2, "split_attn_mlp": True},
            "evaluation": {"tasks": ["none"]},
        }
    )
    genome = Genome(spec, 4)
    x = np.random.default_rng(seed).uniform(-0.2, 1.0, genome.dim)
    return MergeConfig.model_validate(genome.to_merge_config(np.clip(x, genome.lower, genome.upper)))


def gradient_candidate(base: str, experts: list[str], method: str, dtype: str) -> MergeConfig:
    """Gradients, a negative weight, lambda and normalize off: the parameters most likely to go wrong."""
    return MergeConfig.model_validate(
        {
            "merge_method": method,
            "base_model": base,
            "dtype": dtype,
            "parameters": {"lambda": 0.9, "normalize": False},
            "models": [
                {"model": experts[0], "parameters": {"weight": [0.3, 1.2, 0.7], "density": [0.2, 0.9, 0.5]}},
                {"model": experts[1], "parameters": {"weight": 0.8, "density": 0.35}},
                {"model": experts[2], "parameters": {"weight": -0.4, "density": 1.0}},
            ],
        }
    )


def merged_by_reference(
    base: str, union_config: MergeConfig, candidate: MergeConfig, dtype: torch.dtype, seed: int = 0
):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(DEVICE)
    # The fused kernel keeps tied magnitudes in flat-index order: CUDA's order, on any device.
    merge_into_model(model, ResidentSources.load(union_config, device=DEVICE, tie_order="flat"), candidate, seed=seed)
    return dict(model.named_parameters())


def fused_merger(
    base: str, union_config: MergeConfig, method: str, dtype: torch.dtype, placement: str, chunk_bytes: int = 1 << 20
):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(DEVICE)
    fused = FusedSources.load(union_config, method, DEVICE, placement, chunk_bytes=chunk_bytes)
    return CandidateMerger.adopting(model, fused)


def assert_same_weights(merger: CandidateMerger, expected: dict) -> None:
    got = dict(merger.model.named_parameters())
    differing = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
@pytest.mark.parametrize("placement", ["device", "host"])
def test_fused_equals_reference_bit_for_bit(zoo, dtype_name, method, placement):
    dtype, config_dtype = (torch.float32, "float32") if dtype_name == "fp32" else (torch.bfloat16, "bfloat16")
    base, experts = zoo.model("base", dtype_name), [zoo.model(n, dtype_name) for n in EXPERTS]
    sources = union(base, experts, config_dtype)
    merger = fused_merger(base, sources, method, dtype, placement, chunk_bytes=60_000)
    if placement == "host":
        assert len(merger.fused._chunks) > 2, "the test must stream several chunks"
    for candidate in (
        gradient_candidate(base, experts, method, config_dtype),
        genome_candidate(base, experts, method, config_dtype, 1),
    ):
        merger.merge(candidate)
        assert merger.path == "fused" and merger.verified
        assert_same_weights(merger, merged_by_reference(base, sources, candidate, dtype))


@pytest.fixture(scope="module")
def tied_zoo(tmp_path_factory):
    """Deltas on a coarse grid: most magnitudes are tied, so the trim's cut falls inside ties."""
    root = tmp_path_factory.mktemp("tied_zoo")
    base = build_base(tiny_llama_config(), seed=0)
    tokenizer = build_tokenizer(64)
    save_checkpoint(base, tokenizer, root / "base", torch.float32)
    for index, name in enumerate(("x", "y")):
        generator = torch.Generator().manual_seed(10 + index)
        deltas = {
            key: torch.randint(-3, 4, value.shape, generator=generator).float() / 64
            for key, value in base.state_dict().items()
        }
        save_checkpoint(with_deltas(base, deltas), tokenizer, root / name, torch.float32)
    return root


@pytest.mark.parametrize("density", [0.1, 0.37, 0.5, 0.93])
def test_fused_trim_breaks_ties_like_the_reference(tied_zoo, density):
    base, experts = str(tied_zoo / "base"), [str(tied_zoo / "x"), str(tied_zoo / "y")]
    sources = union(base, experts, "float32")
    candidate = MergeConfig.model_validate(
        {
            "merge_method": "ties",
            "base_model": base,
            "dtype": "float32",
            "models": [
                {"model": path, "parameters": {"weight": 0.5 + i, "density": density}} for i, path in enumerate(experts)
            ],
        }
    )
    merger = fused_merger(base, sources, "ties", torch.float32, "device")
    merger.merge(candidate)
    assert merger.path == "fused"
    assert_same_weights(merger, merged_by_reference(base, sources, candidate, torch.float32))


def dare_candidate(base: str, experts: list[str], method: str, density: float, dtype: str = "float32") -> MergeConfig:
    return MergeConfig.model_validate(
        {
            "merge_method": method,
            "base_model": base,
            "dtype": dtype,
            "models": [
                {"model": path, "parameters": {"weight": 1.0 if i == 0 else 0.0, "density": density}}
                for i, path in enumerate(experts)
            ],
        }
    )


def test_fused_dare_without_trim_equals_the_reference(zoo):
    base, experts = zoo.model("base", "bf16"), [zoo.model(n, "bf16") for n in EXPERTS]
    sources = union(base, experts, "bfloat16")
    candidate = gradient_candidate(base, experts, "dare_ties", "bfloat16").model_dump(mode="json", exclude_none=True)
    for model in candidate["models"]:
        model["parameters"]["density"] = 1.0
    candidate = MergeConfig.model_validate(candidate)
    merger = fused_merger(base, sources, "dare_ties", torch.bfloat16, "device")
    merger.merge(candidate)
    assert_same_weights(merger, merged_by_reference(base, sources, candidate, torch.bfloat16))


@pytest.mark.parametrize("placement", ["device", "host"])
@pytest.mark.parametrize("density", [0.2, 0.6])
def test_fused_dare_keeps_density_and_restores_l1(tied_zoo, density, placement):
    """One expert at weight 1: merged - base is exactly its rescaled, trimmed delta."""
    base, experts = str(tied_zoo / "base"), [str(tied_zoo / "x"), str(tied_zoo / "y")]
    merger = fused_merger(
        base, union(base, experts, "float32"), "dare_linear", torch.float32, placement, chunk_bytes=60_000
    )
    merger.merge(dare_candidate(base, experts, "dare_linear", density), seed=5)
    resident = ResidentSources.load(union(base, experts, "float32"), device=DEVICE)
    kept_total = delta_total = 0
    for name, merged in merger.model.named_parameters():
        base_tensor, delta = (
            resident.tensors[(base, name)],
            resident.tensors[(experts[0], name)] - resident.tensors[(base, name)],
        )
        kept = merged.detach() - base_tensor
        nonzero = delta != 0
        kept_total += int((kept[nonzero] != 0).sum())
        delta_total += int(nonzero.sum())
        if delta.abs().sum() > 0 and kept.abs().sum() > 0:
            assert torch.allclose(kept.abs().sum(), delta.abs().sum(), rtol=1e-4), name
    share = kept_total / delta_total
    assert abs(share - density) < 5 * (density * (1 - density) / delta_total) ** 0.5


def test_fused_dare_is_reproducible_by_seed(zoo):
    base, experts = zoo.model("base", "fp32"), [zoo.model(n, "fp32") for n in EXPERTS]
    merger = fused_merger(base, union(base, experts, "float32"), "dare_ties", torch.float32, "device")
    candidate = gradient_candidate(base, experts, "dare_ties", "float32")
    snapshots = []
    for seed in (1, 1, 2):
        merger.merge(candidate, seed=seed)
        snapshots.append(merger.out.clone())
    assert torch.equal(snapshots[0], snapshots[1])
    assert not torch.equal(snapshots[0], snapshots[2])


def test_candidate_the_fused_sources_cannot_express_takes_the_reference_path(zoo):
    base, experts = zoo.model("base", "fp32"), [zoo.model(n, "fp32") for n in EXPERTS]
    sources = union(base, experts, "float32")
    merger = fused_merger(base, sources, "ties", torch.float32, "device")
    other_base = MergeConfig.model_validate(
        {
            "merge_method": "ties",
            "base_model": experts[0],
            "dtype": "float32",
            "models": [{"model": experts[1], "parameters": {"weight": 0.7, "density": 0.5}}],
        }
    )
    with pytest.raises(KeyError, match="not resident"):
        merger.merge(other_base)  # only base and deltas are resident: a clear error, no wrong weights
    candidate = gradient_candidate(base, experts, "ties", "float32")
    merger.merge(candidate)
    assert merger.path == "fused"
    assert_same_weights(merger, merged_by_reference(base, sources, candidate, torch.float32))


def test_a_fused_result_that_differs_switches_the_worker_to_the_reference_path(zoo, monkeypatch):
    base, experts = zoo.model("base", "fp32"), [zoo.model(n, "fp32") for n in EXPERTS]
    sources = union(base, experts, "float32")
    merger = fused_merger(base, sources, "ties", torch.float32, "device")
    real_launch = FusedSources.launch

    def off_by_an_ulp(self, prepared, out):
        real_launch(self, prepared, out)
        out[5] = torch.nextafter(out[5], torch.tensor(float("inf"), device=out.device))

    monkeypatch.setattr(FusedSources, "launch", off_by_an_ulp)
    candidate = gradient_candidate(base, experts, "ties", "float32")
    merger.merge(candidate)
    assert merger.path == "reference" and merger.fused is None
    assert_same_weights(merger, merged_by_reference(base, sources, candidate, torch.float32))


def test_non_finite_weights_are_named(zoo):
    base, experts = zoo.model("base", "fp32"), [zoo.model(n, "fp32") for n in EXPERTS]
    merger = fused_merger(base, union(base, experts, "float32"), "ties", torch.float32, "device")
    merger.merge(gradient_candidate(base, experts, "ties", "float32"))
    assert merger.first_non_finite() is None
    name = merger.fused.layout.names[3]
    merger.fused.layout.view(merger.out, 3).view(-1)[0] = float("nan")
    assert merger.first_non_finite() == name


def test_size_estimate_and_layout(zoo):
    base, experts = zoo.model("base", "bf16"), [zoo.model(n, "bf16") for n in EXPERTS]
    sources = union(base, experts, "bfloat16")
    fused = FusedSources.load(sources, "ties", DEVICE, "device")
    assert FusedSources.estimate_bytes(sources, "ties") == fused.byte_size()
    layout = FlatLayout.of(["a", "b", "c"], [(3, 700), (5,), (2048,)])
    assert layout.total == 3072 + 1024 + 2048  # 2100 elements take three 1024-element blocks
    runs = layout.chunks(3072)
    assert runs[0][0] == 0 and runs[-1][1] == 3 and all(a[1] == b[0] for a, b in zip(runs, runs[1:], strict=False))


def test_a_kernel_that_fails_on_the_first_candidate_falls_back_to_the_reference_path(zoo, monkeypatch):
    base, experts = zoo.model("base", "fp32"), [zoo.model(n, "fp32") for n in EXPERTS]
    sources = union(base, experts, "float32")
    merger = fused_merger(base, sources, "ties", torch.float32, "device")

    def does_not_compile(self, prepared, out):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(FusedSources, "launch", does_not_compile)
    candidate = gradient_candidate(base, experts, "ties", "float32")
    merger.merge(candidate)
    assert merger.path == "reference"
    assert_same_weights(merger, merged_by_reference(base, sources, candidate, torch.float32))
