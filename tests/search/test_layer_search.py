"""`search.space: layers` end to end on the real Search and Scheduler with in-process fake workers:
the genome's encode/decode, the spec's section (refusals, an unchanged fingerprint by default), a
layer search that finishes, resumes after an interruption to the very same journal, and exports a
YAML that mergekit rebuilds as `evomerge merge` does."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fake_workers import NUM_LAYERS, fake_scheduler, fake_spec_data
from merge.cli_runner import run_cli_in_process
from merge.mergekit_equality import compare_with_mergekit

from evomerge.errors import UserError
from evomerge.layer_genome import SKIP, TAKE, LayerGenome, Step, layer_genome_problem
from evomerge.rundir.journal import read_events
from evomerge.rundir.trials import BASE_LABEL, parent_label
from evomerge.search.runs import create_run_dir, open_run
from evomerge.spec import parse_spec


def layer_spec(tmp_path: Path, name: str = "layers", models: dict | None = None, **search):
    data = fake_spec_data(tmp_path / "runs", name, search={"space": "layers", **search})
    data["budget"] = {"max_evals": 14}
    if models:
        data["models"] = models
    return parse_spec(data, "spec", tmp_path)


# -- the genome -------------------------------------------------------------------------------


def test_x0_is_the_base_and_every_parent_is_a_baseline_point(tmp_path):
    genome = LayerGenome(layer_spec(tmp_path), NUM_LAYERS)
    assert genome.steps == 6 and genome.dim == 12  # 1.5 x 4 slots, include and model genes
    assert genome.path(genome.decode(genome.x0())) == genome.model_alone(0)
    points = dict(genome.baseline_points())
    expert_a = genome.spec.models.experts[0]
    assert list(points) == [BASE_LABEL, parent_label(expert_a), parent_label(genome.spec.models.experts[1])]
    assert genome.path(genome.decode(points[parent_label(expert_a)])) == genome.model_alone(1)
    assert set(genome.x0()[::2]) == {TAKE, SKIP}


def test_a_path_encodes_and_decodes_to_itself(tmp_path):
    genome = LayerGenome(layer_spec(tmp_path, scales=True, max_steps=9), NUM_LAYERS)
    path = [Step(2, 1), Step(0, 3, 1.25), Step(1, 0), Step(1, 1, 0.5), Step(2, 2), Step(0, 0)]  # slots 1, 3-6, 8
    assert genome.path(genome.decode(genome.path_point(path))) == path
    with pytest.raises(ValueError, match="does not fit"):
        genome.path_point([Step(0, 3), Step(0, 2), Step(0, 1)])  # needs slots 3, 6 and 9 of 0..8


def test_a_vector_that_takes_nothing_takes_its_likeliest_slot(tmp_path):
    genome = LayerGenome(layer_spec(tmp_path), NUM_LAYERS)
    x = np.full(genome.dim, 0.1)
    x[6] = 0.4  # slot 3's include gene
    assert genome.path(genome.decode(x)) == [Step(0, 3)]


def test_runs_of_one_model_become_one_slice_and_scales_filter_the_residual_writers(tmp_path):
    genome = LayerGenome(layer_spec(tmp_path, scales=True, max_steps=8), NUM_LAYERS)
    base, expert = genome.models[0], genome.models[1]
    path = [Step(0, 0), Step(0, 1), Step(0, 2), Step(1, 3, 0.75), Step(0, 0), Step(0, 1)]
    config = genome.merge_config_dict(genome.path_point(path))
    scale = [{"filter": "o_proj", "value": 0.75}, {"filter": "down_proj", "value": 0.75}]
    assert config == {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": base, "layer_range": [0, 3]}]},
            {"sources": [{"model": expert, "layer_range": [3, 4], "parameters": {"scale": scale}}]},
            {"sources": [{"model": base, "layer_range": [0, 2]}]},
        ],
        "dtype": "float32",
    }


# -- the spec ---------------------------------------------------------------------------------


def test_the_default_space_keeps_the_fingerprint(tmp_path):
    plain = parse_spec(fake_spec_data(tmp_path, "a"), "spec", tmp_path)
    explicit = parse_spec(fake_spec_data(tmp_path, "a", search={"space": "params"}), "spec", tmp_path)
    assert plain.fingerprint() == explicit.fingerprint()
    assert layer_spec(tmp_path, "a").fingerprint() != plain.fingerprint()


@pytest.mark.parametrize(
    ("search", "sections", "message"),
    [
        ({"space": "params", "max_steps": 8}, {}, "search.max_steps applies to space: layers only"),
        ({"space": "layer"}, {}, "search.space"),
        ({"space": "layers", "max_steps": 0}, {}, "search.max_steps"),
        ({"space": "layers"}, {"evaluation": {"backend": "vllm"}}, "set evaluation.backend: native"),
        ({"space": "layers"}, {"workers": {"gpus_per_worker": 2}}, "set workers.gpus_per_worker to 1"),
    ],
)
def test_nonsense_is_refused_in_one_line(tmp_path, search, sections, message):
    data = fake_spec_data(tmp_path, "bad", search=search)
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    with pytest.raises(UserError, match=message) as refusal:
        parse_spec(data, "spec", tmp_path)
    assert "\n" not in str(refusal.value)


def test_a_space_that_does_not_fit_the_base_is_refused(tmp_path):
    llama = SimpleNamespace(
        num_layers=NUM_LAYERS,
        tensors={"model.layers.0.self_attn.o_proj.weight": 0, "model.layers.0.mlp.down_proj.weight": 0},
    )
    problem = layer_genome_problem(layer_spec(tmp_path, max_steps=3), llama)
    assert problem.startswith("search.max_steps: 3 is fewer than the base model's 4 layers")
    assert layer_genome_problem(layer_spec(tmp_path, scales=True), llama) is None
    gpt2 = SimpleNamespace(num_layers=NUM_LAYERS, tensors={"h.0.attn.c_proj.weight": 0, "h.0.mlp.c_proj.weight": 0})
    problem = layer_genome_problem(layer_spec(tmp_path, scales=True), gpt2)
    assert problem == (
        "search.scales: the base model has no o_proj or down_proj tensors for a step's scale to act on; set scales: false"
    )


# -- the search -------------------------------------------------------------------------------


def path_score(trial: int, config: dict, eval_set: str) -> float:
    """A pure function of the path: deeper is better up to 6 layers, expert_b's layers help."""
    slices = [s["sources"][0] for s in config["slices"]]
    depth = sum(s["layer_range"][1] - s["layer_range"][0] for s in slices)
    from_b = sum(s["layer_range"][1] - s["layer_range"][0] for s in slices if s["model"].endswith("expert_b"))
    score = round(1.0 / (1.0 + (depth - 6) ** 2) + 0.05 * from_b, 6)
    return round(score * 0.9, 6) if eval_set == "heldout" else score


