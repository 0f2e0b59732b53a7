"""runs/NAME/optuna.log for every optimizer, on the real Search and Scheduler with in-process fake
workers (tests/fake_workers.py): genes as parameters in their real units, per-task and held-out
scores as user attributes, baselines tagged in their own study, the journal's times, no duplicate
after a resume, and optuna-dashboard's own API reading it."""

from __future__ import annotations

import io
import json
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from fake_workers import FAILING_TRIAL, fake_scheduler, fake_spec_data, open_search

from evomerge.rundir.journal import read_events
from evomerge.rundir.results import load_trials
from evomerge.search.runs import create_run_dir, open_run
from evomerge.search.study_log import BASELINE_STUDY, STUDY, TRIAL_ID_ATTR
from evomerge.spec import parse_spec

OPTIMIZERS = {
    "cmaes": {"optimizer": {"name": "cmaes", "seed": 7, "popsize": 4}},
    "tpe": {"optimizer": {"name": "tpe", "seed": 7, "n_startup_trials": 3}},
    "random": {"optimizer": {"name": "random", "seed": 7}},
    "nsga2": {
        "optimizer": {"name": "nsga2", "seed": 7, "popsize": 4},
        "evaluation": {
            **fake_spec_data(Path("."), "x")["evaluation"],
            "objectives": [{"name": "add", "tasks": ["tiny_add"]}, {"name": "add again", "tasks": ["tiny_add"]}],
        },
    },
}


def finished_run(tmp_path: Path, name: str, max_evals: int = 19, **sections) -> tuple[object, Path]:
    spec = parse_spec(
        fake_spec_data(tmp_path / "runs", name, budget={"max_evals": max_evals}, **sections), "spec", tmp_path
    )
    run_dir = create_run_dir(spec)
    search = open_search(spec, run_dir)
    search.run_with(fake_scheduler())
    return search, run_dir


def load(run_dir: Path, name: str = STUDY) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.log")))
    return optuna.load_study(study_name=name, storage=storage)


def by_trial_id(study: optuna.Study) -> dict[int, optuna.trial.FrozenTrial]:
    trials = study.get_trials()
    ids = [t.user_attrs[TRIAL_ID_ATTR] for t in trials]
    assert len(ids) == len(set(ids)), f"a trial appears twice: {sorted(ids)}"
    return dict(zip(ids, trials, strict=True))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_every_optimizer_writes_a_study_in_the_genes_units_with_metrics_and_times(tmp_path, optimizer):
    search, run_dir = finished_run(tmp_path, optimizer, **OPTIMIZERS[optimizer])
    events = read_events(run_dir / "journal.jsonl")
    _, trials = load_trials(run_dir)
    genes = {gene.name: gene for gene in search.prepared.genome.genes}
    study = load(run_dir)
    logged = by_trial_id(study)
    evolved = {i: t for i, t in trials.items() if t.kind == "optimizer" and t.status != "asked"}
    assert logged.keys() == evolved.keys()
    assert len(study.directions) == (2 if optimizer == "nsga2" else 1)
    asked_at = {e["trial"]: e["time"] for e in events if e["event"] == "asked"}
    finished_at = {e["trial"]: e["time"] for e in events if e["event"] in ("completed", "failed")}
    for trial_id, frozen in logged.items():
        trial = trials[trial_id]
        assert frozen.params == trial.params, "parameters are the decoded gene values, named after the genes"
        assert {name: (d.low, d.high) for name, d in frozen.distributions.items()} == {
            name: (genes[name].low, genes[name].high) for name in trial.params
        }
        assert frozen.datetime_start == datetime.fromtimestamp(asked_at[trial_id])
        assert frozen.datetime_complete == datetime.fromtimestamp(finished_at[trial_id])
        if trial_id == FAILING_TRIAL:
            assert frozen.state == optuna.trial.TrialState.FAIL and "not finite" in frozen.user_attrs["failure"]
            continue
        assert frozen.user_attrs["search/tiny_add"] == trial.result.metrics["tiny_add"]
        assert frozen.values == (trial.result.objectives or [trial.score])
        if trial.heldout is not None:  # the top-k, re-scored at the end
            assert frozen.user_attrs["heldout_score"] == trial.heldout.score
            assert frozen.user_attrs["heldout/tiny_choice"] == trial.heldout.metrics["tiny_choice"]
    assert sum("heldout_score" in t.user_attrs for t in logged.values()) == 2  # top_k of the fake spec

    baselines = by_trial_id(load(run_dir, BASELINE_STUDY))
    assert {i: t.user_attrs["label"] for i, t in baselines.items()} == {
        i: t.label for i, t in trials.items() if t.kind == "baseline"
    }
    assert all(t.user_attrs["kind"] == "baseline" and "heldout_score" in t.user_attrs for t in baselines.values())


