"""The method gene (`merge.method: [ties, task_arithmetic, dare_ties]`): spec parsing and refusals,
the composite genome, each optimizer choosing among the methods, and whole searches on the real
Search and Scheduler with in-process fake workers (tests/fake_workers.py): labels, the Optuna view,
status, resume to the same trials, and export of a single-method YAML."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from fake_workers import NUM_LAYERS, fake_scheduler, fake_score, fake_spec_data
from refusals import assert_refused_in_one_line, run_cli_in_process

from evomerge.errors import UserError
from evomerge.genome import Genome
from evomerge.genome_multi import MethodChoiceGenome, make_genome
from evomerge.merge.registry import METHODS
from evomerge.optim import Problem, build_optimizer
from evomerge.optim.choice import METHOD_PARAM
from evomerge.optim.settings import OptimizerSettings
from evomerge.preflight import Prepared, baseline_configs
from evomerge.rundir.journal import read_events
from evomerge.rundir.layout import RunDir
from evomerge.rundir.results import status
from evomerge.search.loop import Search
from evomerge.search.runs import create_run_dir, open_run
from evomerge.search.study_log import STUDY
from evomerge.spec import parse_spec
from evomerge.spec_methods import method_spec

THREE = ["ties", "task_arithmetic", "dare_ties"]
OPTIMIZERS = {
    "cmaes": {"name": "cmaes", "seed": 7, "popsize": 4},
    "tpe": {"name": "tpe", "seed": 7, "n_startup_trials": 3},
    "random": {"name": "random", "seed": 7},
}


def spec_of(tmp_path: Path, name: str = "run", methods=THREE, **sections):
    data = fake_spec_data(tmp_path / "runs", name, **{"merge": {"method": methods}, **sections})
    return parse_spec(data, "spec", tmp_path)


def open_search(spec, run_dir) -> Search:
    """A Search on in-process workers whose genome is the spec's, method gene included."""
    eval_sets = {"search": None, **({"heldout": None} if spec.evaluation.heldout_tasks else {})}
    prepared = Prepared(spec, make_genome(spec, NUM_LAYERS), {}, eval_sets, baseline_configs(spec))
    search = Search(prepared, run_dir, progress=False)
    search.current_inputs = lambda: {}
    return search


def finished_run(tmp_path: Path, name: str, optimizer: str, max_evals: int = 40, score=None) -> Path:
    spec = spec_of(tmp_path, name, optimizer=OPTIMIZERS[optimizer], budget={"max_evals": max_evals})
    run_dir = create_run_dir(spec)
    open_search(spec, run_dir).run_with(fake_scheduler(score=score))
    return run_dir


def evolved_first(trial: int, config: dict, eval_set: str) -> float:
    """The fake score, lifted for evolved candidates so one of them is the run's best."""
    return fake_score(config, eval_set) + (1.0 if trial >= 0 else 0.0)


# --- the spec -------------------------------------------------------------------------------


