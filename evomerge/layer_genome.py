"""The layer (data-flow) search space: a flat vector in the unit box <-> a path through the models' layers.

As in Sakana's evolutionary model merge, the base's layer order is repeated to `max_steps` slots
(slot t is layer t mod L of a base with L layers); per slot one gene says whether the path takes it
(above 0.5), one picks which model's copy of that layer (the base or an expert, in equal bins),
and with `search.scales` one scales what the step writes to the residual stream. The chosen slots,
in order, are the merged model's layers: a mergekit `passthrough` merge whose `slices` join runs of
consecutive layers of one model, so the candidate a worker scores is the config `evomerge export`
writes and `mergekit-yaml` rebuilds. The embeddings come from the first step's model and the final
norm and head from the last step's (mergekit's rule for slices).

With `search.block: k` one slot's genes cover k consecutive positions (layers), taken together
from one model at one scale: k times fewer genes, and moves that swap or add a whole block at once
(a depth-expanded model's new block, a stack of blocks) are one step for the optimizer instead of
k coordinated ones.

x0 is the base itself (its layers in order, the repeats skipped); each parent alone is a baseline
point too. Genes sit mid-bin (0.75 / 0.25 for take / skip) so the optimizer starts inside a bin,
not on its edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.merge.config import MergeConfig
from evomerge.merge.io import ModelFolder
from evomerge.merge.layer_paths import RESIDUAL_WRITERS
from evomerge.rundir.genes import GeneRow, gene_name
from evomerge.rundir.trials import BASE_LABEL, parent_label
from evomerge.search_space import SCALE_BOUNDS
from evomerge.spec import Spec

INCLUDE, MODEL, SCALE = "include", "model", "scale"
TAKE, SKIP = 0.75, 0.25  # a take / skip gene's encoded value: mid-bin


@dataclass(frozen=True)
class Step:
    """One layer of the merged model: layer `layer` of source `model` (0 the base, i + 1 expert i)."""

    model: int
    layer: int
    scale: float = 1.0


@dataclass(frozen=True)
class LayerGene:
    param: str  # include, model or scale
    slot: int
    low: float
    high: float
    name: str = field(init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "name", gene_name(self.param, None, self.slot, None))


class LayerGenome:
    """Genes of a layer path for a spec and a base model with `num_layers` layers."""

    def __init__(self, spec: Spec, num_layers: int):
        self.spec = spec
        self.version = spec.version
        self.num_layers = num_layers
        self.models = [spec.models.base, *spec.models.experts]
        self.steps = spec.search.steps_for(num_layers)
        self.block = spec.search.layers_per_slot  # consecutive positions one slot's genes take together
        if self.steps < num_layers or self.steps % self.block or num_layers % self.block:
            raise ValueError(f"{self.steps} steps in blocks of {self.block} cannot hold the base's {num_layers} layers")
        self.genes = self._make_genes()
        self.dim = len(self.genes)
        self.lower = np.zeros(self.dim)
        self.upper = np.ones(self.dim)

    def _make_genes(self) -> list[LayerGene]:
        genes = []
        for slot in range(self.steps // self.block):
            genes.append(LayerGene(INCLUDE, slot, 0.0, 1.0))
            if len(self.models) > 1:
                genes.append(LayerGene(MODEL, slot, 0.0, float(len(self.models) - 1)))
            if self.spec.search.scales:
                genes.append(LayerGene(SCALE, slot, *SCALE_BOUNDS))
        return genes

    def layer_of(self, position: int) -> int:
        return position % self.num_layers

    def gene_table(self) -> list[GeneRow]:
        """What every gene means, for the journal and the report: slot s acts on the layers of
        positions s*block .. s*block+block-1, position t being layer t mod L."""
        return [
            GeneRow(gene.name, gene.param, None, gene.slot, None, (first, first + self.block))
            for gene in self.genes
            for first in [self.layer_of(gene.slot * self.block)]
        ]

    # -- points ------------------------------------------------------------------------------

    def path_point(self, path: list[Step]) -> np.ndarray:
        """The point whose decode is `path`: each step at the first position of its layer after the
        previous step's; a slot's positions must be all taken, from one model at one scale, or none."""
        chosen = dict(zip(self._slots_of(path), path, strict=True))
        point = []
        for gene in self.genes:
            step = self._slot_step(chosen, gene.slot)
            if gene.param == INCLUDE:
                point.append(TAKE if step else SKIP)
            elif gene.param == MODEL:
                point.append((step.model + 0.5) / len(self.models) if step else 0.5)
            else:
                point.append(_scale_unit(step.scale if step else 1.0))
        return np.array(point)

    def _slot_step(self, chosen: dict[int, Step], slot: int) -> Step | None:
        """The step that stands for slot `slot`'s positions in `chosen` (position -> step), or None."""
        steps = [chosen.get(position) for position in range(slot * self.block, (slot + 1) * self.block)]
        if all(step is None for step in steps):
            return None
        first = steps[0]
        if first is None or any(
            step is None or (step.model, step.scale) != (first.model, first.scale) for step in steps
        ):
            raise ValueError(f"the path does not fit slots of {self.block} layers taken together")
        return first

    def _slots_of(self, path: list[Step]) -> list[int]:
        slots, slot = [], -1
        for step in path:
            slot += 1 + (step.layer - self.layer_of(slot + 1)) % self.num_layers
            if slot >= self.steps:
                raise ValueError(f"the path does not fit {self.steps} slots")
            slots.append(slot)
        return slots

    def model_alone(self, model: int) -> list[Step]:
        """One model's own layers in order."""
        return [Step(model, layer) for layer in range(self.num_layers)]

    def x0(self) -> np.ndarray:
        return self.path_point(self.model_alone(0))

    def default_values(self) -> dict[str, float]:
        return self.decode(self.x0())

    def baseline_configs(self) -> list[tuple[str, dict]]:
        """The baselines every layer search scores first: the base and each parent, as layer paths."""
        return [(label, self.merge_config_dict(point)) for label, point in self.baseline_points()]

    def baseline_points(self) -> list[tuple[str, np.ndarray]]:
        """The base and each parent alone, as (baseline label, point) to seed the optimizer."""
        points = [(BASE_LABEL, self.x0())]
        points += [
            (parent_label(path), self.path_point(self.model_alone(i + 1))) for i, path in enumerate(self.models[1:])
        ]
        return points

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, x) -> dict[str, float]:
        """Gene name -> its value: include 0 or 1, the model's index, the scale rounded to 0.01.

        A vector that takes no slot takes the one whose include gene is highest: a model has a layer.
        """
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise ValueError(f"expected a vector of {self.dim} genes, got shape {x.shape}")
        values: dict[str, float] = {}
        for gene, unit in zip(self.genes, np.clip(x, 0.0, 1.0), strict=True):
            if gene.param == INCLUDE:
                values[gene.name] = 1.0 if unit > 0.5 else 0.0
            elif gene.param == MODEL:
                values[gene.name] = float(min(int(unit * len(self.models)), len(self.models) - 1))
            else:
                values[gene.name] = _scale_value(unit)
        includes = [(gene, unit) for gene, unit in zip(self.genes, x, strict=True) if gene.param == INCLUDE]
        if not any(values[gene.name] for gene, _ in includes):
            values[max(includes, key=lambda item: item[1])[0].name] = 1.0
        return values

    def path(self, values: dict[str, float]) -> list[Step]:
        """The decoded path: every taken slot, in order."""
        steps = []
        for position in range(self.steps):
            slot = position // self.block
            if values[gene_name(INCLUDE, None, slot, None)]:
                model = int(values.get(gene_name(MODEL, None, slot, None), 0.0))
                scale = values.get(gene_name(SCALE, None, slot, None), 1.0)
                steps.append(Step(model, self.layer_of(position), scale))
        return steps

    def to_merge_config(self, x) -> MergeConfig:
        return MergeConfig.model_validate(self.merge_config_dict(x))

    def merge_config_dict(self, x, values: dict[str, float] | None = None) -> dict:
        """The candidate's mergekit config as plain data; `values` is `decode(x)` when the caller has it."""
        values = self.decode(x) if values is None else values
        return path_config(self.path(values), self.models, self.spec.merge.dtype)


