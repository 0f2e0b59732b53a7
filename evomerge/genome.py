"""The search space: a flat vector in the unit box <-> a mergekit merge config.

Every gene lives in [0, 1] and maps linearly onto its parameter's bounds, so the decode is smooth
and has no flat regions for the optimizer to get lost in. A candidate is written as a standard
`slices:` config with one slice per layer group, so the very config a worker merges is the one
`evomerge export` hands to mergekit. x0 is the method's default recipe, so the first generation
contains it.

From search version 2 (`Spec.version`) the default space contains every baseline: the base (all
weights 0; for linear the base is a weighted source too; for slerp t = 0), each parent (its weight
1, the others 0, density 1, lambda 1) and the method's default merge (x0: weights 1, mergekit's
defaults), and normalizing methods also evolve lambda in [0, 2] so the merged task vector can
shrink. Version 1 keeps the old space so old runs replay unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from evomerge.merge.config import MergeConfig
from evomerge.merge.parameters import PARAMETERS, SEARCHABLE, default_of
from evomerge.merge.registry import METHODS
from evomerge.optim.choice import MethodChoice
from evomerge.rundir.genes import EMBED, HEAD, GeneRow, gene_name
from evomerge.rundir.trials import BASE_LABEL, LINEAR_LABEL, parent_label
from evomerge.spec import Spec


def default_merge_label(method: str) -> str:
    """The baseline label of `method` with its default settings (weights 1, density 0.5, t 0.5)."""
    return METHODS[method].default_label


# The first candidate's values in the shared table (a method's own facts may differ, see
# Genome.default_values; weight's depends on normalization).
DEFAULT_VALUES = {p: PARAMETERS[p].search_start for p in SEARCHABLE if PARAMETERS[p].search_start is not None}


class Region(Enum):
    """Where a gene acts: one layer group, or the embeddings / the final norm and head."""

    LAYERS = "layers"
    EMBED = EMBED
    HEAD = HEAD


@dataclass(frozen=True)
class Gene:
    param: str
    model: int | None  # expert index, None for parameters shared by all models
    group: int | None  # layer-group index; None for the embeddings and head genes
    region: Region
    part: str | None  # "attn" (everything but the MLP), "mlp", or None
    low: float
    high: float
    name: str = field(init=False, compare=False)  # derived from the fields, for display and journal keys
    # The gene moves the exponent (log-uniform between positive bounds): thresholds spanning decades.
    log: bool = False

    def __post_init__(self):
        object.__setattr__(self, "name", gene_name(self.param, self.model, self.site, self.part))

    @property
    def site(self) -> int | str:
        """The layer-group index, or 'embed' / 'head'."""
        return self.group if self.region is Region.LAYERS and self.group is not None else self.region.value

    def value(self, unit: float) -> float:
        if self.log:
            return math.exp(math.log(self.low) + float(unit) * (math.log(self.high) - math.log(self.low)))
        return self.low + float(unit) * (self.high - self.low)

    def unit(self, value: float) -> float:
        if self.log:
            position = (math.log(max(value, self.low)) - math.log(self.low)) / (
                math.log(self.high) - math.log(self.low)
            )
            return float(np.clip(position, 0.0, 1.0))
        return float(np.clip((value - self.low) / (self.high - self.low), 0.0, 1.0))

    def rounded(self, value: float) -> float:
        """The value a candidate's config carries: 6 decimals, or 6 significant digits on a log scale."""
        return float(f"{value:.6g}") if self.log else round(value, 6)


