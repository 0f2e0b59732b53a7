"""Pure tensor math of every merge method, with mergekit 0.1.5's semantics.

Nothing here reads files, resolves parameters or knows model structure: each function takes
tensors and numbers and returns a tensor. Task arithmetic, TIES, DARE, breadcrumbs and DELLA are
one family (`task_vector_merge`) configured by a sparsification rule, a sign consensus, rescale and
normalize; `registry.METHODS` lists which setting each named method uses.

A magnitude trim keeps exactly k = max(1, int(density*n)) elements, as mergekit does: every element
whose |delta| exceeds the k-th largest (the threshold) and, of those equal to it, as many as k
needs. Which of the tied ones is mergekit's choice on the device that merges, where it can be
reproduced (`TieOrder`): mergekit takes the first k of torch's argsort of the flattened float32
magnitudes, which on CPU is an unstable but deterministic sort (libstdc++ introsort: the order
follows from the whole tensor, not from positions), and on CUDA is stable above 32 elements
(flat-index order). So the CPU reference path runs that same argsort when ties straddle the cut,
and CUDA and the fused kernel keep the first tied elements in flat-index order, which needs one
count per block instead of a rank per element. Breadcrumbs ranks |delta| with mergekit's own
ascending sort on the merging device, so its cuts break ties as mergekit's do there. A caller
merging many candidates from the same sources may pass such ranks precomputed
(`magnitude_rank`), because a source's delta never changes between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from evomerge.merge.parameters import default_of
from evomerge.merge.registry import METHODS as METHODS  # re-exported: scripts import it from here
from evomerge.merge.registry import MethodInfo as MethodInfo
from evomerge.merge.registry import Sparsification

DEFAULT_GAMMA = default_of("gamma")
DEFAULT_EPSILON = default_of("epsilon")

# Which elements tied at a magnitude trim's threshold come first: "sort" is torch's argsort on the
# tensor's device (mergekit's choice there), "flat" the lowest flat index (CUDA's stable sort).
TieOrder = Literal["sort", "flat"]


def magnitude_rank(delta: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Position of every element in mergekit's magnitude order (0 = largest when descending).

    The same sort call as mergekit's (torch's argsort/sort of the flattened float32 |delta|, on
    delta's device), so its tie order is mergekit's there.
    """
    flat = delta.detach().abs().reshape(-1).float()
    order = torch.argsort(flat, descending=True) if descending else torch.sort(flat).indices
    rank_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    rank = torch.empty_like(order, dtype=rank_dtype)
    rank[order] = torch.arange(flat.numel(), device=flat.device, dtype=rank_dtype)
    return rank.reshape(delta.shape)


def l1_rescaled(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale the kept delta so its L1 norm equals the full delta's (mergekit's DARE rescale)."""
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def device_tie_order(device: torch.device) -> TieOrder:
    """mergekit's tie order on `device`: flat-index on CUDA (its sort is stable there), else torch's sort."""
    return "flat" if device.type == "cuda" else "sort"


def keep_count(numel: int, density: float) -> int:
    """How many elements a magnitude trim keeps: int(density*n), at least 1, all for density >= 1."""
    return numel if density >= 1 else max(1, int(density * numel))


def trim_threshold(delta: torch.Tensor, density: float) -> float:
    """The k-th largest |delta| (k = keep_count), the magnitude a TIES trim keeps down to."""
    magnitudes = delta.detach().abs().reshape(-1).float()
    k = keep_count(magnitudes.numel(), density)
    if k >= magnitudes.numel():
        return float("-inf")
    return float(torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values)


def magnitude_mask(
    delta: torch.Tensor, density: float, order: TieOrder | None = None, rank: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep exactly k = keep_count(n, density) elements of largest |delta|, ties broken by `order`.

    `order` defaults to the device's (`device_tie_order`); `rank` is a precomputed descending
    `magnitude_rank`, used when the order is "sort".
    """
    magnitudes = delta.detach().abs().reshape(-1).float()
    k = keep_count(magnitudes.numel(), density)
    if k >= magnitudes.numel():
        return torch.ones_like(delta, dtype=torch.bool)
    threshold = torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values
    return _exact_top_k(delta, magnitudes, threshold, k, order, rank)


