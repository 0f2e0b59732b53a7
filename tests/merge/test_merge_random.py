"""Random merge methods (DARE, DELLA) checked statistically, since no two RNGs agree bit for bit.

The trim functions keep the right fraction, rescale to mergekit's L1 definition, and (DELLA)
keep larger deltas more often; whole merges are reproducible by seed and, tensor by tensor,
change as many elements by as much as mergekit's merges of the same config do.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tiny_models import TinyZoo, load_checkpoint_tensors

from evomerge.merge.methods import sparsify

RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")
SPARSIFICATION_OF = {"dare": "random", "della": "della_magprune"}
# Allowed distance from the expected rate, in standard errors of a Bernoulli mean.
STANDARD_ERRORS = 5


def dense_delta(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A delta with no zero elements, so 'kept' and 'nonzero' mean the same thing."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=generator)
    return torch.where(values == 0, 1e-3, values)


def bernoulli_tolerance(probability: float, samples: int) -> float:
    return STANDARD_ERRORS * math.sqrt(probability * (1 - probability) / samples)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_density_fraction_unscaled(density):
    delta = dense_delta(256, 256, seed=1)
    kept = sparsify(delta, density, "random", rescale=False, generator=torch.Generator().manual_seed(2))
    mask = kept != 0
    fraction = mask.float().mean().item()
    assert abs(fraction - density) <= bernoulli_tolerance(density, delta.numel()), fraction
    assert torch.equal(kept[mask], delta[mask]), "without rescale, kept elements must be unchanged"


@pytest.mark.parametrize("family", ["dare", "della"])
def test_rescale_restores_l1_norm(family):
    delta = dense_delta(128, 96, seed=3)
    kept = sparsify(
        delta, 0.3, SPARSIFICATION_OF[family], rescale=True, epsilon=0.1, generator=torch.Generator().manual_seed(4)
    )
    assert (kept != 0).float().mean().item() < 0.5, "nothing was trimmed"
    assert math.isclose(kept.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-5)


@pytest.mark.parametrize("family", ["dare", "della"])
def test_rescale_matches_mergekit_definition(family):
    mergekit_sparsify = pytest.importorskip("mergekit.sparsify")
    delta = dense_delta(64, 64, seed=5)
    kept = sparsify(
        delta, 0.4, SPARSIFICATION_OF[family], rescale=True, epsilon=0.2, generator=torch.Generator().manual_seed(6)
    )
    expected = mergekit_sparsify.rescaled_masked_tensor(delta, (kept != 0).float(), mergekit_sparsify.RescaleNorm.l1)
    torch.testing.assert_close(kept, expected, rtol=1e-6, atol=0)


def test_della_keep_probability_rises_linearly_with_magnitude_rank():
    density, epsilon, rows, cols = 0.5, 0.2, 4000, 32
    delta = dense_delta(rows, cols, seed=7)
    kept = sparsify(
        delta, density, "della_magprune", rescale=False, epsilon=epsilon, generator=torch.Generator().manual_seed(8)
    )
    # Column r of the gathered mask is "was the r-th smallest |delta| of its row kept".
    by_rank = (kept != 0).gather(1, delta.abs().argsort(dim=1)).float().mean(dim=0)
    expected = (density - epsilon) + torch.arange(cols) / (cols - 1) * 2 * epsilon
    for rank in range(cols):
        p = expected[rank].item()
        assert abs(by_rank[rank].item() - p) <= bernoulli_tolerance(p, rows), (
            f"rank {rank}: {by_rank[rank]:.3f} vs {p:.3f}"
        )


@pytest.mark.parametrize("family", ["dare", "della"])
def test_same_generator_seed_same_trim(family):
    delta = dense_delta(64, 64, seed=9)

    def trim(seed):
        return sparsify(
            delta,
            0.5,
            SPARSIFICATION_OF[family],
            rescale=True,
            epsilon=0.1,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(trim(10), trim(10))
    assert not torch.equal(trim(10), trim(11))


def random_config(zoo: TinyZoo, method: str) -> dict:
    """Two fine-tunes with low, unequal densities: keeping 1-density instead would show at once."""
    return {
        "merge_method": method,
        "base_model": zoo.model("base"),
        "dtype": "float32",
        "models": [
            {"model": zoo.model("ft_a"), "parameters": {"weight": 0.6, "density": 0.3}},
            {"model": zoo.model("ft_b"), "parameters": {"weight": 0.4, "density": 0.2}},
        ],
    }


def test_cli_seed_reproduces_and_varies(zoo, write_config, evomerge_cli, tmp_path):
    config_path = write_config(random_config(zoo, "dare_ties"))
    runs = {"first": 1, "again": 1, "other": 2}

    def run(label):
        return evomerge_cli("merge", config_path, tmp_path / label, "--seed", str(runs[label]))

    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        for finished in pool.map(run, runs):
            assert finished.returncode == 0, finished.stderr
    first, again, other = (load_checkpoint_tensors(tmp_path / label) for label in runs)
    assert all(torch.equal(first[name], again[name]) for name in first), "same --seed gave different tensors"
    assert sum(not torch.equal(first[name], other[name]) for name in first) > len(first) // 2


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_api_seed_reproduces_and_varies(method, zoo, write_config, tmp_path):
    from evomerge.merge.config import load_merge_config
    from evomerge.merge.engine import merge_to_disk

    config = load_merge_config(write_config(random_config(zoo, method)))
    merged = {}
    for label, seed in (("first", 5), ("again", 5), ("other", 6)):
        merge_to_disk(config, tmp_path / label, device="cpu", seed=seed)
        merged[label] = load_checkpoint_tensors(tmp_path / label)
    names = list(merged["first"])
    assert all(torch.equal(merged["first"][n], merged["again"][n]) for n in names)
    assert sum(not torch.equal(merged["first"][n], merged["other"][n]) for n in names) > len(names) // 2


# A tensor's changed fraction differs between two seeds by ~0.02 (one s.d.) and its L1 by up
# to ~3%; a missing rescale or swapped density moves them by 2x or more.
LARGE_TENSOR = 1024
CHANGED_FRACTION_TOLERANCE = 0.1
L1_RELATIVE_TOLERANCE = 0.15
WHOLE_MODEL_TOLERANCE = 0.03


def change_statistics(merged: dict, base: dict) -> dict[str, tuple[int, float, int]]:
    """Per tensor: (elements changed vs base, L1 norm of the change, element count)."""
    stats = {}
    for name, tensor in merged.items():
        change = tensor.double() - base[name].double()
        stats[name] = (int((change != 0).sum()), float(change.abs().sum()), change.numel())
    return stats


def whole_model(stats: dict[str, tuple[int, float, int]]) -> tuple[int, float, int]:
    """Per-tensor statistics summed over the model."""
    changed, l1, count = zip(*stats.values(), strict=False)
    return sum(changed), sum(l1), sum(count)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_merge_statistics_match_mergekit(method, zoo, write_config, mergekit_merge, tmp_path):
    from evomerge.merge.config import load_merge_config
    from evomerge.merge.engine import merge_to_disk

    config_path = write_config(random_config(zoo, method))
    mergekit_merge(config_path, tmp_path / "mergekit", seed=1)
    merge_to_disk(load_merge_config(config_path), tmp_path / "evomerge", device="cpu", seed=1)
    base = load_checkpoint_tensors(zoo.model("base"))
    theirs = change_statistics(load_checkpoint_tensors(tmp_path / "mergekit"), base)
    ours = change_statistics(load_checkpoint_tensors(tmp_path / "evomerge"), base)
    assert sorted(ours) == sorted(theirs)
    for name, (changed, l1, count) in theirs.items():
        if count < LARGE_TENSOR:
            continue
        our_changed, our_l1, _ = ours[name]
        assert abs(our_changed - changed) / count <= CHANGED_FRACTION_TOLERANCE, (
            f"{name}: changed fraction {our_changed / count:.3f} vs mergekit {changed / count:.3f}"
        )
        assert abs(our_l1 / l1 - 1) <= L1_RELATIVE_TOLERANCE, f"{name}: L1 of change {our_l1:.4g} vs mergekit {l1:.4g}"
    (our_changed, our_l1, count), (changed, l1, _) = whole_model(ours), whole_model(theirs)
    assert abs(our_changed - changed) / count <= WHOLE_MODEL_TOLERANCE, f"{our_changed} vs {changed} of {count}"
    assert abs(our_l1 / l1 - 1) <= WHOLE_MODEL_TOLERANCE, f"L1 of change {our_l1:.4g} vs mergekit {l1:.4g}"
