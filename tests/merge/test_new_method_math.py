"""The geometric and element-selecting methods' tensor math against mergekit 0.1.5's own kernels.

Each case merges random tensors of one shape with evomerge's pure function and with mergekit's
registered method (called in-process on one TensorGroup, as `mergekit-yaml` runs each weight), and
requires the same bits, in float32 and in bfloat16. The shapes cover a matrix, a 1-D tensor
(norms, biases) and a 49152x64 embedding-like matrix of more than 2**20 elements, where anything
chunked or sampled would show. Inputs are a base plus sparse small deltas, so that thresholds
(NearSwap's t, RAM's epsilon, SCE's top-k) select some elements and not others.

The checkpoint cases then merge the tiny zoo with mergekit's `run_merge` (what `mergekit-yaml`
runs) and apply the same functions to every tensor, which pins down what a registry must feed
them: the input order, karcher's treatment of the base as one more input, and the float32 files
mergekit writes for Arcee Fusion and RAM+ from bfloat16 sources.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import methods_geometric as geometric
from evomerge.merge import methods_selective as selective

merge_methods = pytest.importorskip("mergekit.merge_methods")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

SHAPES = [(64, 48), (48,), (49152, 64)]
DTYPES = [torch.float32, torch.bfloat16]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    integer = {2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(integer)


def assert_same_bits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (ours.shape, ours.dtype, theirs.dtype)
    differing = int((_bits(ours) != _bits(theirs)).sum())
    assert differing == 0, f"{differing} of {theirs.numel()} elements differ"


def make_tensors(shape, count: int, dtype: torch.dtype, seed: int = 0, zero_share: float = 0.3):
    """A base and `count` inputs = base + deltas, a share of each delta exactly zero."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    inputs = []
    for _ in range(count):
        delta = 0.02 * torch.randn(shape, generator=generator)
        delta[torch.rand(shape, generator=generator) < zero_share] = 0
        inputs.append(base + delta)
    return base.to(dtype), [tensor.to(dtype) for tensor in inputs]


def mergekit_kernel(name: str, inputs, base=None, **parameters) -> torch.Tensor:
    """mergekit's registered method on one group: the base first, as mergekit-yaml lists it."""
    tensors = ([base] if base is not None else []) + list(inputs)
    group = TensorGroup.from_tensors(tensors, base_index=0 if base is not None else None)
    (result,) = merge_methods.get(name)([group], parameters=parameters)
    return result


cases = pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
shapes = pytest.mark.parametrize("shape", SHAPES, ids=["matrix", "vector", "embedding"])


@cases
@shapes
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(shape, dtype, filter_wise):
    base, inputs = make_tensors(shape, 3, dtype)
    ours = geometric.model_stock(base, inputs, filter_wise=filter_wise)
    assert_same_bits(ours, mergekit_kernel("model_stock", inputs, base, filter_wise=filter_wise))


def test_model_stock_keeps_the_base_where_inputs_cancel():
    base = torch.zeros(4, 3)
    delta = torch.randn(4, 3)
    inputs = [base + delta, base - delta]
    ours = geometric.model_stock(base, inputs, filter_wise=True)
    assert_same_bits(ours, mergekit_kernel("model_stock", inputs, base, filter_wise=True))
    assert torch.equal(ours, base)


@cases
@shapes
@pytest.mark.parametrize("select_topk", [1.0, 0.3])
@pytest.mark.parametrize("int8_mask", [False, True])
def test_sce(shape, dtype, select_topk, int8_mask):
    base, inputs = make_tensors(shape, 3, dtype)
    ours = selective.sce(base, inputs, select_topk=select_topk, int8_mask=int8_mask)
    theirs = mergekit_kernel("sce", inputs, base, select_topk=select_topk, int8_mask=int8_mask)
    assert_same_bits(ours, theirs)


def test_sce_with_no_change_weighs_inputs_equally():
    base = torch.randn(8, 8)
    inputs = [base.clone(), base.clone()]
    assert_same_bits(
        selective.sce(base, inputs, select_topk=0.5), mergekit_kernel("sce", inputs, base, select_topk=0.5)
    )


@cases
@shapes
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no_base"])
@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
def test_nuslerp(shape, dtype, with_base, flatten, row_wise):
    base, inputs = make_tensors(shape, 2, dtype)
    weights = [0.3, 0.9]
    ours = geometric.nuslerp(inputs, weights, base if with_base else None, row_wise=row_wise, flatten=flatten)
    theirs = mergekit_kernel(
        "nuslerp",
        inputs,
        base if with_base else None,
        weight=weights,
        nuslerp_flatten=flatten,
        nuslerp_row_wise=row_wise,
    )
    assert_same_bits(ours, theirs)


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.5, 0.5]], ids=["cancelling", "equal"])
def test_nuslerp_of_parallel_inputs_is_linear(weights):
    first = torch.randn(16, 8)
    inputs = [first, 2 * first]
    assert_same_bits(geometric.nuslerp(inputs, weights), mergekit_kernel("nuslerp", inputs, weight=weights))