def _exact_top_k(
    delta: torch.Tensor,
    magnitudes: torch.Tensor,
    threshold: torch.Tensor,
    k: int,
    order: TieOrder | None,
    rank: torch.Tensor | None,
) -> torch.Tensor:
    """The top-k mask given the k-th largest magnitude: a sort only when ties straddle the cut."""
    above = magnitudes > threshold
    tied = magnitudes == threshold
    larger, equal = torch.stack([above.sum(), tied.sum()]).tolist()  # one device sync, not two
    room = k - larger
    if room == equal:
        return (above | tied).reshape(delta.shape)
    if (order or device_tie_order(delta.device)) == "flat":
        first_tied = torch.cumsum(tied, 0, dtype=torch.int32 if tied.numel() < 2**31 else torch.int64) <= room
        return (above | (tied & first_tied)).reshape(delta.shape)
    rank = magnitude_rank(delta, descending=True) if rank is None else rank
    return rank < k


def top_k_masks(
    deltas: Sequence[torch.Tensor],
    densities: Sequence[float],
    order: TieOrder | None = None,
    ranks: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """`magnitude_mask` for several task vectors of one tensor, batched when they keep the same count.

    One batched O(n) selection (`kthvalue`) runs on all cores, where one per input would not.
    """
    ranks = list(ranks) if ranks is not None else [None] * len(deltas)
    counts = [keep_count(t.numel(), d) for t, d in zip(deltas, densities, strict=True)]
    if len(deltas) < 2 or len(set(counts)) != 1 or counts[0] >= deltas[0].numel():
        return [magnitude_mask(t, d, order, r) for t, d, r in zip(deltas, densities, ranks, strict=True)]
    k, n = counts[0], deltas[0].numel()
    magnitudes = torch.stack([t.detach().abs().reshape(-1).float() for t in deltas])
    thresholds = torch.kthvalue(magnitudes, n - k + 1, dim=1).values
    return [
        _exact_top_k(delta, row, threshold, k, order, rank)
        for delta, row, threshold, rank in zip(deltas, magnitudes, thresholds, ranks, strict=True)
    ]


def magnitude_outliers_mask(
    delta: torch.Tensor, density: float, gamma: float, rank: torch.Tensor | None = None
) -> torch.Tensor:
    """Breadcrumbs: drop the gamma largest outliers, then the smallest, keeping density*n.

    `rank` is the ascending magnitude rank (magnitude_rank(delta, descending=False)).
    """
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    # The outlier cut shrinks when needed so the target density is still reached.
    n_bottom = max(0, n - target - n_top)
    ascending_rank = magnitude_rank(delta, descending=False) if rank is None else rank
    return (ascending_rank >= n_bottom) & (ascending_rank < n_bottom + target)


def bernoulli_mask(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each element independently with probability density."""
    probs = torch.full(delta.shape, density, dtype=torch.float32, device=delta.device)
    return torch.bernoulli(probs, generator=generator).bool()


def della_mask(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None) -> torch.Tensor:
    """DELLA MagPrune: keep probability grows linearly with the row-wise magnitude rank.

    The probabilities are computed in mergekit's dtype: bf16 deltas (and any delta off the CPU) in
    their own, others in float32, so a bf16 rank rounds as it does in mergekit.
    """
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("epsilon must keep density ± epsilon inside (0, 1)")
    work = delta.dtype if delta.device.type != "cpu" or delta.dtype == torch.bfloat16 else torch.float32
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(torch.argsort(rows.abs().float(), dim=1), dim=1).to(work) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    spread = torch.where(high > low, high - low, torch.ones_like(high))  # a one-column row has rank 0
    probs = (density - epsilon) + ((ranks - low) / spread).clamp(0, 1) * 2 * epsilon
    return torch.bernoulli(probs, generator=generator).bool().reshape(delta.shape)


def sparsify(
    delta: torch.Tensor,
    density: float,
    method: Sparsification,
    *,
    rescale: bool,
    gamma: float = DEFAULT_GAMMA,
    epsilon: float = DEFAULT_EPSILON,
    generator: torch.Generator | None = None,
    rank: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    order: TieOrder | None = None,
) -> torch.Tensor:
    """Trim a task vector to `density` by `method`; optionally restore its L1 norm.

    `rank` is a precomputed `magnitude_rank`: ascending for magnitude_outliers, descending for
    magnitude; `mask` a precomputed magnitude mask (see top_k_masks); `order` the magnitude trim's
    tie order (default: the device's).
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    if method == "magnitude":
        mask = mask if mask is not None else magnitude_mask(delta, density, order, rank)
    elif method == "magnitude_outliers":
        mask = magnitude_outliers_mask(delta, density, gamma, rank)
    elif method == "random":
        mask = bernoulli_mask(delta, density, generator)
    elif method == "della_magprune":
        mask = della_mask(delta, density, epsilon, generator)
    else:
        raise ValueError(f"unknown sparsification {method!r}")
    kept = delta * mask
    return l1_rescaled(delta, kept) if rescale else kept


def task_vector_merge(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_consensus: bool,
    normalize: bool,
    lam: float = 1.0,
) -> torch.Tensor:
    """base + lam * combine(w_i * delta_i), with TIES sign election when sign_consensus.

    Deltas must already be sparsified. Sign election is weighted: the elected sign is that of
    sum_i(w_i*delta_i), ties going to +; only entries whose sign equals it are summed, and
    normalize divides by the sum of the weights of those entries (0 -> 1).
    """
    if not deltas:
        return base
    # Weights are rounded to the working dtype before multiplying, as mergekit does, so bf16
    # merges agree bit for bit rather than to within an ulp.
    stacked = torch.stack(list(deltas))
    weight_column = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    weight_column = weight_column.reshape(-1, *([1] * base.dim()))
    stacked = stacked * weight_column
    if sign_consensus:
        elected = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)
        agrees = stacked.sign() == elected
        mixed = (stacked * agrees).sum(dim=0)
        divisor = (weight_column * agrees).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = weight_column.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return (base + mixed).to(base.dtype)


def linear_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Weighted average (or weighted sum without normalize), accumulated in float32."""
    first = tensors[0]
    work = torch.float64 if first.dtype == torch.float64 else torch.float32
    total = torch.zeros_like(first, dtype=work)
    for tensor, weight in zip(tensors, weights, strict=False):
        total.add_(tensor.to(work), alpha=float(weight))
    if normalize:
        total.div_(float(sum(weights)))
    return total.to(first.dtype)


# SLERP reduces in pieces of this many elements: whole-tensor sums of 2**20-element pieces, in
# order, are the reduction order mergekit's per-tensor SLERP uses, so results agree bit for bit.
SLERP_PIECE = 1 << 20


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation of whole tensors; near-collinear pairs fall back to lerp.

    Norms are the norm of the pieces' norms and the dot product the sum of the pieces' sums, with
    every coefficient a work-dtype tensor; the output keeps the input dtype.
    """
    work = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    if a.shape[1] == 0:
        return v0
    t_work = torch.tensor([[t]], dtype=work)
    pieces = range(0, a.shape[1], SLERP_PIECE)
    norm_a = _norm_of_pieces(a, pieces, work, eps)
    norm_b = _norm_of_pieces(b, pieces, work, eps)
    dot_parts = [
        ((_piece(a, start, work) / norm_a) * (_piece(b, start, work) / norm_b)).sum(dim=1, keepdim=True)
        for start in pieces
    ]
    dot = torch.stack(dot_parts).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t_work, torch.sin((1 - t_work) * theta) / sin_theta)
    coef_b = torch.where(linear, t_work, torch.sin(t_work * theta) / sin_theta)
    mixed = torch.empty_like(a)
    for start in pieces:
        end = start + SLERP_PIECE
        mixed[:, start:end] = coef_a * _piece(a, start, work) + coef_b * _piece(b, start, work)
    return mixed.reshape(v0.shape)


def _piece(flat: torch.Tensor, start: int, work: torch.dtype) -> torch.Tensor:
    return flat[:, start : start + SLERP_PIECE].to(work)


def _norm_of_pieces(flat: torch.Tensor, pieces: range, work: torch.dtype, eps: float) -> torch.Tensor:
    parts = [torch.linalg.vector_norm(_piece(flat, start, work), dim=1, keepdim=True) for start in pieces]
    norm = torch.linalg.vector_norm(torch.stack(parts), dim=0)
    return torch.where(norm > eps, norm, 1)