def test_a_list_of_methods_parses_and_a_single_method_keeps_its_fingerprint(tmp_path):
    spec = spec_of(tmp_path)
    assert spec.merge.methods == THREE
    single = spec_of(tmp_path, methods="ties")
    assert single.merge.methods == ["ties"] and single.merge.method == "ties"
    # What these single-method specs hashed to before merge.method could be a list.
    assert single.fingerprint() == "ec9cb229c2325f77"
    assert spec_of(tmp_path, methods="task_arithmetic").fingerprint() == "3342865464d03f57"
    assert spec.fingerprint() != single.fingerprint()


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"merge": {"method": ["ties", "tie_arithmetic"]}}, ["merge.method", "did you mean"]),
        ({"merge": {"method": ["ties", "model_stock"]}}, ["merge.method", "model_stock", "remove it from the list"]),
        ({"merge": {"method": ["ties", "ties"]}}, ["merge.method", "listed twice"]),
        ({"merge": {"method": []}}, ["merge.method", "list one or more"]),
        ({"merge": {"method": ["ties", 5]}}, ["merge.method", "not a method or a list of methods"]),
        ({"merge": {"method": ["ties", "slerp"]}, "genome": {"params": ["weight"]}}, ["genome.params", "slerp"]),
        ({"merge": {"method": THREE}, "genome": {"params": ["weight", "t"]}}, ["genome.params", "'t'"]),
        ({"merge": {"method": THREE}, "genome": {"bounds": {"t": [0, 1]}}}, ["genome.bounds", "'t'"]),
    ],
    ids=[
        "unknown",
        "not-searchable",
        "twice",
        "empty",
        "not-a-name",
        "method-takes-none",
        "param-none-takes",
        "bounds-unsearched",
    ],
)
def test_a_bad_list_of_methods_is_refused_in_one_line_naming_the_field(tmp_path, sections, expected):
    data = fake_spec_data(tmp_path / "runs", "run", **sections)
    with pytest.raises(UserError) as refusal:
        parse_spec(data, "spec", tmp_path)
    line = str(refusal.value)
    assert "\n" not in line
    for word in expected:
        assert word in line, line


def test_the_cli_refuses_a_non_searchable_listed_method_in_one_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(fake_spec_data(tmp_path / "runs", "run", merge={"method": ["ties", "karcher"]})))
    code, lines = run_cli_in_process("validate", path)
    assert_refused_in_one_line(code, lines, ["merge.method", "karcher", "remove it from the list"])


def test_each_listed_method_searches_its_own_params_and_fixed_settings(tmp_path):
    spec = spec_of(tmp_path, merge={"method": ["ties", "slerp"], "fixed": {"normalize": True}})
    assert method_spec(spec, "ties").searched_params == ["weight", "density", "lambda"]
    assert method_spec(spec, "slerp").searched_params == ["t"]
    assert method_spec(spec, "slerp").merge.fixed == {}


# --- the genome -----------------------------------------------------------------------------


def test_the_genome_is_a_method_gene_then_each_method_s_genes(tmp_path):
    spec = spec_of(tmp_path)
    genome = make_genome(spec, NUM_LAYERS)
    assert isinstance(genome, MethodChoiceGenome) and isinstance(
        make_genome(spec_of(tmp_path, methods="ties"), 4), Genome
    )
    singles = [Genome(method_spec(spec, name), NUM_LAYERS) for name in THREE]
    assert genome.dim == 1 + sum(single.dim for single in singles)
    for index, single in enumerate(singles):
        own = np.random.default_rng(index).uniform(0, 1, single.dim)
        x = genome.point(index, own)
        assert genome.method_of(x) == THREE[index]
        assert genome.merge_config_dict(x) == single.merge_config_dict(own)
        assert genome.decode(x) == single.decode(own)
    assert genome.method_of(genome.x0()) == "ties"
    assert len({row.name for row in genome.gene_table()}) == len(genome.gene_table())


def test_baselines_are_every_method_s_points_once_by_label(tmp_path):
    spec = spec_of(tmp_path)
    genome = make_genome(spec, NUM_LAYERS)
    points = dict(genome.baseline_points())
    assert len(points) == len(genome.baseline_points())
    scored = dict(baseline_configs(spec))
    for name in THREE:  # each method's default merge is scored first and expressed exactly
        label = METHODS[name].default_label
        assert label in scored and label in points
        assert genome.merge_config_dict(points[label])["merge_method"] == name
    assert {"base", "parent:expert_a", "parent:expert_b"} <= set(points)


# --- the optimizers -------------------------------------------------------------------------


def optimizer_over(genome: MethodChoiceGenome, settings: dict, objectives: int = 1):
    from pydantic import TypeAdapter

    parsed = TypeAdapter(OptimizerSettings).validate_python(settings)
    problem = Problem(genome.lower, genome.upper, genome.x0(), objectives, 3, genome.choice)
    return build_optimizer(parsed, problem)