def open_layer_search(spec, run_dir):
    from evomerge.preflight import Prepared
    from evomerge.search.loop import Search

    genome = LayerGenome(spec, NUM_LAYERS)
    eval_sets = {"search": None, "heldout": None}
    search = Search(Prepared(spec, genome, {}, eval_sets, genome.baseline_configs()), run_dir, progress=False)
    search.current_inputs = lambda: {}
    return search


def run_layers(spec, run_dir, interrupt_after: int | None = None) -> None:
    """Search on fake workers; `interrupt_after` results, the driver dies (KeyboardInterrupt)."""
    seen = []

    def score(trial, config, eval_set):
        seen.append(trial)
        if interrupt_after is not None and len(seen) > interrupt_after:
            raise KeyboardInterrupt
        return path_score(trial, config, eval_set)

    open_layer_search(spec, run_dir).run_with(fake_scheduler(score=score))


def journal_state(run_dir: Path) -> list[tuple]:
    events = read_events(run_dir / "journal.jsonl")
    return [
        (e["event"], e.get("trial"), e.get("x"), e.get("merge_config"), e.get("score"))
        for e in events
        if e["event"] in ("asked", "completed", "failed", "heldout")
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, zoo) -> tuple[Path, object]:
    tmp_path = tmp_path_factory.mktemp("layers")
    models = {"base": zoo.model("base"), "experts": [zoo.model("ft_a"), zoo.model("ft_c")]}
    spec = layer_spec(tmp_path, "reference", models=models)
    run_dir = create_run_dir(spec)
    run_layers(spec, run_dir)
    return run_dir, spec