def test_a_resumed_run_rebuilds_the_study_from_the_journal_without_duplicates(tmp_path):
    search, run_dir = finished_run(tmp_path, "resumed")
    journal = run_dir / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    # Killed after its 12th line: the study file still holds every trial, the journal far fewer.
    journal.write_bytes(b"".join(lines[:12]))
    cut_trials = {json.loads(line)["trial"] for line in lines[:12] if json.loads(line)["event"] == "completed"}
    assert len(by_trial_id(load(run_dir, BASELINE_STUDY))) > len([i for i in cut_trials if i < 0])

    run, spec, _ = open_run(run_dir)
    open_search(spec, run).run_with(fake_scheduler())
    _, trials = load_trials(run_dir)
    logged = by_trial_id(load(run_dir)) | by_trial_id(load(run_dir, BASELINE_STUDY))
    assert logged.keys() == {i for i, t in trials.items() if t.status != "asked"}


def test_old_tpe_snapshots_with_a_mirror_still_restore(tmp_path):
    from evomerge.optim import Optimizer, make_optimizer

    optimizer = make_optimizer("tpe", [0.0, 0.0], [1.0, 1.0], [0.5, 0.5], 0)
    optimizer._mirror = None  # what a snapshot of the mirroring version pickled
    optimizer.settings["storage_path"] = str(tmp_path / "optuna.log")
    restored = Optimizer.restore(optimizer.snapshot())
    assert not hasattr(restored, "_mirror")
    assert (restored.ask().x == optimizer.ask().x).all()
    assert not (tmp_path / "optuna.log").exists()


def call_dashboard(app, path: str) -> dict:
    """One GET on optuna-dashboard's WSGI app, as its browser page would send it."""
    replies = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "8080",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
    }
    body = b"".join(app(environ, lambda status, headers, *rest: replies.append(status)))
    assert replies[0].startswith("200"), (path, replies, body[:300])
    return json.loads(body)


def test_optuna_dashboard_reads_the_study_with_gene_parameters_and_importances(tmp_path):
    dashboard = pytest.importorskip("optuna_dashboard", reason="pip install optuna-dashboard (the dev extra)")
    search, run_dir = finished_run(tmp_path, "dashboard", max_evals=40, **OPTIMIZERS["tpe"])
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.log")))
    app = dashboard.wsgi(storage)
    studies = {s["study_name"]: s for s in call_dashboard(app, "/api/studies")["study_summaries"]}
    assert set(studies) == {STUDY, BASELINE_STUDY}
    detail = call_dashboard(app, f"/api/studies/{studies[STUDY]['study_id']}")
    gene_names = {gene.name for gene in search.prepared.genome.genes}
    assert {p["name"] for p in detail["intersection_search_space"]} == gene_names
    assert {"search/tiny_add", "heldout_score", "label"} <= {a["key"] for a in detail["union_user_attrs"]}
    (importances,) = call_dashboard(app, f"/api/studies/{studies[STUDY]['study_id']}/param_importances")[
        "param_importances"
    ]
    values = [item["importance"] for item in importances]
    assert {item["name"] for item in importances} == gene_names
    assert max(values) > min(values), "uniform importances mean the dashboard found no common search space"