@cases
@shapes
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no_base"])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp(shape, dtype, with_base, normalize_weights):
    base, inputs = make_tensors(shape, 3, dtype)
    weights = [0.5, 0.2, 0.6]
    anchor = base if with_base else None
    ours = geometric.multislerp(inputs, weights, anchor, normalize_weights=normalize_weights)
    theirs = mergekit_kernel("multislerp", inputs, anchor, weight=weights, normalize_weights=normalize_weights)
    assert_same_bits(ours, theirs)


def test_multislerp_of_balanced_antipodes():
    first = torch.randn(6, 5)
    two = [first, -first]
    assert_same_bits(geometric.multislerp(two, [1.0, 1.0]), mergekit_kernel("multislerp", two, weight=[1.0, 1.0]))
    three = [first, -first, torch.zeros_like(first)]
    with pytest.raises(ValueError):
        geometric.multislerp(three, [1.0, 1.0, 0.0])
    with pytest.raises(ValueError):
        mergekit_kernel("multislerp", three, weight=[1.0, 1.0, 0.0])


def test_multislerp_of_one_input_is_that_input():
    base, inputs = make_tensors((5, 4), 1, torch.float32)
    assert geometric.multislerp(inputs, [0.7], base) is inputs[0]


@cases
@shapes
def test_karcher(shape, dtype):
    _, inputs = make_tensors(shape, 3, dtype, zero_share=0.0)
    # Spread the directions so that the iteration takes several steps.
    inputs = [tensor + 0.5 * index * torch.ones_like(tensor) for index, tensor in enumerate(inputs)]
    assert_same_bits(geometric.karcher(inputs), mergekit_kernel("karcher", inputs))


def test_karcher_with_a_zero_input_and_few_steps():
    _, inputs = make_tensors((32, 16), 2, torch.float32)
    inputs.append(torch.zeros_like(inputs[0]))
    ours = geometric.karcher(inputs, max_iter=2, tol=1e-3)
    assert_same_bits(ours, mergekit_kernel("karcher", inputs, max_iter=2, tol=1e-3))
    zeros = [torch.zeros(3, 3), torch.zeros(3, 3)]
    assert_same_bits(geometric.karcher(zeros), mergekit_kernel("karcher", zeros))


@cases
@shapes
@pytest.mark.parametrize("scale", [None, 0.5, 1.0, -2.0])
def test_passthrough_scale(shape, dtype, scale):
    _, (tensor,) = make_tensors(shape, 1, dtype)
    assert_same_bits(selective.passthrough(tensor, scale), mergekit_kernel("passthrough", [tensor], scale=[scale]))


@cases
@shapes
@pytest.mark.parametrize("t", [0.0, 0.01, 0.5])
def test_nearswap(shape, dtype, t):
    base, (other,) = make_tensors(shape, 1, dtype)
    assert_same_bits(selective.nearswap(base, other, t), mergekit_kernel("nearswap", [other], base, t=t))


@cases
@shapes
def test_arcee_fusion(shape, dtype):
    base, (other,) = make_tensors(shape, 1, dtype)
    # Above 10**6 elements both draw the same quantile sample from the same seeded global RNG.
    torch.manual_seed(7)
    ours = selective.arcee_fusion(base, other)
    torch.manual_seed(7)
    theirs = mergekit_kernel("arcee_fusion", [other], base)
    assert_same_bits(ours, theirs)
    assert 0 < int((ours != base).sum()) < base.numel()


def test_arcee_fusion_draws_from_the_given_generator():
    base, (other,) = make_tensors((1100, 1000), 1, torch.float32)
    first = selective.arcee_fusion(base, other, torch.Generator().manual_seed(3))
    again = selective.arcee_fusion(base, other, torch.Generator().manual_seed(3))
    assert_same_bits(first, again)


@cases
@shapes
@pytest.mark.parametrize("epsilon", [1e-5, 0.02])
def test_ram(shape, dtype, epsilon):
    base, inputs = make_tensors(shape, 3, dtype, zero_share=0.6)
    assert_same_bits(selective.ram(base, inputs, epsilon), mergekit_kernel("ram", inputs, base, epsilon=epsilon))