def path_config(path: list[Step], models: list[str], dtype: str) -> dict:
    """A passthrough merge of `slices` taking the path's layers; runs of one model's consecutive
    layers at one scale are one slice."""
    slices: list[dict[str, Any]] = []
    previous: Step | None = None
    for step in path:
        joins = previous is not None and (previous.model, previous.layer + 1, previous.scale) == (
            step.model,
            step.layer,
            step.scale,
        )
        if joins:
            slices[-1]["sources"][0]["layer_range"][1] += 1
        else:
            source: dict[str, Any] = {"model": models[step.model], "layer_range": [step.layer, step.layer + 1]}
            if step.scale != 1.0:
                source["parameters"] = {"scale": [{"filter": name, "value": step.scale} for name in RESIDUAL_WRITERS]}
            slices.append({"sources": [source]})
        previous = step
    return {"merge_method": "passthrough", "slices": slices, "dtype": dtype}


def _scale_value(unit: float) -> float:
    low, high = SCALE_BOUNDS
    return round(low + float(unit) * (high - low), 2)


def _scale_unit(scale: float) -> float:
    low, high = SCALE_BOUNDS
    return float(np.clip((scale - low) / (high - low), 0.0, 1.0))


def layer_genome_problem(spec: Spec, base: ModelFolder) -> str | None:
    """Why `spec`'s layer space does not fit the base model (one line), or None."""
    steps = spec.search.steps_for(base.num_layers)
    if steps < base.num_layers:
        return (
            f"search.max_steps: {steps} is fewer than the base model's {base.num_layers} layers, so the base itself "
            f"is no path; use at least {base.num_layers}"
        )
    block = spec.search.layers_per_slot
    if base.num_layers % block or steps % block:
        return (
            f"search.block: {block} must divide the base model's {base.num_layers} layers and search.max_steps ({steps}); "
            f"use a divisor of {base.num_layers}"
        )
    if spec.search.scales and not all(any(w in name for name in base.tensors) for w in RESIDUAL_WRITERS):
        return (
            f"search.scales: the base model has no {' or '.join(RESIDUAL_WRITERS)} tensors for a step's scale to act on; "
            "set scales: false"
        )
    return None
