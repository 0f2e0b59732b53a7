"""Pure tensor math of mergekit 0.1.5's element-selecting merge methods and passthrough's scale.

SCE, NearSwap, Arcee Fusion, RAM and RAM+ (tensor-local) each decide per element which input's
change from the base to keep, and how much of it; passthrough copies one input, optionally scaled.
Each function takes the tensors of one output weight (already converted to the merge dtype) and
the method's parameters as plain numbers, and returns what mergekit's kernel returns for that
weight, with the same torch operations in the same order so that float32 results are equal bit
for bit.

The result's dtype is the input dtype, except where mergekit's own arithmetic promotes it: Arcee
Fusion multiplies by a float32 mask and RAM+ by float32 scale factors, so for bfloat16 or float16
inputs they return float32 (mergekit then writes float32 unless the config sets `out_dtype`).

Arcee Fusion's threshold, for tensors above 10**6 elements, comes from quantiles of a random sample
drawn with `torch.randint`; pass a generator to fix the draw. Nothing here reads files, resolves
parameters or checks input counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Arcee Fusion estimates quantiles from a sample of this many elements (with replacement).
FUSION_QUANTILE_SAMPLE = 1_000_000


def _majority_agrees(deltas: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """Where each delta's sign matches the sign of the deltas' sum (zero sum counts as positive)."""
    signs = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return signs == majority


def _top_variance_mask(deltas: torch.Tensor, select_topk: float, mask_dtype: torch.dtype) -> torch.Tensor:
    """1 at the int(select_topk * nonzero) elements whose deltas vary most across inputs, else 0."""
    if select_topk <= 0:
        return torch.zeros_like(deltas[0], dtype=mask_dtype)
    if select_topk >= 1:
        return torch.ones_like(deltas[0], dtype=mask_dtype)
    variance = torch.var(deltas, dim=0, unbiased=False)
    keep = int(torch.count_nonzero(variance) * select_topk)
    mask = torch.zeros_like(variance, dtype=mask_dtype)
    if keep == 0:
        return mask
    _, indices = torch.topk(variance.abs().view(-1), k=keep, largest=True)
    mask.view(-1)[indices] = 1
    return mask


def _sce_input_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Each input's mean squared delta as a share of all inputs' (equal shares when all are ~0)."""
    energies = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = torch.sum(energies).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energies) / energies.shape[0]
    return energies / total


def sce(
    base: torch.Tensor, inputs: Sequence[torch.Tensor], select_topk: float = 1.0, int8_mask: bool = False
) -> torch.Tensor:
    """SCE: select the top-variance elements, weight inputs by delta energy, erase minority signs.

    The merged delta at each element is the energy-weighted mean of the deltas that agree with the
    majority sign there; with no inputs the base is returned as it is.
    """
    if not inputs:
        return base
    mask_dtype = torch.int8 if int8_mask else base.dtype
    deltas = torch.stack([tensor - base for tensor in inputs], dim=0)
    if select_topk < 1:
        deltas = deltas * _top_variance_mask(deltas, select_topk, mask_dtype).unsqueeze(0)
    agrees = _majority_agrees(deltas, mask_dtype)
    weights = _sce_input_weights(deltas)
    while weights.dim() < deltas.dim():
        weights = weights.unsqueeze(-1)
    kept_weights = weights * agrees
    merged = (deltas * kept_weights).sum(dim=0) / torch.sum(kept_weights, dim=0).clamp(min=1e-6)
    return base + merged


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap: take `other` where it lies within t of the base, blend by t/|diff| farther out."""
    distance = torch.abs(base - other)
    share = (t / distance.clamp(min=1e-6)).clamp(min=0, max=1)
    return share * other + (1 - share) * base


def _fusion_importance(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|delta| times the row's KL divergence between the softmaxes of the tuned and base rows."""
    eps = 1e-8
    p = F.softmax(tuned, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return (tuned - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _fusion_threshold(importance: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """median + 1.5 IQR of the importance, from lower-index quantiles of all or a sample of it."""
    flat = importance.reshape(-1)
    if flat.numel() > FUSION_QUANTILE_SAMPLE:
        draw = torch.randint(flat.numel(), (FUSION_QUANTILE_SAMPLE,), device=flat.device, generator=generator)
        flat = flat[draw]
    ordered, _ = torch.sort(flat)
    positions = (torch.tensor([0.25, 0.5, 0.75]).to(ordered.device) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[positions]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base: torch.Tensor, other: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Arcee Fusion: take `other`'s change only where its importance reaches the outlier threshold."""
    importance = _fusion_importance(other, base)
    mask = (importance >= _fusion_threshold(importance, generator)).float()
    return base + (other - base) * mask


def _ram_counts(
    base: torch.Tensor, inputs: Sequence[torch.Tensor], epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat deltas, which exceed epsilon, how many inputs change each element, shared, unique."""
    deltas = torch.stack([tensor - base for tensor in inputs], dim=0).view(len(inputs), -1)
    changed = deltas.abs() > epsilon
    contributors = changed.sum(dim=0, keepdim=True)
    return deltas, changed, contributors, contributors > 1, contributors == 1


def ram(base: torch.Tensor, inputs: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """RAM: keep a delta one input alone makes in full, average the deltas several inputs share.

    Deltas of magnitude at most epsilon count as no change.
    """
    if not inputs:
        return base
    deltas, changed, contributors, shared, unique = _ram_counts(base, inputs, epsilon)
    kept = deltas * changed
    merged = ((kept * unique) + (kept * shared / contributors.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(
    base: torch.Tensor, inputs: Sequence[torch.Tensor], r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> torch.Tensor:
    """RAM+ (tensor-local): RAM with each input's unique deltas scaled up by 1 + r * min(rho, alpha).

    rho is the input's count of shared changed elements over its count of unique ones in this tensor.
    """
    if not inputs:
        return base
    deltas, changed, contributors, shared, unique = _ram_counts(base, inputs, epsilon)
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    kept = deltas * changed
    merged = ((kept * unique * boost.unsqueeze(-1)) + (kept * shared / contributors.clamp(min=1))).sum(
        dim=0, keepdim=True
    )
    return base + merged.reshape_as(base)


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The one input, multiplied by `scale` when one is given (a `scale` of 1.0 still multiplies)."""
    return tensor if scale is None else tensor * scale
