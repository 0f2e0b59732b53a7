"""MergeWorker without Ray: resident merge + lm-eval per candidate, the same documents for every
worker and candidate of a run, and failures that stay inside one candidate."""

from __future__ import annotations

import pytest
import yaml
from search_zoo import FIXTURE_EVALS, build_trained_zoo


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from evomerge.preflight import preflight
    from evomerge.spec import load_spec

    root = tmp_path_factory.mktemp("worker")
    zoo = build_trained_zoo(root / "zoo")
    spec = {
        "name": "worker-test",
        "runs_dir": str(root / "runs"),
        "models": {"base": zoo["base"], "experts": [zoo["even"], zoo["odd"]]},
        "genome": {"layer_groups": 2},
        "evaluation": {"include": [str(FIXTURE_EVALS)], "tasks": ["tiny_add"], "limit": 24, "seed": 5, "batch_size": 8},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return preflight(load_spec(root / "spec.yaml"))


def make_worker(prepared, name):
    from evomerge.search.worker import MergeWorker, WorkerSettings

    settings = WorkerSettings(
        base_model=prepared.spec.models.base, union_config=prepared.union_config, eval_sets=prepared.eval_sets
    )
    return MergeWorker(settings, name)


def candidate(prepared, unit_value):
    genome = prepared.genome
    return genome.to_merge_config([unit_value] * genome.dim).model_dump(mode="json", exclude_none=True)


def test_every_worker_and_candidate_scores_the_same_documents(prepared):
    first, second = make_worker(prepared, "w0"), make_worker(prepared, "w1")
    before = first.subset_indices()
    results = [
        first.evaluate(0, candidate(prepared, 0.2)),
        second.evaluate(1, candidate(prepared, 0.9)),
        first.evaluate(2, candidate(prepared, 0.6)),
    ]
    assert all(r.ok for r in results)
    assert first.subset_indices() == second.subset_indices() == before
    assert len(before["tiny_add"]) == 24
    assert len({r.subset for r in results}) == 1


def test_same_candidate_gives_the_same_score_on_another_worker(prepared):
    config = candidate(prepared, 0.4)
    assert make_worker(prepared, "a").evaluate(0, config).score == make_worker(prepared, "b").evaluate(0, config).score


def test_failures_stay_inside_one_candidate(prepared, monkeypatch):
    worker = make_worker(prepared, "w0")
    broken = candidate(prepared, 0.5)
    broken["merge_method"] = "no_such_method"
    failed = worker.evaluate(0, broken)
    assert not failed.ok and "no_such_method" in failed.reason
    overflow = candidate(prepared, 0.5)
    # The genome evolves lambda per layer group (search version 2): the slices' value wins over a global one.
    for output_slice in overflow["slices"]:
        output_slice["parameters"] = {**output_slice.get("parameters", {}), "lambda": 1e39}
    failed = worker.evaluate(1, overflow)
    assert not failed.ok and "not finite" in failed.reason
    assert worker.evaluate(2, candidate(prepared, 0.5)).ok, "the worker still serves the next candidate"


@pytest.mark.parametrize("heldout_limit", [None, 10])
def test_heldout_split_is_scored_whole_unless_heldout_limit_says_otherwise(prepared, heldout_limit):
    from evomerge.preflight import preflight

    evaluation = prepared.spec.evaluation.model_dump() | {
        "heldout_tasks": ["tiny_choice"],
        "heldout_limit": heldout_limit,
    }
    spec = prepared.spec.model_copy(update={"evaluation": type(prepared.spec.evaluation).model_validate(evaluation)})
    with_heldout = preflight(spec)
    assert with_heldout.eval_sets["search"].limit == 24
    assert with_heldout.eval_sets["heldout"].limit == heldout_limit
    worker = make_worker(with_heldout, "w0")
    fixture_docs = len((FIXTURE_EVALS / "data" / "tiny.jsonl").read_text().splitlines())
    assert {name: len(docs) for name, docs in worker.subset_indices("heldout").items()} == {
        "tiny_choice": heldout_limit or fixture_docs
    }


def test_concurrent_calls_score_as_if_run_one_after_another(prepared):
    """A GPU actor takes two calls at once (the next one plans while this one evaluates); the lock
    around the model must make every score equal the sequential one."""
    from concurrent.futures import ThreadPoolExecutor

    configs = [candidate(prepared, value) for value in (0.1, 0.5, 0.9, 0.3)]
    sequential = [make_worker(prepared, "s").evaluate(trial, config).score for trial, config in enumerate(configs)]
    worker = make_worker(prepared, "c")
    with ThreadPoolExecutor(max_workers=2) as pool:
        concurrent = list(pool.map(lambda args: worker.evaluate(*args), enumerate(configs)))
    assert [result.score for result in concurrent] == sequential
    assert all(result.prepare_s >= 0 and result.merge_path == "reference" for result in concurrent)


@pytest.fixture(scope="module")
def raced(prepared):
    """The same worker spec, racing: the search subset in slices of 25 % and 75 %."""
    from evomerge.evaluation.config import FidelitySpec
    from evomerge.preflight import Prepared

    evaluation = prepared.spec.evaluation.model_copy(update={"fidelity": FidelitySpec(rungs=[0.25, 1.0])})
    spec = prepared.spec.model_copy(update={"evaluation": evaluation})
    spec = type(spec).model_validate(spec.model_dump())
    eval_sets = spec.evaluation.eval_sets()
    return Prepared(spec, prepared.genome, prepared.union_config, eval_sets, prepared.baselines)


def test_a_raced_worker_scores_the_unraced_subset_in_disjoint_slices_and_gets_the_same_score(prepared, raced):
    worker, whole = make_worker(raced, "raced"), make_worker(prepared, "whole")
    slices = [evaluator.subset_indices()["tiny_add"] for evaluator in worker.evaluators["search"]]
    assert [len(s) for s in slices] == [6, 18] and not set(slices[0]) & set(slices[1])
    assert worker.subset_indices() == whole.subset_indices()
    for value in (0.2, 0.7):
        raced_result = worker.evaluate(0, candidate(prepared, value))
        whole_result = whole.evaluate(0, candidate(prepared, value))
        assert raced_result.n_docs == whole_result.n_docs == {"tiny_add": 24}
        assert raced_result.rungs == 2 and not raced_result.stopped_early
        assert raced_result.score == pytest.approx(whole_result.score, abs=1e-12)
        assert raced_result.subset == whole_result.subset


def test_a_raced_candidate_that_cannot_reach_the_incumbent_or_a_rung_cutoff_stops_after_its_first_slice(raced):
    from evomerge.evaluation.fidelity import RaceTarget

    worker = make_worker(raced, "raced")
    stopped = worker.evaluate(3, candidate(raced, 0.5), race=RaceTarget(2.0))  # no score reaches 2
    assert stopped.ok and stopped.stopped_early and stopped.rungs == 1 and stopped.n_docs == {"tiny_add": 6}
    assert stopped.rung_scores == [stopped.score]
    kept = worker.evaluate(4, candidate(raced, 0.5), race=RaceTarget(-1.0))  # every score beats -1
    assert kept.ok and not kept.stopped_early and kept.n_docs == {"tiny_add": 24}
    assert kept.rung_scores == [stopped.score, kept.score]
    # Successive halving: the incumbent is beaten, but the first rung's partial score misses its cutoff.
    halved = worker.evaluate(5, candidate(raced, 0.5), race=RaceTarget(-1.0, cutoffs=(stopped.score,)))
    assert halved.stopped_early and halved.rungs == 1 and halved.score == stopped.score
    above = worker.evaluate(6, candidate(raced, 0.5), race=RaceTarget(-1.0, cutoffs=(stopped.score - 1e-6,)))
    assert not above.stopped_early and above.score == kept.score


def test_a_raced_candidate_asks_its_scorer_to_sync_the_weights_for_its_first_slice_only(raced, monkeypatch):
    from evomerge.evaluation.native import TorchBackend

    syncs = []
    monkeypatch.setattr(
        TorchBackend, "prepare_candidate", lambda self, weights_changed=True: syncs.append(weights_changed)
    )
    worker = make_worker(raced, "synced")
    for trial, value in enumerate((0.2, 0.7)):
        assert worker.evaluate(trial, candidate(raced, value)).rungs == 2
    assert syncs == [True, False, True, False]  # a vLLM engine gets each candidate's weights once