@cases
@shapes
@pytest.mark.parametrize(("r", "alpha", "epsilon"), [(0.1, 0.2, 1e-5), (0.5, 1.0, 0.02)])
def test_ramplus_tl(shape, dtype, r, alpha, epsilon):
    base, inputs = make_tensors(shape, 3, dtype, zero_share=0.6)
    ours = selective.ramplus_tl(base, inputs, r=r, alpha=alpha, epsilon=epsilon)
    theirs = mergekit_kernel("ramplus_tl", inputs, base, r=r, alpha=alpha, epsilon=epsilon)
    assert_same_bits(ours, theirs)


def test_low_precision_results_promoted_as_mergekit_promotes():
    base, inputs = make_tensors((8, 8), 2, torch.bfloat16)
    assert selective.arcee_fusion(base, inputs[0]).dtype == torch.float32
    assert selective.ramplus_tl(base, inputs).dtype == torch.float32
    assert selective.ram(base, inputs).dtype == torch.bfloat16
    assert selective.sce(base, inputs).dtype == torch.bfloat16


# Whole checkpoints through `mergekit-yaml`'s own path (run_merge): each case names the config's
# sources, the per-model and global parameters, and the function applied to every tensor with the
# inputs in the order mergekit passes them (the base first; karcher appends an unlisted base last).
CHECKPOINT_CASES = {
    "model_stock": (["ft_a", "ft_b", "ft_c"], {}, {}, lambda b, xs: geometric.model_stock(b, xs)),
    "nuslerp": (
        ["ft_a", "ft_b"],
        {"ft_a": {"weight": 0.3}, "ft_b": {"weight": 0.9}},
        {},
        lambda b, xs: geometric.nuslerp(xs, [0.3, 0.9], b),
    ),
    # Two inputs: where no fine-tune changes a tensor both deltas are zero and mergekit blends
    # linearly; with three it would raise on that tensor.
    "multislerp": (
        ["ft_a", "ft_b"],
        {"ft_a": {"weight": 0.5}, "ft_b": {"weight": 0.2}},
        {},
        lambda b, xs: geometric.multislerp(xs, [0.5, 0.2], b),
    ),
    "karcher": (["ft_a", "ft_b"], {}, {}, lambda b, xs: geometric.karcher([*xs, b])),
    "sce": (["ft_a", "ft_b", "ft_c"], {}, {"select_topk": 0.5}, lambda b, xs: selective.sce(b, xs, 0.5)),
    "nearswap": (["ft_a"], {}, {"t": 0.001}, lambda b, xs: selective.nearswap(b, xs[0], 0.001)),
    "arcee_fusion": (["ft_a"], {}, {}, lambda b, xs: selective.arcee_fusion(b, xs[0])),
    "ram": (["ft_a", "ft_b", "ft_c"], {}, {}, lambda b, xs: selective.ram(b, xs)),
    "ramplus_tl": (["ft_a", "ft_b", "ft_c"], {}, {"r": 0.3}, lambda b, xs: selective.ramplus_tl(b, xs, r=0.3)),
}


def checkpoint_config(zoo, method: str, dtype: str) -> dict:
    names, per_model, shared, _ = CHECKPOINT_CASES[method]
    models = [{"model": zoo.model(name, dtype), "parameters": per_model.get(name, {})} for name in names]
    config = {"merge_method": method, "base_model": zoo.model("base", dtype), "models": models}
    return {**config, "parameters": shared, "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype]}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", sorted(CHECKPOINT_CASES))
def test_whole_checkpoint_equals_mergekit_yaml(zoo, write_config, mergekit_merge, tmp_path, method, dtype):
    from tiny_models import load_checkpoint_tensors

    names, _, _, merge = CHECKPOINT_CASES[method]
    theirs = load_checkpoint_tensors(
        mergekit_merge(write_config(checkpoint_config(zoo, method, dtype)), tmp_path / "mk")
    )
    base = load_checkpoint_tensors(zoo.model("base", dtype))
    sources = [load_checkpoint_tensors(zoo.model(name, dtype)) for name in names]
    assert set(theirs) == set(base)
    for name, reference in theirs.items():
        assert_same_bits(merge(base[name], [source[name] for source in sources]), reference)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_whole_checkpoint_passthrough_scale(zoo, write_config, mergekit_merge, tmp_path, dtype):
    from tiny_models import load_checkpoint_tensors

    source = {"model": zoo.model("ft_a", dtype), "parameters": {"scale": 0.37}}
    config = write_config({"merge_method": "passthrough", "models": [source], "dtype": "bfloat16"})
    theirs = load_checkpoint_tensors(mergekit_merge(config, tmp_path / "mk"))
    for name, tensor in load_checkpoint_tensors(zoo.model("ft_a", dtype)).items():
        assert_same_bits(selective.passthrough(tensor.to(torch.bfloat16), 0.37), theirs[name])
