"""Every magnitude trim keeps exactly k = int(density*n) elements, on tensors built to tie at the cut.

The zoo here puts base weights on a 1/256 grid and deltas on a 1/64 grid with three magnitudes,
so the cut of any density falls inside a run of equal magnitudes, in fp32 and bf16 alike. On it:

* the trim keeps exactly k in both tie orders, mergekit's CPU order being its own argsort's;
* `evomerge merge` equals mergekit 0.1.5 tensor by tensor (fp32 bit for bit, bf16 within one
  step on >= 99.5 % of elements) for TIES, DARE-TIES and DELLA with fixed masks, breadcrumbs,
  the `slices` form and tied embeddings (`mergekit_equality.compare_with_mergekit`);
* every merged tensor changed exactly k elements, in evomerge, mergekit and the fused kernel;
* the fused kernel (Triton's interpreter on CPU) equals the reference path in its flat order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mergekit_equality import compare_with_mergekit
from tiny_models import build_base, build_tokenizer, load_checkpoint_tensors, save_checkpoint, tiny_llama_config

from evomerge.merge.fused.tables import ALL_TIED, MagnitudeTables
from evomerge.merge.methods import keep_count, magnitude_mask, magnitude_outliers_mask, top_k_masks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DENSITIES = (0.05, 0.3, 0.5, 0.77, 0.99)
SHAPES = ((7,), (16,), (33,), (64, 48), (3000,))


def tied_delta(shape, seed: int, dtype: torch.dtype, zeros: bool = False) -> torch.Tensor:
    """Whole multiples of 1/64 up to 3/64: three magnitudes (four with zeros), exact in bf16."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(1, 4, shape, generator=generator) * (torch.randint(0, 2, shape, generator=generator) * 2 - 1)
    if zeros:
        levels = levels * (torch.rand(shape, generator=generator) >= 0.2)
    return (levels.float() / 64).to(dtype)


def mergekit_kept(delta: torch.Tensor, density: float, gamma: float | None = None) -> torch.Tensor:
    sparsify = pytest.importorskip("mergekit.sparsify")
    if gamma is None:
        return sparsify.magnitude(delta, density) != 0
    return sparsify.magnitude_outliers(delta, density, gamma=gamma) != 0


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_the_trim_keeps_exactly_k_in_each_tie_order(dtype_name, shape):
    for seed, density in enumerate(DENSITIES):
        delta = tied_delta(shape, seed, DTYPES[dtype_name])
        k = keep_count(delta.numel(), density)
        magnitudes = delta.abs().float().reshape(-1)
        threshold = magnitudes.sort(descending=True).values[k - 1]
        above, tied = magnitudes > threshold, magnitudes == threshold
        for order in ("sort", "flat"):
            mask = magnitude_mask(delta, density, order).reshape(-1)
            assert int(mask.sum()) == k, (order, density)
            assert mask[above].all() and not mask[~above & ~tied].any()
        # "sort" is mergekit's own argsort on CPU; "flat" keeps the lowest flat indices of the tie.
        assert torch.equal(magnitude_mask(delta, density, "sort"), mergekit_kept(delta, density))
        flat = magnitude_mask(delta, density, "flat").reshape(-1)
        room = k - int(above.sum())
        assert torch.equal(flat[tied], torch.arange(int(tied.sum())) < room)


@pytest.mark.parametrize("order", ["sort", "flat"])
def test_batched_trim_equals_one_at_a_time(order):
    deltas = [tied_delta((40, 50), seed, torch.float32, zeros=True) for seed in range(3)]
    batched = top_k_masks(deltas, [0.4] * 3, order)
    assert all(torch.equal(b, magnitude_mask(d, 0.4, order)) for b, d in zip(batched, deltas, strict=True))
    assert all(int(b.sum()) == keep_count(2000, 0.4) for b in batched)


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.3])
def test_breadcrumbs_keeps_exactly_its_target_like_mergekit(dtype_name, gamma):
    for seed, density in enumerate(DENSITIES[:-1]):
        delta = tied_delta((64, 48), seed, DTYPES[dtype_name])
        mask = magnitude_outliers_mask(delta, density, gamma)
        assert int(mask.sum()) == int(density * delta.numel())
        assert torch.equal(mask, mergekit_kept(delta, density, gamma))


