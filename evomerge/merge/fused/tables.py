"""Host-side tables for the fused merge: magnitude thresholds and per-candidate parameters.

`MagnitudeTables` keeps, for every (tensor, expert) delta, its distinct magnitudes in descending
order with how many elements share each, so the k-th largest magnitude (the TIES threshold for a
density) and how many of the elements equal to it the top k takes are one vectorized binary
search over all tensors, with no device round trip. The kernel keeps every element above the
threshold and that many tied ones, the first in flat-index order (`methods.magnitude_mask` with
the "flat" tie order), so nothing per element is kept.

`ParameterTable` packs one candidate's plan into the int32 table the kernel reads: per tensor and
expert the weight (rounded to the working dtype, as `task_vector_merge` rounds it), threshold,
density, DARE seed and tied count; per tensor lambda and normalize. Float fields are stored as bits.
"""

from __future__ import annotations

import numpy as np
import torch

# Field order in the parameter table (the kernel reads these names): each field holds one entry per
# expert; after the PARAM_FIELDS * experts of them come lambda and normalize, one each.
WEIGHT, THRESHOLD, DENSITY, SEED, TIED = range(5)
PARAM_FIELDS = 5
LAMBDA, NORMALIZE = range(2)
# The tied count meaning "every element equal to the threshold is kept": no tie straddles the cut.
ALL_TIED = 2**31 - 1


class MagnitudeTables:
    """Distinct |delta| values (descending) and their counts, for every (segment, expert)."""

    def __init__(self, segments: int, experts: int):
        self._values: dict[tuple[int, int], np.ndarray] = {}
        self._counts: dict[tuple[int, int], np.ndarray] = {}
        self.shape = (segments, experts)
        self._index: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # values, counts, ends, base

    def add(self, segment: int, expert: int, delta: torch.Tensor) -> None:
        """Record the table of one delta (on any device; only the table comes to the host)."""
        values, counts = torch.unique(delta.detach().abs().reshape(-1).float(), sorted=True, return_counts=True)
        # float32 holds every bf16/fp16/fp32 magnitude exactly; host memory is 8 bytes per distinct
        # magnitude: negligible in bf16 (at most 32,768 of them), about 8 bytes per element in fp32.
        self._values[(segment, expert)] = values.flip(0).cpu().numpy()
        self._counts[(segment, expert)] = counts.flip(0).cpu().numpy().astype(np.int32)
        self._index = None

    def build_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Concatenate the tables for lookups; `load` calls it once, so concurrent lookups never race."""
        keys = sorted(self._values)
        values = np.concatenate([self._values[k] for k in keys]) if keys else np.zeros(0)
        counts = np.concatenate([self._counts[k] for k in keys]) if keys else np.zeros(0, np.int64)
        ends = np.cumsum(counts, dtype=np.int64)
        count_base = np.zeros(self.shape, dtype=np.int64)
        position = 0
        for key in keys:
            count_base[key] = position
            position += int(self._counts[key].sum())
        self._index = (values, counts, ends, count_base)
        return self._index

    def thresholds(self, keep_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per delta, the keep_counts[s, e]-th largest magnitude (+inf where keep_counts is 0) and how
        many elements equal to it the top keep_counts take (ALL_TIED when that is all of them)."""
        values, counts, ends, count_base = self._index if self._index is not None else self.build_index()
        wanted = keep_counts > 0
        query = (count_base + keep_counts - 1)[wanted]
        found = np.searchsorted(ends, query, side="right")
        thresholds = np.full(self.shape, np.inf, dtype=np.float64)
        thresholds[wanted] = values[found]
        # Elements larger than the threshold precede its run of equal magnitudes in the table.
        tied = np.full(self.shape, ALL_TIED, dtype=np.int64)
        taken = query + 1 - (ends[found] - counts[found])
        tied[wanted] = np.where(taken < counts[found], taken, ALL_TIED)
        return thresholds, tied


class ParameterTable:
    """One candidate's per-tensor parameters, as the kernel's int32 table plus host-side arrays."""

    def __init__(self, segments: int, experts: int, method: str = ""):
        self.method = method  # the candidate's method: picks its trim, consensus and rescale at launch
        self.experts = experts
        self.weights = np.zeros((segments, experts))
        self.densities = np.ones((segments, experts))
        self.present = np.zeros((segments, experts), dtype=bool)
        self.seeds = np.zeros((segments, experts), dtype=np.int64)
        self.lambdas = np.ones(segments)
        self.normalize = np.zeros(segments, dtype=bool)
        self.rescale = np.zeros(segments, dtype=bool)
        self.split_ties = False  # set by `pack`: some tie straddles a trim's cut, the kernel counts ties

    def set_input(self, segment: int, expert: int, weight: float, density: float, seed: int) -> None:
        self.weights[segment, expert] = weight
        self.densities[segment, expert] = density
        self.present[segment, expert] = True
        self.seeds[segment, expert] = seed

    def keep_counts(self, numels: np.ndarray) -> np.ndarray:
        """Magnitude trim counts: int(density * n), at least 1; n for density >= 1; 0 when absent or <= 0."""
        counts = np.maximum(1, np.floor(self.densities * numels[:, None])).astype(np.int64)
        counts = np.where(self.densities >= 1, numels[:, None], counts)
        return np.where(self.present & (self.densities > 0), counts, 0)

    def pack(self, work_dtype: torch.dtype, cuts: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        segments, experts = self.weights.shape
        table = np.zeros((segments, PARAM_FIELDS * experts + 2), dtype=np.int32)
        rounded = torch.tensor(self.weights.reshape(-1).tolist(), dtype=work_dtype).float().numpy()
        rounded = np.where(self.present.reshape(-1), rounded, 0).astype(np.float32).reshape(segments, experts)
        _put(table, WEIGHT, experts, rounded.view(np.int32))
        _put(table, TIED, experts, np.full(self.weights.shape, ALL_TIED, dtype=np.int32))
        if cuts is not None:
            thresholds, tied = cuts
            # -inf keeps every element (density >= 1); +inf (absent, density <= 0) none.
            threshold = np.where(self.densities >= 1, -np.inf, thresholds).astype(np.float32)
            _put(table, THRESHOLD, experts, threshold.view(np.int32))
            tied = np.where(self.densities >= 1, ALL_TIED, tied).astype(np.int32)
            _put(table, TIED, experts, tied)
            self.split_ties = bool((tied != ALL_TIED).any())
        _put(table, DENSITY, experts, np.where(self.present, self.densities, 0).astype(np.float32).view(np.int32))
        _put(table, SEED, experts, self.seeds.astype(np.int32))
        table[:, PARAM_FIELDS * experts + LAMBDA] = self.lambdas.astype(np.float32).view(np.int32)
        table[:, PARAM_FIELDS * experts + NORMALIZE] = self.normalize.astype(np.int32)
        return table


def _put(table: np.ndarray, field: int, experts: int, values: np.ndarray) -> None:
    table[:, field * experts : (field + 1) * experts] = values
