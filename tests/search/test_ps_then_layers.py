"""`search.space: params_then_layers` end to end on the real Search and Scheduler with in-process
fake workers: a parameter phase, the change (journaled, its winner built into RUN/ps_winner), a
layer phase over the sources and that winner, one held-out pass per phase; a SIGKILL at the change
or in the layer phase resumes to the uninterrupted journal; the spec's refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_workers import fake_scheduler, fake_score, fake_spec_data

from evomerge.errors import UserError
from evomerge.rundir.journal import KILL_HOOK_VARIABLE, read_events
from evomerge.search.runs import create_run_dir, open_run
from evomerge.search_space import PS_WINNER
from evomerge.spec import parse_spec

TESTS = Path(__file__).resolve().parent.parent
MAX_EVALS = 24  # 12 for the parameter phase (its 7 baselines included), 12 for the layer phase


def phased_data(tmp_path: Path, zoo, name: str = "phased", **search) -> dict:
    data = fake_spec_data(tmp_path / "runs", name, search={"space": "params_then_layers", **search})
    data["models"] = {"base": zoo.model("base"), "experts": [zoo.model("ft_a"), zoo.model("ft_c")]}
    data["merge"] = {"method": "task_arithmetic"}
    data["budget"] = {"max_evals": MAX_EVALS}
    return data


def phased_score(trial: int, config: dict, eval_set: str) -> float:
    """Parameter merges: the fake's pure score. Layer paths: depth 5 is best, the winner's layers help."""
    if config["merge_method"] != "passthrough":
        return fake_score(config, eval_set)
    sources = [s["sources"][0] for s in config["slices"]]
    depth = sum(s["layer_range"][1] - s["layer_range"][0] for s in sources)
    from_winner = sum(s["layer_range"][1] - s["layer_range"][0] for s in sources if s["model"] == PS_WINNER)
    score = round(1.0 / (1.0 + (depth - 5) ** 2) + 0.05 * from_winner, 6)
    return round(score * 0.9, 6) if eval_set == "heldout" else score


def open_phased(spec, run_dir):
    """A Search over the real preflight's shape of `spec`, without tasks: genome, baselines, sources."""
    from evomerge.genome_multi import make_genome
    from evomerge.hub import resolve_models
    from evomerge.preflight import Prepared, _union_config, baseline_configs, model_fields
    from evomerge.search.loop import Search

    sources = resolve_models(model_fields(spec), "spec", None)
    num_layers = 4
    union = _union_config(spec).model_dump(mode="json", exclude_none=True)
    prepared = Prepared(
        spec, make_genome(spec, num_layers), union, {"search": None, "heldout": None}, [], sources=sources
    )
    prepared.baselines.extend(baseline_configs(spec))
    search = Search(prepared, run_dir, progress=False)
    search.current_inputs = lambda: {}
    return search


def run_phased(spec, run_dir, interrupt_after: int | None = None) -> None:
    """Search on fake workers; after `interrupt_after` results the driver stops (KeyboardInterrupt)."""
    seen = []

    def score(trial, config, eval_set):
        seen.append(trial)
        if interrupt_after is not None and len(seen) > interrupt_after:
            raise KeyboardInterrupt
        return phased_score(trial, config, eval_set)

    open_phased(spec, run_dir).run_with(fake_scheduler(score=score), lambda prepared: fake_scheduler(score=score))


def journal_state(run_dir: Path) -> list[tuple]:
    kept = ("asked", "completed", "failed", "heldout", "phase_changed", "seeded")
    events = read_events(run_dir / "journal.jsonl")
    return [
        (e["event"], e.get("trial"), e.get("x"), e.get("merge_config"), e.get("score"), e.get("first_trial"))
        for e in events
        if e["event"] in kept
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, zoo):
    tmp_path = tmp_path_factory.mktemp("phased")
    spec = parse_spec(phased_data(tmp_path, zoo, "reference"), "spec", tmp_path)
    run_dir = create_run_dir(spec)
    run_phased(spec, run_dir)
    return run_dir, spec, tmp_path


