"""Version 2's default search spaces contain every baseline.

For each of the 10 methods, the default genome's points for the base, each parent and the method's
default merge are decoded, merged by the CPU reference engine and compared bit for bit with the
baseline's own merge config (what preflight scores). Old runs (version 1) keep their space.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import load_checkpoint_tensors

from evomerge.genome import Genome, default_merge_label, num_layers_of
from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import merge_to_disk
from evomerge.merge.methods import METHODS
from evomerge.preflight import baseline_configs
from evomerge.rundir.trials import BASE_LABEL, LINEAR_LABEL
from evomerge.spec import Spec

EXPERTS = ("ft_a", "ft_b", "ft_c")


def make_spec(zoo, method: str, version: int = 2, **merge) -> Spec:
    experts = EXPERTS[:1] if method == "slerp" else EXPERTS
    return Spec.model_validate(
        {
            "name": "spaces",
            "runs_dir": "/tmp",
            "models": {"base": zoo.model("base"), "experts": [zoo.model(name) for name in experts]},
            "merge": {"method": method, **merge},
            "genome": {"layer_groups": 2, "split_attn_mlp": True, "embeddings": True},
            "evaluation": {"tasks": ["unused"]},
            "version": version,
        }
    )


def merged(config: dict, out_dir) -> dict[str, torch.Tensor]:
    merge_to_disk(MergeConfig.model_validate(config), out_dir, progress=False)
    return load_checkpoint_tensors(out_dir)


# The geometric and element-selecting methods' genes (select_topk, t, epsilon, shares of a
# spherical mean) do not reach the base or each parent; their seeded default merge is pinned in
# tests/merge/test_new_methods_search.py.
EVERY_BASELINE_METHODS = [name for name, m in METHODS.items() if m.family in ("linear", "slerp", "task_vector")]


@pytest.mark.parametrize("method", EVERY_BASELINE_METHODS)
def test_the_default_space_expresses_the_base_each_parent_and_the_default_merge_bit_for_bit(zoo, method, tmp_path):
    spec = make_spec(zoo, method)
    genome = Genome(spec, num_layers_of(zoo.model("base")))
    points = dict(genome.baseline_points())
    baselines = dict(baseline_configs(spec))
    wanted = [BASE_LABEL, *(label for label in baselines if label.startswith("parent:")), default_merge_label(method)]
    assert set(wanted) <= set(points), f"{method}: the default space misses {set(wanted) - set(points)}"
    np.testing.assert_array_equal(points[default_merge_label(method)], genome.x0())
    for index, label in enumerate(wanted):
        ours = merged(genome.merge_config_dict(points[label]), tmp_path / f"point{index}")
        reference = merged(baselines[label], tmp_path / f"baseline{index}")
        assert ours.keys() == reference.keys()
        different = [key for key in reference if not torch.equal(ours[key], reference[key])]
        assert not different, f"{method}: {label} differs in {different[:3]}"


@pytest.mark.parametrize("method", ["ties", "della"])
def test_normalizing_methods_can_scale_the_merged_task_vector_from_0_to_2(zoo, method):
    genome = Genome(make_spec(zoo, method), num_layers_of(zoo.model("base")))
    scales = [gene for gene in genome.genes if gene.param == "lambda"]
    assert scales and all((gene.low, gene.high) == (0.0, 2.0) for gene in scales)
    assert not [g for g in Genome(make_spec(zoo, "dare_ties"), 4).genes if g.param == "lambda"]  # weights scale it


def test_a_fixed_normalize_off_needs_no_scale_gene_and_fixed_trims_drop_only_the_parents(zoo):
    genome = Genome(make_spec(zoo, "ties", fixed={"normalize": False}), 4)
    assert "lambda" not in genome.params
    labels = [label for label, _ in Genome(make_spec(zoo, "ties", fixed={"density": 0.5}), 4).baseline_points()]
    assert labels == [BASE_LABEL]  # all weights 0 is the base whatever the trim; no default merge with fixed values


def test_version_1_keeps_the_old_space_and_seeds(zoo):
    old = Genome(make_spec(zoo, "ties", version=1), 4)
    assert old.params == ["weight", "density"]
    assert {old.decode(old.x0())[g.name] for g in old.genes if g.param == "weight"} == {0.5}
    assert [label for label, _ in old.baseline_points()] == [f"parent:{n}_fp32" for n in EXPERTS]
    assert LINEAR_LABEL in dict(Genome(make_spec(zoo, "task_arithmetic", version=1), 4).baseline_points())


def test_della_densities_decode_inside_the_range_its_epsilon_allows(zoo):
    """Version 3: a DELLA density within epsilon of 1 is no trim, one within epsilon of 0 is
    epsilon + 0.01; every decoded point passes the merge validator (it failed half the time before)."""
    from evomerge.merge.validate import validate_merge_config

    genome = Genome(make_spec(zoo, "della", version=3), 4)
    densities = [i for i, gene in enumerate(genome.genes) if gene.param == "density"]
    for unit in (0.0, 0.05, 0.5, 0.9, 0.95, 1.0):
        x = genome.x0().copy()
        x[densities] = unit
        values = genome.decode(x)
        for index in densities:
            density = values[genome.genes[index].name]
            assert density == 1.0 or 0.15 < density < 0.85
        validate_merge_config(genome.to_merge_config(x), "spec")
    old = Genome(make_spec(zoo, "della", version=2), 4)
    x = old.x0().copy()
    x[densities] = 0.95
    assert {old.decode(x)[old.genes[i].name] for i in densities} == {round(old.genes[densities[0]].value(0.95), 6)}
