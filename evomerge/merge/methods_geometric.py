"""Pure tensor math of mergekit 0.1.5's geometric merge methods: Model Stock, NuSLERP, Multi-SLERP, Karcher.

Each function takes the tensors of one output weight (already converted to the merge dtype) and the
method's parameters as plain numbers, and returns what mergekit's kernel returns for that weight,
in the same dtype. These methods reduce whole tensors (norms, dot products, means) in the input
dtype with the same torch operations, on the same shapes and in the same order as mergekit, because
a different reduction order (another norm routine, a flattened view where mergekit keeps rows, a
sum that starts elsewhere) changes the last bits. Python's `sum` is used where mergekit sums a list
of tensors: it starts at the integer 0, which turns a -0.0 into +0.0, and so must ours.

Nothing here reads files, resolves parameters or checks how many inputs a method accepts; the
caller does that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch

# Smallest |1 + (n - 1) cos| Model Stock divides by; below it the base is kept for that filter.
MODEL_STOCK_SINGULAR = 1e-6


def _pairwise_cosines(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean cosine over every unordered pair of deltas along the last axis, keeping that axis as 1."""
    cosines = []
    for index, first in enumerate(deltas):
        for second in deltas[index + 1 :]:
            norms = torch.norm(first, dim=-1) * torch.norm(second, dim=-1)
            cosines.append(((first * second).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def model_stock(base: torch.Tensor, inputs: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: move from the base toward the inputs' mean by t = n cos / (1 + (n - 1) cos).

    cos is the mean pairwise cosine of the inputs' deltas from the base, over the whole tensor, or
    per row (per filter) with `filter_wise` (a 1-D tensor is then one row). Needs at least two inputs.
    """
    shape = base.shape
    if filter_wise:
        origin = base.unsqueeze(0) if base.dim() == 1 else base
        points = [point.unsqueeze(0) if point.dim() == 1 else point for point in inputs]
    else:
        origin = base.reshape(-1)
        points = [point.reshape(-1) for point in inputs]
    cos_theta = _pairwise_cosines([point - origin for point in points])
    count = len(points)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < MODEL_STOCK_SINGULAR
    safe_denominator = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe_denominator)
    average = sum(points) / count
    return (t * average + (1 - t) * origin).reshape(shape)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def _nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """Spherical interpolation of v0 toward v1 by t, whole tensor (`flatten`), per row or per column."""
    eps = 1e-8
    shape = v0.shape
    transposed = row_wise and not flatten
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif transposed:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    cos_theta = torch.sum(_unit_rows(v0) * _unit_rows(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if transposed:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    row_wise: bool = False,
    flatten: bool = True,
) -> torch.Tensor:
    """NuSLERP of exactly two inputs with t = w1 / (w0 + w1) (0.5 when the weights cancel).

    With a base, the two deltas from it are interpolated and added back to it. `flatten` (mergekit's
    default) treats the tensor as one vector; otherwise rows are interpolated, or columns with
    `row_wise` (mergekit's naming).
    """
    first, second = inputs
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        return _nuslerp_pair(t, first, second, row_wise, flatten)
    return base + _nuslerp_pair(t, first - base, second - base, row_wise, flatten)


def multislerp(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Weighted spherical barycenter (one tangent-space step at the weighted mean) of the inputs.

    With a base, the inputs' deltas from it are merged and the base added back. A single input is
    returned as it is. Raises ValueError when the weighted mean direction vanishes (antipodal
    inputs that balance out) with more than two inputs; two such inputs are blended linearly.
    """
    if len(inputs) == 1:
        return inputs[0]
    points = torch.stack(list(inputs), dim=0)
    if base is not None:
        points -= base
    flat = points.view(points.shape[0], -1)
    coefficients = torch.tensor(list(weights), dtype=points.dtype, device=points.device)
    if normalize_weights:
        coefficients = coefficients / coefficients.sum()
    column = coefficients.view(-1, 1)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * column).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if points.shape[0] != 2:
            raise ValueError("multislerp: the weighted mean of the inputs' directions is zero")
        blend = (points[0] * coefficients[0] + points[1] * coefficients[1]).view(points.shape[1:])
        return blend if base is None else blend + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * column).sum(0)
    step_norm = torch.norm(step) + eps
    direction = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    result = (direction * (norms.squeeze(-1) * coefficients).sum()).view(points.shape[1:])
    return result if base is None else result + base


def _norm_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _karcher_start(units: Sequence[torch.Tensor], alphas: Sequence[float], tol: float) -> torch.Tensor:
    """The normalized weighted Euclidean mean of the unit inputs, or the first one if it vanishes."""
    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units, strict=True):
        mean += alpha * unit
    mean_norm = torch.linalg.vector_norm(mean.to(_norm_dtype(mean)))
    return units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)


def _karcher_iterate(
    mean: torch.Tensor, units: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int, tol: float
) -> torch.Tensor:
    """Riemannian gradient steps on the sphere until the tangent step is shorter than tol."""
    norm_dtype = _norm_dtype(mean)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += alpha * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(norm_dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(norm_dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return mean


def karcher(inputs: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Equal-weight Karcher (Riemannian) mean of the inputs' directions, scaled by their mean norm.

    Every input counts, a base model included (mergekit's karcher has no notion of a base). Inputs
    with a norm at most tol do not steer the direction but still count in the scale.
    """
    if len(inputs) == 1:
        return inputs[0]
    alphas = [1.0 / len(inputs)] * len(inputs)
    norms = [torch.linalg.vector_norm(tensor.to(_norm_dtype(tensor))) for tensor in inputs]
    units = [
        torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype)
        for tensor, norm in zip(inputs, norms, strict=True)
    ]
    steering = [index for index, norm in enumerate(norms) if norm.item() > tol]
    if not steering:
        return cast(torch.Tensor, sum(tensor * 0 for tensor in inputs))
    steering_alphas = [alphas[index] for index in steering]
    alpha_sum = sum(steering_alphas)
    steering_alphas = [alpha / alpha_sum for alpha in steering_alphas]
    steering_units = [units[index] for index in steering]
    mean = _karcher_start(steering_units, steering_alphas, tol)
    mean = _karcher_iterate(mean, steering_units, steering_alphas, max_iter, tol)
    return sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True)) * mean