def test_the_parameter_phase_hands_its_winner_to_a_layer_phase(finished):
    run_dir, spec, _ = finished
    events = read_events(run_dir / "journal.jsonl")
    names = [e["event"] for e in events]
    change = events[names.index("phase_changed")]
    first = change["first_trial"]
    asked = [e for e in events if e["event"] == "asked"]
    params = [e for e in asked if e["trial"] < first]
    layers = [e for e in asked if e["trial"] >= first]
    assert len(params) == MAX_EVALS // 2 and len(layers) == MAX_EVALS // 2
    assert all(e["merge_config"]["merge_method"] == "task_arithmetic" for e in params if e["kind"] == "optimizer")
    assert all(e["merge_config"]["merge_method"] == "passthrough" for e in layers)
    # The winner is the parameter phase's best search score, and the layer phase starts from it alone.
    completed = {e["trial"]: e["score"] for e in events[: names.index("phase_changed")] if e["event"] == "completed"}
    assert change["score"] == max(completed.values()) and completed[change["winner"]] == change["score"]
    seeded = [e for e in layers if "seeded: ps_winner" in e["label"]]
    assert len(seeded) == 1 and {s["sources"][0]["model"] for s in seeded[0]["merge_config"]["slices"]} == {PS_WINNER}
    assert [e["trial"] for e in layers] == list(range(first, first + len(layers)))
    assert any(s["sources"][0]["model"] != PS_WINNER for e in layers for s in e["merge_config"]["slices"])
    assert (run_dir / PS_WINNER / "config.json").is_file()


def test_each_phase_is_rescored_on_held_out_by_its_own_workers(finished):
    run_dir, _, _ = finished
    events = read_events(run_dir / "journal.jsonl")
    change_at = next(i for i, e in enumerate(events) if e["event"] == "phase_changed")
    first = events[change_at]["first_trial"]
    before = [e["trial"] for e in events[:change_at] if e["event"] == "heldout"]
    after = [e["trial"] for e in events[change_at:] if e["event"] == "heldout"]
    baselines = [e["trial"] for e in events if e["event"] == "asked" and e["kind"] == "baseline"]
    assert sorted(t for t in before if t < 0) == sorted(baselines) and len([t for t in before if t >= 0]) == 2
    assert 2 <= len(after) <= 4 and all(t >= first for t in after)  # top 2, with ties up to 4
    assert events[-1]["event"] == "run_finished"


def test_the_winner_folder_is_the_parameter_winner_merged(finished, tmp_path):
    from evomerge.merge.config import MergeConfig
    from evomerge.merge.engine import merge_to_disk

    run_dir, spec, _ = finished
    change = next(e for e in read_events(run_dir / "journal.jsonl") if e["event"] == "phase_changed")
    merge_to_disk(MergeConfig.model_validate(change["merge_config"]), tmp_path / "again", seed=spec.optimizer.seed)
    ours, again = tensors_of(run_dir / PS_WINNER), tensors_of(tmp_path / "again")
    assert ours.keys() == again.keys() and all(ours[k].equal(again[k]) for k in ours)


def test_an_interrupted_phased_search_resumes_to_the_same_journal(finished):
    reference_dir, spec, _ = finished
    for name, stop_after in (("early", 9), ("late", 20)):  # in the parameter phase; in the layer phase
        spec_now = spec.model_copy(update={"name": f"interrupted-{name}"})
        run_dir = create_run_dir(spec_now)
        with pytest.raises(KeyboardInterrupt):
            run_phased(spec_now, run_dir, interrupt_after=stop_after)
        run, frozen, _ = open_run(run_dir)
        run_phased(frozen, run)
        assert journal_state(run_dir) == journal_state(reference_dir), name