def layer_groups(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges, as even as possible; needs groups <= num_layers."""
    if not 1 <= groups <= num_layers:
        raise ValueError(f"{groups} layer groups cannot split {num_layers} layers")
    edges = np.linspace(0, num_layers, groups + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


class Genome:
    """Named genes for a spec and a base model with `num_layers` layers."""

    choice: MethodChoice | None = None  # one method: no method gene (several: genome_multi.py)

    def __init__(self, spec: Spec, num_layers: int):
        self.spec = spec
        self.method = METHODS[spec.merge.method]
        self.fixed = dict(spec.merge.fixed)
        self.params = spec.searched_params
        self.version = spec.version
        # Whose per-model genes exist: the experts, and from version 2 the base for linear (which
        # otherwise cannot express the base model).
        self.weighted_models = list(spec.models.experts)
        if self.version >= 2 and self.method.base_is_source:
            self.weighted_models.append(spec.models.base)
        self.per_model = {p for p in self.params if self.method.facts(p).per_model}
        self.groups = layer_groups(num_layers, spec.genome.layer_groups)
        self.genes = self._make_genes()
        self._branches = self._branch_templates()
        self._fixed_parameters = _without_nones(dict(self.fixed)) or None
        self.dim = len(self.genes)
        self.lower = np.zeros(self.dim)
        self.upper = np.ones(self.dim)

    def _bounds(self, param: str) -> tuple[float, float]:
        if param in self.spec.genome.bounds:
            return tuple(self.spec.genome.bounds[param])
        return self.method.search_bounds(param, self.fixed, self.version)

    def _make_genes(self) -> list[Gene]:
        sites = [(Region.LAYERS, index) for index in range(len(self.groups))]
        if self.spec.genome.embeddings:
            sites += [(Region.EMBED, None), (Region.HEAD, None)]
        parts = ("attn", "mlp") if self.spec.genome.split_attn_mlp else (None,)
        models = range(len(self.weighted_models))
        genes = []
        for param in self.params:
            owners = models if param in self.per_model else [None]
            low, high = self._bounds(param)
            log = self.method.facts(param).log_scale and low > 0
            for model in owners:
                for region, group in sites:
                    for part in parts if region is Region.LAYERS else (None,):
                        genes.append(Gene(param, model, group, region, part, low, high, log=log))
        return genes

    def gene_table(self) -> list[GeneRow]:
        """What every gene means, for the journal and the report (nothing parses gene names)."""
        return [
            GeneRow(
                gene.name,
                gene.param,
                gene.model,
                gene.site,
                gene.part,
                self.groups[gene.group] if gene.group is not None else None,
            )
            for gene in self.genes
        ]

    def default_values(self) -> dict[str, float]:
        """x0: version 2 puts every weight at 1, which is exactly the method's default merge."""
        weight = 1.0 if self.version >= 2 or not self.method.weights_average(self.fixed) else 0.5
        starts = {p: self.method.facts(p).search_start for p in self.params}
        defaults = {p: start for p, start in starts.items() if start is not None} | {"weight": weight}
        values = {gene.name: defaults[gene.param] for gene in self.genes}
        for gene in self._base_weight_genes():
            values[gene.name] = 0.0
        return {
            name: min(max(value, gene.low), gene.high)
            for (name, value), gene in zip(values.items(), self.genes, strict=True)
        }

    def _base_weight_genes(self) -> list[Gene]:
        """The genes that weight the base as a source (linear, version 2)."""
        if len(self.weighted_models) == len(self.spec.models.experts):
            return []
        return [g for g in self.genes if g.param == "weight" and g.model == len(self.spec.models.experts)]

    def x0(self) -> np.ndarray:
        return self.encode(self.default_values())

    def baseline_points(self) -> list[tuple[str, np.ndarray]]:
        """The baselines this genome can express, as (baseline label, point) to seed the optimizer.

        Version 1: each expert alone (its weights 1, the others' 0, density 1, where that
        sparsification is then a no-op), and for task arithmetic the equal-weight average. Version
        2 adds the base and the method's default merge (x0). A baseline outside the spec's bounds
        or fixed parameters is left out.
        """
        if self.version >= 2:
            return self._baseline_points_v2()
        if "weight" not in self.params or not self.method.exact_at_density_one:
            return []
        experts = list(self.spec.models.experts)
        points = []
        for index, path in enumerate(experts):
            point = self._point_with(lambda gene, index=index: 1.0 if gene.model == index else 0.0)
            points.append((parent_label(path), point))
        if self.method.expresses_average and len(experts) > 1:
            points.append((LINEAR_LABEL, self._point_with(lambda gene: 1.0 / len(experts))))
        return [(label, point) for label, point in points if point is not None]

    def _baseline_points_v2(self) -> list[tuple[str, np.ndarray]]:
        experts = list(self.spec.models.experts)
        base_index = len(experts)  # the base's genes (linear) or none
        points = [(BASE_LABEL, self._alone(base_index))]
        points += [(parent_label(path), self._alone(index)) for index, path in enumerate(experts)]
        if not self.fixed:  # fixed settings make x0 another merge than the default one
            points.append((self.method.default_label, self._exact(self.default_values())))
        if self.method.expresses_average and len(experts) > 1:
            points.append((LINEAR_LABEL, self._point_with(lambda gene: 1.0 / len(experts))))
        return [(label, point) for label, point in points if point is not None]

    def _alone(self, model: int) -> np.ndarray | None:
        """The point that merges to one model alone (model == number of experts: the base)."""
        mix = self.method.interpolation  # 0 is the base, 1 the expert
        if mix is not None:
            if mix not in self.params:
                return None
            return self._with_values({mix: 0.0 if model == len(self.spec.models.experts) else 1.0})
        if "weight" not in self.params or self.method.weights_are_shares:
            # Shares of a spherical mean reach one model only up to rounding (nuslerp's weights 0
            # and 0 are even its midpoint): no seed is labelled as a baseline it only approximates.
            return None
        if model == len(self.spec.models.experts) and not self.method.base_is_source:
            # All weights 0: nothing is added to the base, whatever the trims.
            return self._point_with(lambda gene: 0.0, sparsified=False)
        return self._point_with(lambda gene: 1.0 if gene.model == model else 0.0)

    def _with_values(self, wanted: dict[str, float]) -> np.ndarray | None:
        values = self.default_values()
        if any(p in self.fixed and self.fixed[p] != v for p, v in wanted.items()):
            return None
        for gene in self.genes:
            if gene.param in wanted:
                values[gene.name] = wanted[gene.param]
        return self._exact(values)

    def _exact(self, values: dict[str, float]) -> np.ndarray | None:
        """The point for `values`, or None when a value lies outside its gene's bounds."""
        if any(not gene.low <= values[gene.name] <= gene.high for gene in self.genes):
            return None
        point = self.encode(values)
        wanted = {gene.name: gene.rounded(values[gene.name]) for gene in self.genes}
        return point if self.decode(point) == wanted else None

    def _point_with(self, weight_of, sparsified: bool = True) -> np.ndarray | None:
        """Defaults, weights from weight_of(gene), density 1; None when a value is out of bounds.

        `sparsified` False: the weights alone decide (all 0), so fixed trims do not matter.
        """
        if sparsified and any(self.fixed.get(p, 1.0) != 1.0 for p in ("density", "lambda")):
            return None
        values = self.default_values()
        for gene in self.genes:
            wanted = {"weight": weight_of(gene), "density": 1.0, "lambda": 1.0}.get(gene.param)
            if wanted is not None:
                if not gene.low <= wanted <= gene.high:
                    return None
                values[gene.name] = wanted
        return self._exact(values) if self.version >= 2 else self.encode(values)

    def encode(self, values: dict[str, float]) -> np.ndarray:
        return np.array([gene.unit(values[gene.name]) for gene in self.genes])

    def decode(self, x) -> dict[str, float]:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise ValueError(f"expected a vector of {self.dim} genes, got shape {x.shape}")
        values = {gene.name: gene.rounded(gene.value(u)) for gene, u in zip(self.genes, x, strict=False)}
        if self.version >= 3 and "epsilon" in self.method.tunable:
            values = self._della_densities(values)
        return values

    def _della_densities(self, values: dict[str, float]) -> dict[str, float]:
        """DELLA keeps each delta with a probability in density ± epsilon, which must stay inside
        (0, 1): a density within epsilon of 1 decodes to 1 (no trim: the parent and task-arithmetic
        points), one within epsilon of 0 to epsilon + 0.01. Without this, any density above
        1 - epsilon (0.85 by default) was a failed candidate."""
        fixed_epsilon = float(self.fixed.get("epsilon", default_of("epsilon")))
        for gene in self.genes:
            if gene.param != "density":
                continue
            epsilon_gene = gene_name("epsilon", gene.model, gene.site, gene.part)
            epsilon = values.get(epsilon_gene, fixed_epsilon)
            density = values[gene.name]
            if density + epsilon >= 1:
                values[gene.name] = 1.0
            elif density - epsilon <= 0:
                values[gene.name] = round(epsilon + 0.01, 6)
        return values

    def to_merge_config(self, x) -> MergeConfig:
        return MergeConfig.model_validate(self.merge_config_dict(x))

    def merge_config_dict(self, x, values: dict[str, float] | None = None) -> dict:
        """The candidate's mergekit config as plain data (what the journal and workers carry).

        `values` is `decode(x)` when the caller already has it.
        """
        values = self.decode(x) if values is None else values
        spec = self.spec
        slices = []
        for index, (start, end) in enumerate(self.groups):
            sources = []
            for model_index, path in enumerate(self.weighted_models):
                params = {p: self._setting(values, p, model_index, index) for p in self.params if p in self.per_model}
                sources.append(_present(model=path, layer_range=[start, end], parameters=params or None))
            if self.method.uses_base:
                sources.append({"model": spec.models.base, "layer_range": [start, end]})
            shared = {p: self._setting(values, p, None, index) for p in self.params if p not in self.per_model}
            slices.append(_present(sources=sources, parameters=shared or None))
        # Built without None entries directly: cleaning a 500-gene config afterwards cost more
        # than building it (docs/BENCHMARKS.md, driver overhead).
        return _present(
            merge_method=self.method.name,
            base_model=spec.models.base if self.method.uses_base else None,
            slices=slices,
            parameters=dict(self._fixed_parameters) if self._fixed_parameters else None,
            dtype=spec.merge.dtype,
            tokenizer_source="base",
        )

    def _setting(self, values: dict[str, float], param: str, model: int | None, group_index: int):
        """A scalar, or filter branches (attn/mlp, embeddings/head) as mergekit reads them."""
        branches = self._branches[(param, model, group_index)]
        if len(branches) == 1:
            return values[branches[0][1]]
        return [{"filter": f, "value": values[name]} if f else {"value": values[name]} for f, name in branches]

    def _branch_templates(self) -> dict[tuple, list[tuple[str | None, str]]]:
        """(param, model, group index) -> [(filter or None, gene name)], in mergekit's match order.

        Worked out once per genome, so building a candidate's config is only lookups.
        """
        name_of = {(g.param, g.model, g.site, g.part): g.name for g in self.genes}
        owners = {p: list(range(len(self.weighted_models))) if p in self.per_model else [None] for p in self.params}
        templates = {}
        for param in self.params:
            for model in owners[param]:
                for index in range(len(self.groups)):
                    templates[(param, model, index)] = self._branches_of(name_of, param, model, index)
        return templates

    def _branches_of(self, name_of: dict, param: str, model: int | None, index: int) -> list[tuple[str | None, str]]:
        if self.spec.genome.split_attn_mlp:
            branches = [("mlp", name_of[(param, model, index, "mlp")]), (None, name_of[(param, model, index, "attn")])]
        else:
            branches = [(None, name_of[(param, model, index, None)])]
        if self.spec.genome.embeddings:
            if index == 0:
                branches.insert(0, ("embed_tokens", name_of[(param, model, EMBED, None)]))
            if index == len(self.groups) - 1:
                head = name_of[(param, model, HEAD, None)]
                branches[:0] = [("lm_head", head), ("model.norm.", head)]
        return branches


def _present(**fields) -> dict:
    return {key: value for key, value in fields.items() if value is not None}


def _without_nones(value):
    if isinstance(value, dict):
        return {k: _without_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nones(v) for v in value]
    return value


def num_layers_of(model_path: str | Path) -> int:
    import json

    return int(json.loads((Path(model_path) / "config.json").read_text())["num_hidden_layers"])