def test_magnitude_tables_give_each_cut_and_its_tied_count():
    deltas = [tied_delta((3000,), seed, torch.float32, zeros=True) for seed in range(2)]
    tables = MagnitudeTables(1, 2)
    for expert, delta in enumerate(deltas):
        tables.add(0, expert, delta)
    for density in DENSITIES:
        counts = np.array([[keep_count(3000, density), keep_count(3000, density / 2)]])
        thresholds, tied = tables.thresholds(counts)
        for expert, delta in enumerate(deltas):
            k, magnitudes = int(counts[0, expert]), delta.abs()
            assert thresholds[0, expert] == float(magnitudes.sort(descending=True).values[k - 1])
            taken = k - int((magnitudes > thresholds[0, expert]).sum())
            everything = taken == int((magnitudes == thresholds[0, expert]).sum())
            assert tied[0, expert] == (ALL_TIED if everything else taken)


# ---- whole merges over a zoo whose every tensor ties at the cut ---------------------------------

MEMBERS = {"x": (21, False), "y": (22, False), "z": (23, True)}  # name: (seed, with zero deltas)


def build_tied_zoo(root, tied_embeddings: bool = False) -> None:
    """base and fine-tunes x, y, z on the grids, in fp32 and bf16 (`root/NAME_DTYPE`)."""
    config = tiny_llama_config(hidden_size=64)
    config.tie_word_embeddings = tied_embeddings
    base = build_base(config, seed=5)
    tokenizer = build_tokenizer(config.vocab_size)
    with torch.no_grad():
        for tensor in base.parameters():
            tensor.copy_((tensor * 256).round().clamp(-200, 200) / 256)
    models = {"base": base}
    for name, (seed, zeros) in MEMBERS.items():
        model = build_base(config, seed=5)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for index, tensor in enumerate(model.parameters()):
                tensor.add_(tied_delta(tensor.shape, seed * 1000 + index, torch.float32, zeros))
        models[name] = model
    for name, model in models.items():
        for dtype_name, dtype in DTYPES.items():
            save_checkpoint(model, tokenizer, root / f"{name}_{dtype_name}", dtype)


@pytest.fixture(scope="module")
def tied_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact_k_zoo")
    build_tied_zoo(root)
    build_tied_zoo(root / "tied_embeddings", tied_embeddings=True)
    return root


def member(root, name: str, dtype_name: str = "fp32", **parameters) -> dict:
    return {"model": str(root / f"{name}_{dtype_name}"), "parameters": parameters}


def ties_config(root, dtype_name: str, method: str = "ties", **extra) -> dict:
    return {
        "merge_method": method,
        "base_model": str(root / f"base_{dtype_name}"),
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype_name],
        "models": [
            member(root, "x", dtype_name, weight=0.6, density=0.37, **extra),
            member(root, "y", dtype_name, weight=[0.2, 0.9], density=[0.5, 0.15], **extra),
            member(root, "z", dtype_name, weight=0.5, density=0.8, **extra),
        ],
    }


def slices_config(root) -> dict:
    def source(name, start, stop, **parameters):
        return {**member(root, name, **parameters), "layer_range": [start, stop]}

    return {
        "merge_method": "ties",
        "base_model": str(root / "base_fp32"),
        "dtype": "float32",
        "parameters": {"density": 0.45},
        "slices": [
            {"sources": [source("base", 0, 2), source("x", 0, 2, weight=0.7), source("y", 0, 2, weight=0.4)]},
            {
                "sources": [source("base", 2, 4), source("z", 2, 4, weight=1.0, density=0.61), source("y", 1, 3)],
                "parameters": {"normalize": False, "weight": 0.3},
            },
        ],
    }


# case: (config builder, fixed masks, bf16 math)
MERGEKIT_CASES = {
    "ties-fp32": (lambda r: ties_config(r, "fp32"), False),
    "ties-bf16": (lambda r: ties_config(r, "bf16"), False),
    "dare-ties-fixed-mask-fp32": (lambda r: ties_config(r, "fp32", "dare_ties"), True),
    "dare-ties-fixed-mask-bf16": (lambda r: ties_config(r, "bf16", "dare_ties"), True),
    "breadcrumbs-ties-fp32": (lambda r: ties_config(r, "fp32", "breadcrumbs_ties", gamma=0.04), False),
    "breadcrumbs-ties-bf16": (lambda r: ties_config(r, "bf16", "breadcrumbs_ties", gamma=0.04), False),
    "della-fixed-mask-fp32": (lambda r: ties_config(r, "fp32", "della", epsilon=0.1), True),
    "della-fixed-mask-bf16": (lambda r: ties_config(r, "bf16", "della", epsilon=0.1), True),
    "slices-ties-fp32": (slices_config, False),
    "ties-tied-embeddings-fp32": (lambda r: ties_config(r / "tied_embeddings", "fp32"), False),
}