def tensors_of(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {name: t for path in sorted(folder.glob("*.safetensors")) for name, t in load_file(path).items()}


KILLED_DRIVER = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/search"]
from test_ps_then_layers import run_phased
from evomerge.spec import parse_spec
from pathlib import Path
spec = parse_spec(json.loads(sys.argv[2]), "spec", Path(sys.argv[3]))
run_phased(spec, sys.argv[4])
"""


@pytest.mark.parametrize("kill_at", ["phase_changed:1", "completed:20"])
def test_a_sigkilled_phased_search_resumes_to_the_same_journal(finished, zoo, tmp_path, kill_at):
    reference_dir, _, _ = finished
    data = phased_data(tmp_path, zoo, "killed")
    spec = parse_spec(data, "spec", tmp_path)
    run_dir = create_run_dir(spec)
    env = {**os.environ, KILL_HOOK_VARIABLE: kill_at}
    args = [sys.executable, "-c", KILLED_DRIVER, str(TESTS), json.dumps(data), str(tmp_path), str(run_dir)]
    driver = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert driver.returncode == -signal.SIGKILL, driver.stderr
    if kill_at.startswith("phase_changed"):  # killed before the winner was built: the resume builds it
        assert not (run_dir / PS_WINNER).exists()
    run, frozen, _ = open_run(run_dir)
    run_phased(frozen, run)
    assert journal_state(run_dir) == journal_state(reference_dir)
    assert (run_dir / PS_WINNER / "config.json").is_file()


@pytest.mark.parametrize(
    ("search", "sections", "message"),
    [
        ({"space": "params", "params_share": 0.3}, {}, "search.params_share applies to space: params_then_layers"),
        ({"space": "params_then_layers", "params_share": 1.0}, {}, "search.params_share"),
        ({"space": "params_then_layers"}, {"budget": {"max_evals": None, "time_limit_min": 5}}, "set budget.max_evals"),
        ({"space": "params_then_layers"}, {"evaluation": {"backend": "vllm"}}, "set evaluation.backend: native"),
        ({"space": "params_then_layers"}, {"budget": {"max_docs": 4000}}, "remove budget.max_docs"),
    ],
)
def test_what_a_phased_run_cannot_do_is_refused_in_one_line(tmp_path, search, sections, message):
    data = fake_spec_data(tmp_path, "bad", search=search)
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    with pytest.raises(UserError, match=message) as refusal:
        parse_spec(data, "spec", tmp_path)
    assert "\n" not in str(refusal.value)


def test_a_phased_spec_without_params_share_keeps_the_fields_it_set(tmp_path):
    spec = parse_spec(fake_spec_data(tmp_path, "a", search={"space": "params_then_layers"}), "spec", tmp_path)
    assert spec.search.params_evals(19) == 10 and "params_share" not in spec.model_dump(mode="json")["search"]
    assert yaml.safe_load(yaml.safe_dump(spec.model_dump(mode="json")))["search"]["space"] == "params_then_layers"


def test_a_layer_trial_exports_as_a_multi_document_yaml_mergekit_rebuilds(finished, tmp_path, mergekit_merge):
    from merge.cli_runner import run_cli_in_process
    from merge.mergekit_equality import compare_folders
    from merge.test_multi_merge import run_mergekit_multi

    run_dir, _, _ = finished
    events = read_events(run_dir / "journal.jsonl")
    change = next(e for e in events if e["event"] == "phase_changed")
    mixed = next(  # a layer trial that takes layers from the winner and from another model
        e["trial"]
        for e in events
        if e["event"] == "asked"
        and e["trial"] >= change["first_trial"]
        and len({s["sources"][0]["model"] for s in e["merge_config"]["slices"]} | {PS_WINNER}) > 1
        and any(s["sources"][0]["model"] == PS_WINNER for s in e["merge_config"]["slices"])
    )
    exported = tmp_path / "winner.yml"
    done = run_cli_in_process("export", run_dir, "--trial", str(mixed), "-o", exported)
    assert done.returncode == 0, done.stderr
    documents = list(yaml.safe_load_all(exported.read_text()))
    assert [d.get("name") for d in documents] == [PS_WINNER, None]
    assert {k: v for k, v in documents[0].items() if k != "name"} == change["merge_config"]
    run_mergekit_multi(exported, tmp_path / "mergekit", tmp_path / "mergekit_steps")
    merged = run_cli_in_process("merge", exported, tmp_path / "evomerge")
    assert merged.returncode == 0, merged.stderr
    compare_folders(tmp_path / "evomerge", tmp_path / "mergekit").assert_bit_for_bit()
    # The intermediate mergekit builds is the very model the layer phase's candidates were built from.
    compare_folders(run_dir / PS_WINNER, tmp_path / "mergekit_steps" / PS_WINNER).assert_bit_for_bit()


def test_report_and_status_read_a_phased_run(finished):
    from merge.cli_runner import run_cli_in_process

    run_dir, _, _ = finished
    status = run_cli_in_process("status", run_dir)
    assert status.returncode == 0 and "phase: layers" in status.stdout, status.stdout + status.stderr
    report = run_cli_in_process("report", run_dir)
    assert report.returncode == 0, report.stderr


def test_a_tpe_phased_search_resumes_to_the_same_journal(zoo, tmp_path):
    optimizer = {"name": "tpe", "seed": 7, "n_startup_trials": 3}
    journals = []
    for name, stop_after in (("tpe-reference", None), ("tpe-interrupted", 17)):
        data = phased_data(tmp_path, zoo, name)
        data["optimizer"] = optimizer
        spec = parse_spec(data, "spec", tmp_path)
        run_dir = create_run_dir(spec)
        if stop_after is not None:
            with pytest.raises(KeyboardInterrupt):
                run_phased(spec, run_dir, interrupt_after=stop_after)
            run, spec, _ = open_run(run_dir)
            run_phased(spec, run)
        else:
            run_phased(spec, run_dir)
        journals.append(journal_state(run_dir))
    assert journals[0] == journals[1]
    assert any(state[0] == "phase_changed" for state in journals[0])


def test_more_budget_extends_the_layer_phase(finished, tmp_path):
    import shutil

    from evomerge.rundir.results import docs_scored
    from evomerge.rundir.trials import replay
    from evomerge.search.budget import BudgetRequest, effective_spec, extended_spec, journal_budget

    reference_dir, _, _ = finished
    run_dir = tmp_path / "extended"
    shutil.copytree(reference_dir, run_dir)
    run, frozen, events = open_run(run_dir)
    spec = effective_spec(frozen, events)
    asked = sum(1 for e in events if e["event"] == "asked")
    journal_budget(run, spec, extended_spec(spec, BudgetRequest(max_evals=30), asked, docs_scored(replay(events))))
    run_phased(effective_spec(frozen, read_events(run_dir / "journal.jsonl")), run)
    events = read_events(run_dir / "journal.jsonl")
    first = next(e for e in events if e["event"] == "phase_changed")["first_trial"]
    asked = [e for e in events if e["event"] == "asked"]
    assert len(asked) == 30 and [e["event"] for e in events].count("phase_changed") == 1
    assert sum(e["trial"] >= first for e in asked) == 18  # the 6 new evaluations all go to the layer phase
    assert events[-1]["event"] == "run_finished"


def test_a_method_gene_parameter_phase_hands_over_a_single_method_winner(zoo, tmp_path):
    data = phased_data(tmp_path, zoo, "method-gene")
    data["merge"] = {"method": ["task_arithmetic", "ties"]}
    spec = parse_spec(data, "spec", tmp_path)
    run_dir = create_run_dir(spec)
    run_phased(spec, run_dir)
    events = read_events(run_dir / "journal.jsonl")
    change = next(e for e in events if e["event"] == "phase_changed")
    methods = {e["merge_config"]["merge_method"] for e in events if e["event"] == "asked" and e["kind"] == "optimizer"}
    assert {"task_arithmetic", "ties", "passthrough"} <= methods
    assert isinstance(change["merge_config"]["merge_method"], str)
    assert (run_dir / PS_WINNER / "config.json").is_file() and events[-1]["event"] == "run_finished"


def test_the_layer_phase_keeps_the_evaluation_sets_this_start_pinned(zoo, tmp_path):
    from dataclasses import replace

    spec = parse_spec(phased_data(tmp_path, zoo, "pinned"), "spec", tmp_path)
    search = open_phased(spec, create_run_dir(spec))
    pinned = {"search": "search set at its pinned revision", "heldout": "held-out set at its pinned revision"}
    search.prepared = replace(search.prepared, eval_sets=pinned)  # as run() pins hub datasets before workers start
    handed = []

    def layer_workers(prepared):
        handed.append(prepared)
        return fake_scheduler(score=phased_score)

    search.run_with(fake_scheduler(score=phased_score), layer_workers)
    assert len(handed) == 1 and handed[0].eval_sets == pinned and handed[0].spec.search.layers
