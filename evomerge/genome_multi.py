"""The search space of a spec that lists several methods: a method gene, then each method's genes.

The flat vector is `[method gene] + method 1's genes + method 2's genes + ...`, every coordinate in
[0, 1] like `Genome`'s. The method gene splits [0, 1] into equal parts, one per listed method in
the spec's order; a candidate merges with the chosen method and that method's own genes, and the
other methods' genes are inactive (ignored by the decode; a point the search builds itself sets
them to their method's x0). So a candidate's config is an ordinary single-method mergekit config,
exported like any other.

`choice` tells the optimizers where each method's genes lie, so Optuna's samplers draw the method
as a categorical parameter with the chosen method's genes conditional on it, and CMA-ES races one
strategy per method (`optim/method_race.py`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from evomerge.genome import Gene, Genome
from evomerge.merge.config import MergeConfig
from evomerge.optim.choice import MethodChoice
from evomerge.rundir.genes import GeneRow
from evomerge.spec import Spec
from evomerge.spec_methods import chooses_method, method_spec


def make_genome(spec: Spec, num_layers: int) -> Genome | MethodChoiceGenome:
    """The spec's search space: one method's genome, or the method gene over each listed method's."""
    return MethodChoiceGenome(spec, num_layers) if chooses_method(spec) else Genome(spec, num_layers)


class MethodChoiceGenome:
    """One `Genome` per listed method behind a leading method gene; the same interface as `Genome`."""

    def __init__(self, spec: Spec, num_layers: int):
        self.spec = spec
        self.version = spec.version
        self.names = spec.merge.methods
        self.genomes = [Genome(method_spec(spec, name), num_layers) for name in self.names]
        starts = np.cumsum([1] + [genome.dim for genome in self.genomes])
        self.choice = MethodChoice(
            tuple(self.names), tuple((int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True))
        )
        self.dim = int(starts[-1])
        self.lower = np.zeros(self.dim)
        self.upper = np.ones(self.dim)
        # The first method chosen, every method's genes at its own x0 (what inactive genes keep).
        self._x0 = np.concatenate([[self.choice.unit_of(0)], *(genome.x0() for genome in self.genomes)])

    @property
    def genes(self) -> list[Gene]:
        """Every method's genes once by name, bounds widened to hold each method's (the Optuna view)."""
        merged: dict[str, Gene] = {}
        for genome in self.genomes:
            for gene in genome.genes:
                seen = merged.get(gene.name)
                merged[gene.name] = (
                    gene
                    if seen is None
                    else replace(seen, low=min(seen.low, gene.low), high=max(seen.high, gene.high), log=False)
                )
        return list(merged.values())

    def gene_table(self) -> list[GeneRow]:
        """Every method's gene rows once by name: a name means one parameter, model and site in all."""
        rows: dict[str, GeneRow] = {}
        for genome in self.genomes:
            for row in genome.gene_table():
                rows.setdefault(row.name, row)
        return list(rows.values())

    def method_index(self, x) -> int:
        return self.choice.index_of(float(np.asarray(x, dtype=float)[0]))

    def method_of(self, x) -> str:
        """The method a candidate merges with."""
        return self.names[self.method_index(x)]

    def point(self, index: int, own: np.ndarray) -> np.ndarray:
        """The full vector choosing method `index` with its genes `own`; the others' genes at their x0."""
        return self.choice.point(index, own, self._x0)

    def x0(self) -> np.ndarray:
        """The first listed method's default merge."""
        return self._x0.copy()

    def baseline_points(self) -> list[tuple[str, np.ndarray]]:
        """Each method's baseline points, one per label: the base and the parents, expressed by the
        first listed method that can, and every method's own default merge."""
        points: dict[str, np.ndarray] = {}
        for index, genome in enumerate(self.genomes):
            for label, own in genome.baseline_points():
                points.setdefault(label, self.point(index, own))
        return list(points.items())

    def decode(self, x) -> dict[str, float]:
        """The chosen method's gene values (the method itself: `method_of`)."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise ValueError(f"expected a vector of {self.dim} genes, got shape {x.shape}")
        index = self.method_index(x)
        return self.genomes[index].decode(self.choice.own(x, index))

    def merge_config_dict(self, x, values: dict[str, float] | None = None) -> dict:
        """The chosen method's ordinary mergekit config; `values` is `decode(x)` when known."""
        index = self.method_index(x)
        return self.genomes[index].merge_config_dict(self.choice.own(x, index), values)

    def to_merge_config(self, x) -> MergeConfig:
        return MergeConfig.model_validate(self.merge_config_dict(x))

    def method_x0s(self) -> list[np.ndarray]:
        """Each listed method's default merge as a full vector (what each method's search starts from)."""
        return [self.point(index, genome.x0()) for index, genome in enumerate(self.genomes)]


def first_points(genome) -> list[np.ndarray]:
    """The points preflight merges once to check the configs: each listed method's default merge."""
    return genome.method_x0s() if isinstance(genome, MethodChoiceGenome) else [genome.x0()]