@pytest.mark.parametrize("case", sorted(MERGEKIT_CASES))
def test_evomerge_merge_equals_mergekit_where_every_cut_ties(case, tied_zoo, write_config, tmp_path):
    pytest.importorskip("mergekit")
    build, fixed = MERGEKIT_CASES[case]
    config = build(tied_zoo)
    report = compare_with_mergekit(write_config(config), tmp_path, seed=3, fixed=fixed)
    if config["dtype"] == "float32":
        report.assert_bit_for_bit()
    else:
        report.assert_within_one_step(0.995)


def single_expert(root, dtype_name: str, density: float) -> dict:
    """TIES over one fine-tune without zero deltas: merged - base is exactly its trimmed delta."""
    config = ties_config(root, dtype_name)
    config["models"] = [member(root, "x", dtype_name, weight=1.0, density=density)]
    return config


def changed_counts(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: int((tensor.detach().cpu() != base[name]).sum()) for name, tensor in merged.items()}


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_every_merged_tensor_changes_exactly_k_elements(dtype_name, tied_zoo, write_config, mergekit_merge, tmp_path):
    from evomerge.merge.config import load_merge_config
    from evomerge.merge.engine import merge_to_disk

    density = 0.37
    config_path = write_config(single_expert(tied_zoo, dtype_name, density))
    base = load_checkpoint_tensors(tied_zoo / f"base_{dtype_name}")
    expected = {name: keep_count(tensor.numel(), density) for name, tensor in base.items()}
    for order in ("sort", "flat"):
        merge_to_disk(load_merge_config(config_path), tmp_path / order, tie_order=order, progress=False)
        assert changed_counts(load_checkpoint_tensors(tmp_path / order), base) == expected, order
    theirs = load_checkpoint_tensors(mergekit_merge(config_path, tmp_path / "mergekit"))
    assert changed_counts(theirs, base) == expected, "mergekit keeps k too"
    assert all(torch.equal(theirs[name], tensor) for name, tensor in load_checkpoint_tensors(tmp_path / "sort").items())


def fused_case(root, dtype_name: str, placement: str):
    """A fused merger over x, y, z and a TIES candidate whose every cut splits a tie."""
    pytest.importorskip("triton")
    from test_fused_merge import fused_merger, union

    from evomerge.merge.config import MergeConfig

    base, experts = str(root / f"base_{dtype_name}"), [str(root / f"{name}_{dtype_name}") for name in MEMBERS]
    config_dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype_name]
    sources = union(base, experts, config_dtype)
    merger = fused_merger(base, sources, "ties", DTYPES[dtype_name], placement, chunk_bytes=100_000)
    return merger, sources, MergeConfig.model_validate(ties_config(root, dtype_name))


# Each dtype once and each placement once: the interpreter takes ~15 s per case.
@pytest.mark.parametrize(("dtype_name", "placement"), [("fp32", "host"), ("bf16", "device")])
def test_fused_kernel_keeps_the_first_tied_elements_like_the_reference(dtype_name, placement, tied_zoo):
    from test_fused_merge import assert_same_weights, merged_by_reference

    merger, sources, candidate = fused_case(tied_zoo, dtype_name, placement)
    if placement == "host":
        assert len(merger.fused._chunks) > 2, "the test must stream several chunks"
    prepared = merger.prepare(candidate)
    assert all(table.split_ties for table, _ in prepared.fused), "every candidate cut must split a tie"
    merger.apply(prepared)
    assert merger.path == "fused" and merger.verified
    base = str(tied_zoo / f"base_{dtype_name}")
    assert_same_weights(merger, merged_by_reference(base, sources, candidate, DTYPES[dtype_name]))


def test_fused_kernel_keeps_exactly_k_and_the_tie_orders_differ(tied_zoo, tmp_path):
    from test_fused_merge import fused_merger, union

    from evomerge.merge.config import MergeConfig
    from evomerge.merge.engine import merge_to_disk

    base, expert = str(tied_zoo / "base_fp32"), str(tied_zoo / "x_fp32")
    merger = fused_merger(base, union(base, [expert], "float32"), "ties", torch.float32, "device")
    candidate = MergeConfig.model_validate(single_expert(tied_zoo, "fp32", 0.37))
    merger.merge(candidate)
    assert merger.path == "fused"
    fused = {name: tensor.detach().cpu() for name, tensor in merger.model.named_parameters()}
    base_tensors = load_checkpoint_tensors(base)
    assert changed_counts(fused, base_tensors) == {n: keep_count(t.numel(), 0.37) for n, t in base_tensors.items()}
    # The data discriminates: mergekit's CPU order keeps other tied elements than the flat order.
    merge_to_disk(candidate, tmp_path / "cpu", device="cpu", progress=False)
    by_sort = load_checkpoint_tensors(tmp_path / "cpu")
    assert any(not torch.equal(fused[name], tensor) for name, tensor in by_sort.items())
