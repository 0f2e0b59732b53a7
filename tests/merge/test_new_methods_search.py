"""The search space of the geometric and element-selecting methods.

Each searchable method builds its natural genes (nuslerp's and multislerp's per-model weights,
SCE's select_topk, nearswap's t and RAM's epsilon on a log scale, RAM+'s r and alpha), its first
candidate is its default merge, and a candidate the genome writes is a YAML that `mergekit-yaml`
merges to the same bits as `evomerge merge`. A method with nothing to search is refused by the
spec in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from evomerge.genome import Genome, num_layers_of
from evomerge.merge.registry import METHODS
from evomerge.spec import Spec

# method -> (experts, the genes' parameters, (low, high, log) of each)
SEARCHES = {
    "nuslerp": (["ft_a", "ft_b"], {"weight": (0.0, 1.0, False)}),
    "multislerp": (["ft_a", "ft_b", "ft_c"], {"weight": (0.0, 1.0, False)}),
    "sce": (["ft_a", "ft_b", "ft_c"], {"select_topk": (0.1, 1.0, False)}),
    "nearswap": (["ft_a"], {"t": (1e-5, 1e-2, True)}),
    "ram": (["ft_a", "ft_b", "ft_c"], {"epsilon": (1e-6, 1e-2, True)}),
    "ramplus_tl": (["ft_a", "ft_b", "ft_c"], {"r": (0.0, 1.0, False), "alpha": (0.0, 1.0, False)}),
}


def spec_for(zoo, method: str, experts: list[str], **genome) -> Spec:
    return Spec.model_validate(
        {
            "name": "new-methods",
            "runs_dir": "/tmp",
            "models": {"base": zoo.model("base"), "experts": [zoo.model(name) for name in experts]},
            "merge": {"method": method},
            "genome": {"layer_groups": 2, **genome},
            "evaluation": {"tasks": ["unused"]},
        }
    )


@pytest.mark.parametrize("method", sorted(SEARCHES))
def test_each_searchable_method_builds_its_natural_genes(zoo, method):
    experts, wanted = SEARCHES[method]
    genome = Genome(spec_for(zoo, method, experts), num_layers_of(zoo.model("base")))
    assert {gene.param for gene in genome.genes} == set(wanted)
    for gene in genome.genes:
        assert (gene.low, gene.high, gene.log) == wanted[gene.param], gene.name
        assert (gene.model is not None) == (gene.param == "weight"), gene.name
    per_site = (len(genome.weighted_models) if "weight" in wanted else 1) * len(wanted)
    assert genome.dim == 2 * per_site
    # The first candidate is the method's default merge, seeded as that baseline.
    defaults = dict(genome.baseline_points())
    assert list(defaults) == [METHODS[method].default_label]  # the base and parents lie outside these spaces
    assert np.allclose(defaults[METHODS[method].default_label], genome.x0())


def test_a_log_scale_gene_spreads_its_decades_evenly(zoo):
    genome = Genome(spec_for(zoo, "ram", ["ft_a", "ft_b"]), num_layers_of(zoo.model("base")))
    gene = genome.genes[0]
    assert [gene.value(u) for u in (0.0, 0.5, 1.0)] == pytest.approx([1e-6, 1e-4, 1e-2])
    assert gene.unit(1e-4) == pytest.approx(0.5)
    assert genome.decode(np.full(genome.dim, 0.123))[gene.name] == float(f"{gene.value(0.123):.6g}")


@pytest.mark.parametrize("method", sorted(SEARCHES))
def test_a_candidate_merges_as_mergekit_merges_its_yaml(zoo, write_config, tmp_path, method):
    pytest.importorskip("mergekit")
    from mergekit_equality import compare_with_mergekit

    experts, _ = SEARCHES[method]
    genome = Genome(spec_for(zoo, method, experts), num_layers_of(zoo.model("base")))
    point = np.random.default_rng(0).uniform(size=genome.dim)
    config = genome.merge_config_dict(point)
    assert (config.get("base_model") is not None) == METHODS[method].uses_base
    compare_with_mergekit(write_config(config), tmp_path).assert_bit_for_bit()


@pytest.mark.parametrize("method", ["model_stock", "karcher", "arcee_fusion", "passthrough"])
def test_a_method_with_nothing_to_search_is_refused_in_one_line(zoo, method):
    with pytest.raises(ValidationError) as refused:
        spec_for(zoo, method, ["ft_a", "ft_b"])
    message = refused.value.errors()[0]["msg"]
    assert f"{method} has no parameter to search" in message and "evomerge merge" in message
    assert "\n" not in message


@pytest.mark.parametrize("method", sorted(SEARCHES))
def test_the_seeded_default_merge_is_the_baseline_the_report_scores(zoo, tmp_path, method):
    from tiny_models import load_checkpoint_tensors

    from evomerge.merge.config import MergeConfig
    from evomerge.merge.engine import merge_to_disk
    from evomerge.preflight import baseline_configs

    experts, _ = SEARCHES[method]
    spec = spec_for(zoo, method, experts)
    genome = Genome(spec, num_layers_of(zoo.model("base")))
    label = METHODS[method].default_label
    merged = {}
    for name, config in (
        ("x0", genome.merge_config_dict(genome.x0())),
        ("baseline", dict(baseline_configs(spec))[label]),
    ):
        merge_to_disk(MergeConfig.model_validate(config), tmp_path / name, progress=False)
        merged[name] = load_checkpoint_tensors(tmp_path / name)
    assert merged["x0"].keys() == merged["baseline"].keys()
    assert all(torch.equal(merged["x0"][key], merged["baseline"][key]) for key in merged["baseline"]), method


@pytest.mark.parametrize("method", sorted(SEARCHES))
@pytest.mark.parametrize("optimizer", ["cmaes", "tpe"])
def test_a_short_search_of_each_method_runs_and_every_trial_is_that_method(tmp_path, method, optimizer):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fake_workers import fake_scheduler, fake_spec_data, open_search

    from evomerge.search.loop import create_run_dir

    experts = ["/frozen-run/expert_a", "/frozen-run/expert_b", "/frozen-run/expert_c"][: len(SEARCHES[method][0])]
    data = fake_spec_data(tmp_path, f"{method}-{optimizer}", budget={"max_evals": 20})  # 7 or 8 baselines first
    data |= {"merge": {"method": method}, "optimizer": {"name": optimizer, "seed": 7, "popsize": 4}}
    data["models"] = {**data["models"], "experts": experts}
    if optimizer == "tpe":
        data["optimizer"].pop("popsize")
    spec = Spec.model_validate(data)
    run_dir = create_run_dir(spec)
    trials = open_search(spec, run_dir).run_with(fake_scheduler())
    searched = [trial for trial in trials.values() if trial.kind == "optimizer"]
    # The fake workers fail trial 5 on purpose (fake_workers.FAILING_TRIAL).
    assert len([trial for trial in searched if trial.status == "completed"]) >= 9
    assert {trial.merge_config["merge_method"] for trial in searched} == {method}
    assert len({tuple(sorted(trial.params.items())) for trial in searched}) > 1, "the optimizer moved"
