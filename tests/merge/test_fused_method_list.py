"""One set of fused sources for a search's method list, run on CPU by Triton's interpreter.

Each candidate's launch takes its own method's trim, sign consensus and rescale, so a candidate of
any fused method of the list merges as its own method's sources would merge it, in any order, and a
candidate of a method without a fused kernel takes the reference path over the same sources.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from test_fused_merge import (  # noqa: E402
    EXPERTS,
    assert_same_weights,
    fused_merger,
    gradient_candidate,
    merged_by_reference,
    union,
)

from evomerge.merge.config import MergeConfig  # noqa: E402
from evomerge.merge.fused.sources import FusedSources, NotFusable  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("neither CUDA nor Triton's interpreter is available", allow_module_level=True)

METHOD_LIST = ["ties", "task_arithmetic", "dare_ties"]
DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}


def snapshot(merger) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in merger.model.named_parameters()}


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_one_set_of_sources_merges_each_listed_method_like_the_reference(zoo, dtype_name):
    dtype, config_dtype = DTYPES[dtype_name]
    base, experts = zoo.model("base", dtype_name), [zoo.model(n, dtype_name) for n in EXPERTS]
    sources = union(base, experts, config_dtype)
    merger = fused_merger(base, sources, METHOD_LIST, dtype, "device")
    ties, arithmetic = (gradient_candidate(base, experts, m, config_dtype) for m in ("ties", "task_arithmetic"))
    merged = []
    for candidate in (ties, arithmetic, ties):  # A-B-A: nothing of one method's launch leaks into the next
        assert merger.prepare(candidate).fused is not None, "a listed fused method takes the fused path"
        merger.merge(candidate)
        assert merger.path == "fused"
        assert_same_weights(merger, merged_by_reference(base, sources, candidate, dtype))
        merged.append(snapshot(merger))
    assert all(torch.equal(merged[0][name], merged[2][name]) for name in merged[0])


def test_a_random_trim_in_the_list_draws_the_masks_of_its_own_sources(zoo):
    """DARE's masks come from the kernel's RNG: the list's sources must give what dare_ties' own give."""
    base, experts = zoo.model("base", "fp32"), [zoo.model(n, "fp32") for n in EXPERTS]
    sources = union(base, experts, "float32")
    dare = gradient_candidate(base, experts, "dare_ties", "float32")
    alone = fused_merger(base, sources, "dare_ties", torch.float32, "device")
    alone.merge(dare, seed=3)
    listed = fused_merger(base, sources, METHOD_LIST, torch.float32, "device")
    listed.merge(gradient_candidate(base, experts, "ties", "float32"))
    listed.merge(dare, seed=3)
    assert_same_weights(listed, snapshot(alone))


def test_a_method_without_a_fused_kernel_takes_the_reference_path(zoo):
    base, experts = zoo.model("base", "fp32"), [zoo.model(n, "fp32") for n in EXPERTS]
    sources = union(base, experts, "float32")
    merger = fused_merger(base, sources, ["ties", "della"], torch.float32, "device")
    della = gradient_candidate(base, experts, "della", "float32")
    with pytest.raises(NotFusable):
        merger.fused.parameters(merger.reference.plan_for(della), 0)
    assert merger.prepare(della).fused is None
    with pytest.raises(NotFusable):
        FusedSources.plan(sources, ["della"], DEVICE)


def test_the_list_holds_the_largest_need_and_the_plan_counts_it(zoo):
    from evomerge.merge.io import inspect_model_folder
    from evomerge.merge.memory_plan import PlanRequest, plan_memory
    from evomerge.merge.methods import METHODS

    base, experts = zoo.model("base", "bf16"), [zoo.model(n, "bf16") for n in EXPERTS]
    sources: MergeConfig = union(base, experts, "bfloat16")
    listed = FusedSources.load(sources, ["task_arithmetic", "ties"], DEVICE, "device")
    assert listed.trims_by_magnitude and listed._tie_experts() == len(EXPERTS)
    assert not FusedSources.load(sources, ["task_arithmetic", "dare_ties"], DEVICE, "device").trims_by_magnitude
    folder = inspect_model_folder(base, "base")
    # `evomerge validate` plans every listed method and keeps the most demanding plan.
    plans = [
        plan_memory(PlanRequest(folder, 3, METHODS[name], torch.bfloat16, torch.bfloat16, gpu_bytes=1 << 30))
        for name in METHOD_LIST
    ]
    largest = max(plans, key=lambda plan: plan.bytes_per_device)
    assert largest.devices[0].sources == FusedSources.estimate_bytes(sources, METHOD_LIST) == listed.byte_size()
    assert largest.devices[0].tables == plans[0].devices[0].tables  # the TIES tie counts