def drive(optimizer, genome, asks: int, favoured: str = "task_arithmetic", objectives: int = 1) -> list[np.ndarray]:
    """Ask and tell `asks` times; `favoured` scores higher, so a learning optimizer drifts to it."""
    points = []
    for _ in range(asks):
        ask = optimizer.ask()
        assert ask is not None
        points.append(ask.x)
        score = float(-np.mean((genome.choice.own(ask.x, genome.method_index(ask.x)) - 0.3) ** 2))
        score += 1.0 if genome.method_of(ask.x) == favoured else 0.0
        optimizer.tell(ask.trial_id, [score, -score] if objectives == 2 else score)
    return points


@pytest.mark.parametrize("name", ["cmaes", "tpe", "random", "nsga2"])
def test_each_optimizer_proposes_every_method_and_only_its_genes_move(tmp_path, name):
    genome = make_genome(spec_of(tmp_path), NUM_LAYERS)
    objectives = 2 if name == "nsga2" else 1
    settings = OPTIMIZERS.get(name, {"name": "nsga2", "seed": 7, "popsize": 8})
    optimizer = optimizer_over(genome, settings, objectives)
    points = drive(optimizer, genome, 90, objectives=objectives)
    assert set(Counter(genome.method_of(x) for x in points)) == set(THREE)
    x0 = genome.x0()
    for x in points:
        index = genome.method_index(x)
        assert x[0] == genome.choice.unit_of(index)
        for other, (start, stop) in enumerate(genome.choice.spans):
            if other != index:  # inactive genes stay at x0: the journal holds one method's genes
                assert np.array_equal(x[start:stop], x0[start:stop])
    if name in ("tpe", "nsga2"):
        for trial in optimizer.study.trials:
            chosen = THREE.index(trial.params[METHOD_PARAM])
            start, stop = genome.choice.spans[chosen]
            assert set(trial.params) == {METHOD_PARAM} | {f"x{i:04d}" for i in range(start, stop)}


def test_cmaes_races_the_weakest_methods_out_and_spends_the_rest_on_the_winner(tmp_path):
    genome = make_genome(spec_of(tmp_path), NUM_LAYERS)
    optimizer = optimizer_over(genome, OPTIMIZERS["cmaes"])
    drive(optimizer, genome, 80)
    assert optimizer.raced_out and len(optimizer.raced_out) == 2
    assert "task_arithmetic" not in optimizer.raced_out
    later = drive(optimizer, genome, 12)
    assert {genome.method_of(x) for x in later} == {"task_arithmetic"}


def test_a_restored_snapshot_asks_what_the_original_asks(tmp_path):
    genome = make_genome(spec_of(tmp_path), NUM_LAYERS)
    for settings in (OPTIMIZERS["cmaes"], OPTIMIZERS["tpe"]):
        optimizer = optimizer_over(genome, settings)
        drive(optimizer, genome, 30)
        copy = type(optimizer).restore(optimizer.snapshot())
        assert np.array_equal(optimizer.ask().x, copy.ask().x)


# --- whole searches -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cmaes", "tpe"])
def test_a_search_names_each_trial_s_method_in_the_journal_status_and_optuna_study(tmp_path, name):
    run_dir = finished_run(tmp_path, f"named-{name}", name, score=evolved_first)
    asked = [e for e in read_events(run_dir / "journal.jsonl") if e["event"] == "asked" and e["kind"] == "optimizer"]
    assert {e["merge_config"]["merge_method"] for e in asked} == set(THREE)
    for event in asked:
        assert event["label"].startswith(f"trial {event['trial']} ({event['merge_config']['merge_method']}")
    summary = status(run_dir)
    assert summary["best_trial"] >= 0
    method = next(e["merge_config"]["merge_method"] for e in asked if e["trial"] == summary["best_trial"])
    assert summary["best_label"].startswith(f"trial {summary['best_trial']} ({method}")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.log")))
    study = optuna.load_study(study_name=STUDY, storage=storage)
    assert {t.params[METHOD_PARAM] for t in study.trials} == set(THREE)
    assert all(t.user_attrs[METHOD_PARAM] == t.params[METHOD_PARAM] for t in study.trials)


