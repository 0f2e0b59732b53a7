"""Where a method gene lies in a flat genome: what the optimizers need to choose among methods.

A genome with a method gene (`genome_multi.py`) is `[method gene] + one span of genes per method`.
The method gene is coordinate 0; its [0, 1] range is cut into equal parts, one per method in
order, and a point choosing method i puts it at the middle of part i. Only the chosen method's
span is active: the others are ignored when the point is decoded, and a point an optimizer builds
itself keeps them at x0's values, so the journal holds one method's genes per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHOD_PARAM = "method"  # the categorical parameter's name in Optuna's studies


@dataclass(frozen=True)
class MethodChoice:
    """The methods (in the spec's order) and each one's [start, stop) span of genes."""

    names: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]

    def index_of(self, unit: float) -> int:
        """The method a method gene's value chooses."""
        return min(len(self.names) - 1, max(0, int(float(unit) * len(self.names))))

    def unit_of(self, index: int) -> float:
        """The method gene's value that chooses method `index`: the middle of its part."""
        return (index + 0.5) / len(self.names)

    def point(self, index: int, own: np.ndarray, x0: np.ndarray) -> np.ndarray:
        """x0 with method `index` chosen and its span set to `own`."""
        start, stop = self.spans[index]
        x = np.array(x0, dtype=np.float64)
        x[0] = self.unit_of(index)
        x[start:stop] = own
        return x

    def own(self, x: np.ndarray, index: int) -> np.ndarray:
        start, stop = self.spans[index]
        return np.asarray(x, dtype=np.float64)[start:stop]

    def sample_uniform(self, rng: np.random.Generator, lower, upper, x0) -> np.ndarray:
        """A method drawn uniformly, then its genes uniformly in their box; the rest at x0."""
        index = int(rng.integers(len(self.names)))
        start, stop = self.spans[index]
        return self.point(index, rng.uniform(lower[start:stop], upper[start:stop]), x0)
