"""The genome's baseline seeds: which baselines a search space can express, and that the seeded
points merge to exactly those baselines (each parent bit for bit, linear to float precision).

These pin search version 1, the space and seeding rule old runs keep; version 2's spaces are in
tests/test_genome_baselines.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import load_checkpoint_tensors

from evomerge.genome import Genome, Region, layer_groups, num_layers_of
from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import merge_to_disk
from evomerge.merge.parameters import PARAMETERS
from evomerge.rundir.genes import GeneRow
from evomerge.spec import Spec

EXPERTS = ("ft_a", "ft_b", "ft_c")


def make_genome(zoo, method: str, **genome) -> Genome:
    spec = Spec.model_validate(
        {
            "name": "seeds",
            "runs_dir": "/tmp",
            "models": {"base": zoo.model("base"), "experts": [zoo.model(name) for name in EXPERTS]},
            "merge": {"method": method},
            "genome": {"layer_groups": 2, "split_attn_mlp": True, "embeddings": True, **genome},
            "evaluation": {"tasks": ["unused"]},
            "version": 1,
        }
    )
    return Genome(spec, num_layers_of(zoo.model("base")))


def merged_tensors(genome: Genome, point: np.ndarray, out_dir) -> dict[str, torch.Tensor]:
    merge_to_disk(MergeConfig.model_validate(genome.merge_config_dict(point)), out_dir, progress=False)
    return load_checkpoint_tensors(out_dir)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "linear"])
def test_each_seeded_parent_merges_to_exactly_that_parent(zoo, method, tmp_path):
    genome = make_genome(zoo, method)
    seeds = dict(genome.baseline_points())
    for name in EXPERTS:
        point = seeds[f"parent:{name}_fp32"]
        weights = {gene.model: genome.decode(point)[gene.name] for gene in genome.genes if gene.param == "weight"}
        assert weights == {i: float(EXPERTS[i] == name) for i in range(len(EXPERTS))}
        merged, parent = merged_tensors(genome, point, tmp_path / name), load_checkpoint_tensors(zoo.model(name))
        assert merged.keys() == parent.keys()
        assert all(torch.equal(merged[key], parent[key]) for key in parent), f"{method}: {name} is not reproduced"


def test_task_arithmetic_also_seeds_linears_equal_weights(zoo, tmp_path):
    genome = make_genome(zoo, "task_arithmetic")
    seeds = dict(genome.baseline_points())
    assert list(seeds) == [f"parent:{name}_fp32" for name in EXPERTS] + ["linear (equal weights)"]
    merged = merged_tensors(genome, seeds["linear (equal weights)"], tmp_path / "ta")
    parents = [load_checkpoint_tensors(zoo.model(name)) for name in EXPERTS]
    for key, tensor in merged.items():
        average = sum(p[key] for p in parents) / len(parents)
        # Gene values are kept to 6 decimals, so the weights are 0.333333, not 1/3.
        torch.testing.assert_close(tensor, average, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "method, genome_settings",
    [
        ("breadcrumbs", {}),  # its outlier cut removes deltas even at density 1
        ("della", {}),
        ("slerp", {}),
        ("ties", {"params": ["density"]}),  # no weight gene to isolate an expert
        ("task_arithmetic", {"bounds": {"weight": [0.4, 2.0]}}),  # weights 0 and 1/3 are out of bounds
    ],
)
def test_no_seed_where_the_genome_cannot_express_the_baseline(zoo, method, genome_settings):
    assert make_genome(zoo, method, **genome_settings).baseline_points() == []


def test_a_seed_is_dropped_alone_when_its_own_values_leave_the_bounds(zoo):
    labels = [
        label for label, _ in make_genome(zoo, "task_arithmetic", bounds={"weight": [0.2, 2.0]}).baseline_points()
    ]
    assert labels == ["linear (equal weights)"]  # 1/3 is inside, a parent's 0 is not


def fake_result(trial_id: int, score: float):
    from evomerge.rundir.events import TrialResult

    return TrialResult(trial=trial_id, ok=True, score=score, metrics={"unused": score}, n_docs={"unused": 10})


def open_search(genome: Genome, run_dir):
    from evomerge.preflight import Prepared, baseline_configs
    from evomerge.search.loop import Search

    return Search(Prepared(genome.spec, genome, {}, {}, baseline_configs(genome.spec)), run_dir, progress=False)


def search_with_scored_baselines(zoo, tmp_path, scores: dict[str, float]):
    """(genome, run dir, search) of a new task-arithmetic run whose 8 baselines scored `scores`
    by label (0.1 for the others); checks the optimizer waited for them."""
    from evomerge.search.loop import create_run_dir

    genome = make_genome(zoo, "task_arithmetic")
    genome.spec = genome.spec.model_copy(update={"runs_dir": str(tmp_path)})
    run_dir = create_run_dir(genome.spec)
    search = open_search(genome, run_dir)
    baseline_jobs = [search._next_job() for _ in range(8)]
    assert search._next_job() is None, "the optimizer waits until every baseline is scored"
    for job in baseline_jobs:
        search._record(job, fake_result(job.trial_id, scores.get(search.trials[job.trial_id].label, 0.1)))
    return genome, run_dir, search


def test_baselines_that_beat_every_default_merge_are_seeded_after_x0_and_replayed_on_resume(zoo, tmp_path):
    from evomerge.rundir.journal import read_events

    # ft_b alone beats every default merge; ft_a ties the best one; ft_c and linear do not.
    scores = {"parent:ft_a_fp32": 0.5, "parent:ft_b_fp32": 0.9, "task_arithmetic (lambda=1)": 0.5}
    genome, run_dir, search = search_with_scored_baselines(zoo, tmp_path, scores)
    labels = [search.trials[search._next_job().trial_id].label for _ in range(4)]
    assert labels == ["trial 0", "trial 1 (seeded: parent:ft_a_fp32)", "trial 2 (seeded: parent:ft_b_fp32)", "trial 3"]
    assert search.trials[0].params == genome.decode(genome.x0())
    expected_next = search.optimizer.ask().x
    search.journal.close()

    seeded = [e for e in read_events(run_dir / "journal.jsonl") if e["event"] == "seeded"]
    assert [s["label"] for s in seeded[0]["seeds"]] == ["parent:ft_a_fp32", "parent:ft_b_fp32"] and len(seeded) == 1
    resumed = open_search(genome, run_dir)
    try:
        np.testing.assert_array_equal(resumed.optimizer.ask().x, expected_next)
    finally:
        resumed.journal.close()


def test_a_run_journaled_before_seeding_existed_resumes_unseeded(zoo, tmp_path):
    from evomerge.rundir.journal import read_events

    # A parent beats every merge, so a new run would seed it.
    genome, run_dir, search = search_with_scored_baselines(zoo, tmp_path, {"parent:ft_a_fp32": 0.9})
    search.seeds = []  # what the old code did: no seeding, no 'seeded' event
    search._next_job()
    search.journal.close()
    resumed = open_search(genome, run_dir)
    try:
        labels = [resumed.trials[resumed._next_job().trial_id].label for _ in range(3)]
    finally:
        resumed.journal.close()
    assert labels == ["trial 1", "trial 2", "trial 3"]
    assert not [e for e in read_events(run_dir / "journal.jsonl") if e["event"] == "seeded"]


# ---------------------------------------------------------------- genes as typed fields


def spec_only_genome(num_layers: int = 8, **genome) -> Genome:
    """A genome over made-up model paths: building genes reads no model folder."""
    spec = Spec.model_validate(
        {
            "name": "genes",
            "models": {"base": "/m/base", "experts": ["/m/a", "/m/b"]},
            "merge": {"method": "ties"},
            "genome": {"layer_groups": 3, "split_attn_mlp": True, "embeddings": True, **genome},
            "evaluation": {"tasks": ["unused"]},
        }
    )
    return Genome(spec, num_layers)


def test_gene_groups_are_integers_and_names_are_derived_from_the_fields():
    genome = spec_only_genome()
    layer_genes = [g for g in genome.genes if g.region is Region.LAYERS]
    assert {g.group for g in layer_genes} == {0, 1, 2}
    assert all(g.group is None for g in genome.genes if g.region is not Region.LAYERS)
    first = genome.genes[0]
    assert (first.param, first.model, first.group, first.part, first.name) == (
        "weight",
        0,
        0,
        "attn",
        "weight/m0/g0/attn",
    )
    assert genome.genes[6].name == "weight/m0/gembed" and genome.genes[7].name == "weight/m0/ghead"


def test_the_gene_table_says_what_every_gene_means_and_survives_json():
    genome = spec_only_genome()
    table = genome.gene_table()
    assert [row.name for row in table] == [gene.name for gene in genome.genes]
    assert genome.groups == [(0, 3), (3, 5), (5, 8)]
    by_name = {row.name: row for row in table}
    assert by_name["density/m1/g2/mlp"] == GeneRow("density/m1/g2/mlp", "density", 1, 2, "mlp", (5, 8))
    assert by_name["weight/m0/ghead"] == GeneRow("weight/m0/ghead", "weight", 0, "head", None, None)
    assert [GeneRow.from_json(json.loads(json.dumps(row.to_json()))) for row in table] == table
    assert [row.column_label for row in table[:6:2]] == ["L0-2", "L3-4", "L5-7"]


def test_defaults_and_per_model_genes_come_from_the_parameter_table():
    genome = spec_only_genome(params=["weight", "density"])
    owners = {(g.param, g.model) for g in genome.genes}
    assert owners == {(p, m) for p in ("weight", "density") for m in (0, 1)}  # both per model (the table says so)
    defaults = genome.default_values()
    assert {defaults[g.name] for g in genome.genes if g.param == "density"} == {PARAMETERS["density"].search_start}
    assert all((g.low, g.high) == PARAMETERS["density"].search_bounds for g in genome.genes if g.param == "density")


def test_more_layer_groups_than_layers_is_not_clamped_silently():
    with pytest.raises(ValueError, match="9 layer groups cannot split 8 layers"):
        layer_groups(8, 9)
    assert layer_groups(8, 8) == [(i, i + 1) for i in range(8)]