def asked_and_scored(run_dir: Path) -> dict:
    events = read_events(run_dir / "journal.jsonl")
    scores = {e["trial"]: e.get("score") for e in events if e["event"] in ("completed", "failed")}
    return {e["trial"]: (e["x"], e["label"], scores.get(e["trial"])) for e in events if e["event"] == "asked"}


@pytest.mark.parametrize("snapshots", ["kept", "dropped"])
@pytest.mark.parametrize("name", ["cmaes", "tpe", "random"])
def test_an_interrupted_search_resumes_to_the_same_trials(tmp_path, name, snapshots, caplog):
    reference = finished_run(tmp_path / "a", "resume", name)
    interrupted = finished_run(tmp_path / "b", "resume", name)
    lines = (interrupted / "journal.jsonl").read_bytes().splitlines(keepends=True)
    kinds = [json.loads(line)["event"] for line in lines]
    # Killed right after the first ask that follows the first snapshot (snapshots are written in
    # the background, so where their events land varies): the rest is asked after the resume.
    keep = next(i for i in range(kinds.index("snapshot"), len(kinds)) if kinds[i] == "asked") + 1
    assert kinds[keep:].count("asked") > 5
    (interrupted / "journal.jsonl").write_bytes(b"".join(lines[:keep]))
    if snapshots == "dropped":
        for snapshot in RunDir.of(interrupted).snapshots.glob("*"):
            snapshot.unlink()  # the whole journal replays, racing state included
    run, spec, _ = open_run(interrupted)
    with caplog.at_level(logging.WARNING):
        open_search(spec, run).run_with(fake_scheduler())
    assert asked_and_scored(interrupted) == asked_and_scored(reference)
    full_replay = "replaying the whole journal instead" in caplog.text
    assert full_replay == (snapshots == "dropped")  # a kept snapshot restores the optimizer


def test_each_method_s_best_trial_exports_as_an_ordinary_single_method_yaml(tmp_path):
    run_dir = finished_run(tmp_path, "export", "tpe")
    events = read_events(run_dir / "journal.jsonl")
    scores = {e["trial"]: e["score"] for e in events if e["event"] == "completed"}
    best: dict[str, int] = {}
    for event in (e for e in events if e["event"] == "asked" and e["kind"] == "optimizer" and e["trial"] in scores):
        method = event["merge_config"]["merge_method"]
        if method not in best or scores[event["trial"]] > scores[best[method]]:
            best[method] = event["trial"]
    assert set(best) == set(THREE)
    for method, trial in best.items():
        out = tmp_path / f"{method}.yaml"
        code, lines = run_cli_in_process("export", run_dir, "--trial", trial, "-o", out)
        assert code == 0, lines
        exported = yaml.safe_load(out.read_text())
        assert exported["merge_method"] == method
        assert {"merge_method", "slices", "base_model", "dtype"} <= set(exported)


def test_the_report_names_the_listed_methods_and_each_drawn_trial_s_method(tmp_path):
    run_dir = finished_run(tmp_path, "report", "random", score=evolved_first)
    code, lines = run_cli_in_process("report", run_dir)
    assert code == 0, lines
    page = (run_dir / "report" / "report.html").read_text()
    assert "ties or task_arithmetic or dare_ties" in page
    best = status(run_dir)["best_label"]
    assert best.split(" (")[1].split(",")[0].rstrip(")") in THREE and best in page


# --- the demo zoo ---------------------------------------------------------------------------


