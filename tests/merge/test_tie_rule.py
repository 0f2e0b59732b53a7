"""The TIES trim's tie rule, and what it means for exactness.

The trim keeps exactly k = int(density*n) elements (`methods.magnitude_mask`); of the elements
tied at the threshold it keeps mergekit's choice on the merging device: torch's CPU argsort order
on CPU, flat-index order on CUDA and in the fused kernel. So:

* `evomerge merge` on CPU equals mergekit's CPU merge even where the cut splits equal magnitudes
  (bf16 deltas tie often; the zoo's fp32 grid region ties too);
* the model a search scores (fused kernel) and `evomerge merge` of the exported YAML in the flat
  order (what it writes on CUDA) are the same tensors, bit for bit.

test_exact_k.py checks the same on a zoo built so that every cut splits a tie.
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from test_merge_oracle import FILTERED_WEIGHT, FP32_RELATIVE_TOLERANCE, bf16_ulp, entry, evomerge_to_disk
from tiny_models import load_checkpoint_tensors

from evomerge.merge.config import load_merge_config
from evomerge.merge.engine import merge_to_disk
from evomerge.merge.io import LazyTensorReader
from evomerge.merge.methods import keep_count, magnitude_mask, top_k_masks, trim_threshold
from evomerge.merge.validate import validate_merge_config

TIED_CASES = {
    "ties-bf16-equal-weights": lambda z: {
        "merge_method": "ties",
        "base_model": z.model("base", "bf16"),
        "dtype": "bfloat16",
        "models": [entry(z, name, "bf16", weight=0.5, density=0.4) for name in ("ft_a", "ft_b", "ft_c")],
    },
    "ties-gradients-fp32": lambda z: {
        "merge_method": "ties",
        "base_model": z.model("base"),
        "dtype": "float32",
        "models": [
            entry(z, "ft_a", weight=[0.2, 0.8], density=[0.9, 0.3]),
            entry(z, "ft_b", weight=0.5, density=FILTERED_WEIGHT),
            entry(z, "ft_c", weight=0.4, density=0.5),
        ],
    },
}


@pytest.mark.parametrize("order", ["sort", "flat"])
def test_the_trim_keeps_exactly_k_when_the_threshold_is_tied(order):
    delta = torch.tensor([0.5, -0.25, 0.25, 0.25, -0.125, 0.0, 0.25, 1.0])
    # k = int(0.5 * 8) = 4: the 4th largest magnitude is 0.25, which four elements share; two of
    # them make k. Eight elements sort stably on CPU too (insertion sort), so both orders keep the
    # first two in flat order.
    assert trim_threshold(delta, 0.5) == 0.25 and keep_count(8, 0.5) == 4
    assert magnitude_mask(delta, 0.5, order).tolist() == [True, True, True, False, False, False, False, True]
    assert magnitude_mask(delta, 0.25, order).sum() == 2, "a unique threshold keeps exactly k"
    assert magnitude_mask(delta, 0.01, order).tolist() == [False] * 7 + [True], "at least one element survives"
    assert magnitude_mask(delta, 1.0, order).all()
    batched = top_k_masks([delta, delta.flip(0)], [0.5, 0.5], order)
    assert torch.equal(batched[0], magnitude_mask(delta, 0.5, order))
    assert torch.equal(batched[1], magnitude_mask(delta.flip(0), 0.5, order))


def threshold_ties(config_path) -> dict[str, torch.Tensor]:
    """Per output tensor, where some input's |delta| equals that input's trim threshold."""
    validated = validate_merge_config(load_merge_config(config_path))
    readers = {path: LazyTensorReader(folder) for path, folder in validated.folders.items()}
    tied = {}
    for plan in validated.plan.tensors:
        working = validated.working_dtype[plan.output]
        inputs = [readers[model].read(name).to(working) for model, name in plan.inputs]
        base = inputs[plan.base_index]
        mask = torch.zeros(base.shape, dtype=torch.bool)
        for index, params in enumerate(plan.per_input):
            if index != plan.base_index and params["density"] < 1:
                delta = inputs[index] - base
                mask |= delta.abs().float() == trim_threshold(delta, params["density"])
        tied[plan.output] = mask
    return tied


def beyond_tolerance(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Elements where `ours` is further from mergekit's than the oracle harness allows."""
    difference = (ours.double() - theirs.double()).abs()
    if theirs.dtype == torch.bfloat16:
        return difference > bf16_ulp(theirs)
    scale = max(float(theirs.double().abs().max()), 1e-30)
    return difference > scale * FP32_RELATIVE_TOLERANCE


@pytest.mark.parametrize("case", sorted(TIED_CASES))
def test_ties_equals_mergekit_where_magnitudes_equal_the_threshold(case, zoo, write_config, mergekit_merge, tmp_path):
    config_path = write_config(TIED_CASES[case](zoo))
    theirs = load_checkpoint_tensors(mergekit_merge(config_path, tmp_path / "mergekit"))
    ours = load_checkpoint_tensors(evomerge_to_disk(config_path, tmp_path / "evomerge"))
    tied = threshold_ties(config_path)
    assert sum(int(mask.sum()) for mask in tied.values()) > 0, "the case must put ties at the threshold"
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        outside = beyond_tolerance(ours[name], expected) & ~tied[name]
        assert not outside.any(), f"{name}: {int(outside.sum())} elements differ away from the threshold"
        at_ties = beyond_tolerance(ours[name], expected) & tied[name]
        assert not at_ties.any(), f"{name}: {int(at_ties.sum())} elements differ at the threshold"


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="no Triton backend"
)
@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_the_scored_merge_is_what_evomerge_merge_writes_from_the_export(zoo, tmp_path, dtype_name):
    pytest.importorskip("triton")
    from test_fused_merge import DEVICE, fused_merger, genome_candidate, union

    dtype, config_dtype = (torch.bfloat16, "bfloat16") if dtype_name == "bf16" else (torch.float32, "float32")
    base, experts = zoo.model("base", dtype_name), [zoo.model(n, dtype_name) for n in ("ft_a", "ft_b", "ft_c")]
    merger = fused_merger(base, union(base, experts, config_dtype), "ties", dtype, "device")
    candidate = genome_candidate(base, experts, "ties", config_dtype, seed=3)
    merger.merge(candidate)
    assert merger.path == "fused", "the search's path: the fused kernel"
    exported = tmp_path / "best.yaml"  # as `evomerge export` writes it: the journaled config as YAML
    exported.write_text(yaml.safe_dump(candidate.model_dump(mode="json", exclude_none=True), sort_keys=False))
    # The search ran on CUDA (or stands in for it): `evomerge merge --device cuda` keeps its tie order.
    merge_to_disk(load_merge_config(exported), tmp_path / "out", tie_order="flat", progress=False)
    written = load_checkpoint_tensors(tmp_path / "out")
    scored = {name: tensor.detach().to("cpu") for name, tensor in merger.model.named_parameters()}
    differing = [name for name in written if not torch.equal(written[name], scored[name])]
    assert DEVICE in ("cpu", "cuda") and not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