def test_a_layer_search_scores_its_baselines_then_searches_paths(finished):
    run_dir, _ = finished
    events = read_events(run_dir / "journal.jsonl")
    asked = [e for e in events if e["event"] == "asked"]
    assert [e["label"] for e in asked[:3]] == [BASE_LABEL, *(parent_label(p) for p in finished[1].models.experts)]
    assert all(e["merge_config"]["merge_method"] == "passthrough" for e in asked)
    depths = {
        sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in e["merge_config"]["slices"])
        for e in asked
    }
    assert len(depths) > 1  # the optimizer tried paths of other depths than the base's
    assert sum(e["event"] == "heldout" for e in events) >= 3
    assert events[-1]["event"] == "run_finished"


def test_an_interrupted_layer_search_resumes_to_the_same_journal(finished, tmp_path):
    reference_dir, spec = finished
    spec = spec.model_copy(update={"name": "interrupted"})
    run_dir = create_run_dir(spec)
    with pytest.raises(KeyboardInterrupt):
        run_layers(spec, run_dir, interrupt_after=7)
    run, frozen, _ = open_run(run_dir)
    run_layers(frozen, run)
    assert journal_state(run_dir) == journal_state(reference_dir)


def test_the_exported_winner_is_a_yaml_mergekit_rebuilds(finished, tmp_path, mergekit_merge):
    run_dir, _ = finished
    exported = tmp_path / "winner.yml"
    done = run_cli_in_process("export", run_dir, "-o", exported)
    assert done.returncode == 0, done.stderr
    report = compare_with_mergekit(exported, tmp_path)
    report.assert_bit_for_bit()
    winner = json.loads((tmp_path / "evomerge" / "config.json").read_text())
    assert winner["num_hidden_layers"] == sum(
        r[1] - r[0] for r in (s["sources"][0]["layer_range"] for s in _yaml(exported)["slices"])
    )


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_the_report_says_what_a_layer_run_searched(finished):
    from evomerge.rundir.layout import RunDir
    from evomerge.rundir.ledger import Ledger
    from evomerge.rundir.run_context import run_context

    rows = {row.label: row.value for row in run_context(Ledger.read(RunDir.of(finished[0])))}
    assert rows["merge"] == "passthrough (layer paths), float32"
    assert rows["genome"] == "12 genes; a layer path of up to 6 slots; take or skip and whose layer per slot"


def test_a_block_takes_its_layers_together(tmp_path):
    genome = LayerGenome(layer_spec(tmp_path, block=2, max_steps=8), NUM_LAYERS)
    assert genome.dim == 8  # 4 slots of 2 layers, include and model genes
    stack = [Step(0, 0), Step(0, 1), Step(1, 2), Step(1, 3), Step(2, 2), Step(2, 3)]
    point = genome.path_point(stack)
    assert genome.path(genome.decode(point)) == stack
    assert genome.path(genome.decode(genome.x0())) == genome.model_alone(0)
    config = genome.merge_config_dict(point)
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == [[0, 2], [2, 4], [2, 4]]
    with pytest.raises(ValueError, match="slots of 2 layers"):
        genome.path_point([Step(0, 0), Step(1, 1), Step(0, 2), Step(0, 3)])
    rows = genome.gene_table()
    assert [row.layers for row in rows[::2]] == [(0, 2), (2, 4), (0, 2), (2, 4)]


def test_a_block_that_does_not_divide_the_depth_is_refused(tmp_path):
    llama = SimpleNamespace(num_layers=NUM_LAYERS, tensors={})
    assert layer_genome_problem(layer_spec(tmp_path, block=3), llama).startswith("search.block: 3 must divide")
    with pytest.raises(UserError, match="search.block applies to space: layers only"):
        parse_spec(fake_spec_data(tmp_path, "bad", search={"space": "params", "block": 2}), "spec", tmp_path)
    assert layer_spec(tmp_path, "a").fingerprint() == layer_spec(tmp_path, "a", block=None).fingerprint()