def demo_search(tmp_path: Path, name: str, method) -> Path:
    """The demo spec (CMA-ES seed 0 under the barrier: the same asks on every machine) over
    `method`, each method's default space, 300 evaluations; returns the run."""
    import subprocess
    import sys

    import results_grid  # scripts/ is on sys.path (conftest)

    demo_spec = results_grid.build_zoo("demo")
    spec = yaml.safe_load(demo_spec.read_text())
    spec["models"]["base"] = str((demo_spec.parent / spec["models"]["base"]).resolve())
    spec["models"]["experts"] = [str((demo_spec.parent / path).resolve()) for path in spec["models"]["experts"]]
    spec["evaluation"]["include"] = [str((demo_spec.parent / path).resolve()) for path in spec["evaluation"]["include"]]
    spec |= {"name": name, "runs_dir": str(tmp_path), "merge": {"method": method}, "budget": {"max_evals": 300}}
    spec["genome"] = {"layer_groups": spec["genome"]["layer_groups"]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    evomerge = Path(sys.executable).with_name("evomerge")
    subprocess.run([str(evomerge), "search", str(path)], check=True, capture_output=True)
    return tmp_path / name


def best_evolved(run_dir: Path) -> tuple[float, str]:
    events = read_events(run_dir / "journal.jsonl")
    method = {e["trial"]: e["merge_config"]["merge_method"] for e in events if e["event"] == "asked"}
    scored = [(e["score"], method[e["trial"]]) for e in events if e["event"] == "completed" and e["trial"] >= 0]
    return max(scored)


def baseline_score(run_dir: Path, label: str) -> float:
    events = read_events(run_dir / "journal.jsonl")
    trial = next(e["trial"] for e in events if e["event"] == "asked" and e["label"] == label)
    return next(e["score"] for e in events if e["event"] == "completed" and e["trial"] == trial)


@pytest.mark.long
def test_on_the_demo_zoo_the_method_gene_finds_task_arithmetic_where_ties_alone_cannot(tmp_path):
    """TIES's sign election cuts what the demo's skills need, so no TIES recipe reaches task
    arithmetic's default merge (docs/RESULTS.md, the grid); listing the methods lets the search
    leave TIES for task arithmetic. About 5 minutes on two cores (two 300-evaluation searches)."""
    bar_label = METHODS["task_arithmetic"].default_label
    ties = demo_search(tmp_path, "ties-only", "ties")
    three = demo_search(tmp_path, "three", THREE)
    bar = baseline_score(ties, bar_label)
    assert best_evolved(ties)[0] < bar
    score, method = best_evolved(three)
    assert method == "task_arithmetic" and score > bar + 0.1
    assert status(three)["heldout_winner"] >= 0


def test_validate_plans_memory_for_the_most_demanding_listed_method(zoo, tmp_path):
    from search_zoo import FIXTURE_EVALS
    from typer.testing import CliRunner

    from evomerge.cli import app

    def plan(method) -> dict:
        spec = {
            "name": "plan",
            "runs_dir": str(tmp_path / "runs"),
            "models": {"base": zoo.model("base"), "experts": [zoo.model("ft_a"), zoo.model("ft_b")]},
            "merge": {"method": method},
            "genome": {"layer_groups": 2},
            "evaluation": {"include": [str(FIXTURE_EVALS)], "tasks": ["tiny_add"], "limit": 8},
            "workers": {"count": 1, "device": "cuda"},
        }
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        result = CliRunner().invoke(app, ["validate", str(path), "--json", "--gpu-memory", "80GiB", "--gpus", "1"])
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    fused, reference = plan("task_arithmetic"), plan("breadcrumbs_ties")  # breadcrumbs caches magnitude ranks
    assert fused["bytes_per_device"] < reference["bytes_per_device"]
    for listed in (["task_arithmetic", "breadcrumbs_ties"], ["breadcrumbs_ties", "task_arithmetic"]):
        result = plan(listed)
        assert result["method"] == listed
        assert (result["bytes_per_device"], result["devices"]) == (reference["bytes_per_device"], reference["devices"])
