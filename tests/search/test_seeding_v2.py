"""Version 2 seeds the best scored baseline the space expresses, the base included."""

from __future__ import annotations

from fake_workers import fake_scheduler, fake_spec_data, open_search

from evomerge.rundir.journal import read_events
from evomerge.search.loop import create_run_dir
from evomerge.spec import Spec


def base_wins(trial: int, config: dict, eval_set: str) -> float:
    """The base model alone scores 0.9; every merge and parent 0.5 or less."""
    models = config.get("models") or []
    if config.get("merge_method") == "linear" and [m["model"] for m in models] == ["/frozen-run/base"]:
        return 0.9
    return 0.5 if trial < 0 else 0.4


def test_the_base_is_seeded_when_it_beats_every_other_baseline_and_its_point_adds_nothing(tmp_path):
    spec = Spec.model_validate(fake_spec_data(tmp_path, "seed-base", budget={"max_evals": 12}))
    run_dir = create_run_dir(spec)
    trials = open_search(spec, run_dir).run_with(fake_scheduler(score=base_wins))
    seeded = [e for e in read_events(run_dir / "journal.jsonl") if e["event"] == "seeded"]
    assert [s["label"] for s in seeded[0]["seeds"]] == ["base"]
    trial = next(t for t in trials.values() if t.label.endswith("(seeded: base)"))
    assert {value for name, value in trial.params.items() if name.startswith("weight")} == {0.0}
    assert trials[0].params == {**trials[0].params, **{n: 1.0 for n in trials[0].params if n.startswith("weight")}}


def test_no_seed_when_the_best_baseline_is_the_default_merge_x0_already_is(tmp_path):
    def default_merge_wins(trial: int, config: dict, eval_set: str) -> float:
        return 0.9 if config.get("merge_method") == "ties" and trial < 0 else 0.3

    spec = Spec.model_validate(fake_spec_data(tmp_path, "seed-none", budget={"max_evals": 10}))
    run_dir = create_run_dir(spec)
    open_search(spec, run_dir).run_with(fake_scheduler(score=default_merge_wins))
    seeded = [e for e in read_events(run_dir / "journal.jsonl") if e["event"] == "seeded"]
    assert seeded[0]["seeds"] == []
