"""Standard lm-eval tasks, groups and tags with hub data, scored against the stand-in hub.

Promises: a bundled task's YAML runs unchanged on its hub dataset; a group is scored as lm-eval
aggregates it (both backends alike) and the result keeps every subtask's score; a tag scores the
mean of its tasks; a mistyped name gets did-you-mean; an offline node without the dataset in its
cache gets one line naming the task, the dataset and `evomerge prefetch`; held-out docs carved from
the search tasks are disjoint from the search docs, seeded, and the same on every build.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hub_fixtures import (
    ARC_SPLITS,
    add_arc_easy,
    add_config_dataset,
    arc_row,
    bundled_tasks_folder,
    mmlu_row,
    parquet_bytes,
)
from scoring_fixtures import FIXTURES, char_model, char_tokenizer, single_torch_thread  # noqa: F401 - autouse fixture

from evomerge.errors import UserError
from evomerge.evaluation.config import EvaluationSpec
from evomerge.evaluation.dry_run import rehearse_eval_set
from evomerge.evaluation.evaluate import Evaluator, doc_subset, seeded_subset
from evomerge.evaluation.hub_data import (
    dataset_fingerprints,
    eval_datasets,
    fetch_datasets,
    locked_dataset_revisions,
    pin_datasets,
    revisions_from_fingerprints,
)
from evomerge.evaluation.scores import EvalResult, standard_error
from evomerge.evaluation.tasks import resolve_tasks
from evomerge.rundir.events import TrialResult
from evomerge.spec import load_spec

REPO = Path(__file__).resolve().parents[2]


def evaluation(tasks, **settings) -> EvaluationSpec:
    return EvaluationSpec.model_validate({"tasks": tasks, "include": [str(FIXTURES)], "batch_size": 8} | settings)


def arc_rows(count: int) -> list[dict]:
    return [arc_row(i, f"question {i}?", [f"yes {i}", f"no {i}", "maybe"], i % 3) for i in range(count)]


@pytest.fixture(scope="module")
def model():
    return char_model(seed=5)


def test_bundled_arc_easy_scores_on_its_hub_dataset(standin_hub, model):
    add_arc_easy(standin_hub)
    search = evaluation(["arc_easy"]).eval_sets()["search"]

    assert rehearse_eval_set(search, resolve_tasks(search)) == 2
    result = Evaluator(model, char_tokenizer(), search).evaluate()

    assert result.n_docs == {"arc_easy": 2}
    assert 0.0 <= result.metrics["arc_easy"] <= 1.0


def test_offline_without_the_dataset_cached_names_the_prefetch_command(standin_hub, go_offline):
    add_arc_easy(standin_hub)
    go_offline()
    search = evaluation(["tiny_add", "arc_easy"]).eval_sets()["search"]

    with pytest.raises(UserError) as caught:
        rehearse_eval_set(search, resolve_tasks(search))

    message = str(caught.value)
    assert message.startswith(
        "evaluation.tasks[1]: task 'arc_easy' reads hub dataset 'allenai/ai2_arc' (config 'ARC-Easy')"
    )
    assert "evomerge prefetch" in message and "\n" not in message


SUBJECTS = {"abstract_algebra": 2, "anatomy": 5, "astronomy": 3}  # docs per subject: sizes differ
TINY_MMLU = """\
group: tiny_mmlu
task: [mmlu_abstract_algebra, mmlu_anatomy, mmlu_astronomy]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
"""


TINY_PAIR = (
    "group: tiny_pair\ntask: [tiny_add, tiny_choice]\naggregate_metric_list: [{metric: acc, weight_by_size: true}]\n"
)


def add_tiny_mmlu(hub, folder):
    """cais/mmlu with three subjects of different sizes, and a group of their bundled tasks in `folder`."""
    configs = {}
    for subject, count in SUBJECTS.items():
        rows = [
            mmlu_row(f"{subject} {i} plus {i}?", [str(i), str(2 * i), "7", "8"], i % 4, subject) for i in range(count)
        ]
        configs[subject] = {"test": rows, "validation": rows, "dev": rows}
    add_config_dataset(hub, "cais/mmlu", configs)
    (folder / "tiny_mmlu.yaml").write_text(TINY_MMLU)
    return [str(FIXTURES), str(folder)]


def test_a_group_scores_as_lm_eval_aggregates_it_on_both_backends(standin_hub, model, tmp_path):
    include = add_tiny_mmlu(standin_hub, tmp_path)
    search = evaluation(["tiny_mmlu", "tiny_choice"], include=include, limit=4).eval_sets()["search"]

    native, reference = (
        Evaluator(model, char_tokenizer(), search, backend=backend).evaluate() for backend in ("native", "lm_eval")
    )

    assert native.metrics == reference.metrics and native.subtasks == reference.subtasks
    parts = native.subtasks["tiny_mmlu"]
    leaf_docs = {f"mmlu_{subject}": min(4, count) for subject, count in SUBJECTS.items()}
    assert (parts["weighting"], parts["n_docs"]) == ("size", leaf_docs)
    assert native.n_docs["tiny_mmlu"] == sum(leaf_docs.values())
    pooled = sum(parts["metrics"][leaf] * n for leaf, n in leaf_docs.items()) / sum(leaf_docs.values())
    assert native.metrics["tiny_mmlu"] == pytest.approx(pooled, abs=1e-12)


def test_a_tag_scores_the_unweighted_mean_of_its_tasks(standin_hub, model):
    add_arc_easy(standin_hub, {"train": arc_rows(2), "validation": arc_rows(2), "test": arc_rows(5)})
    search = evaluation(["ai2_arc"], limit=4).eval_sets()["search"]

    result = Evaluator(model, char_tokenizer(), search).evaluate()

    parts = result.subtasks["ai2_arc"]
    assert (parts["weighting"], parts["n_docs"]) == ("equal", {"arc_challenge": 4, "arc_easy": 4})
    assert result.metrics["ai2_arc"] == pytest.approx(sum(parts["metrics"].values()) / 2, abs=1e-12)


def test_a_mistyped_bundled_name_gets_did_you_mean():
    for typo, meant in (("arc_eazy", "arc_easy"), ("mmlu_abstract_algebr", "mmlu_abstract_algebra")):
        with pytest.raises(
            UserError, match=rf"^evaluation.tasks\[0\].name: unknown lm-eval task '{typo}' \(did you mean '{meant}'\?\)"
        ):
            resolve_tasks(evaluation([typo]).eval_sets()["search"])


def test_groups_and_tags_list_their_hub_datasets_without_downloading():
    refs = eval_datasets(evaluation(["ai2_arc", "mmlu_abstract_algebra"]).eval_sets().values())
    assert [(ref.path, ref.name, ref.splits) for ref in refs] == [
        ("allenai/ai2_arc", "ARC-Challenge", ("test", "validation", "train")),
        ("allenai/ai2_arc", "ARC-Easy", ("test", "validation", "train")),
        ("cais/mmlu", "abstract_algebra", ("test", "dev")),
    ]


def test_prefetch_locks_the_commit_that_offline_builds_then_read(standin_hub, go_offline):
    first = add_arc_easy(standin_hub, arc_rows(3))
    sets = list(evaluation(["arc_easy"]).eval_sets().values())
    (entry,) = fetch_datasets(sets)
    assert (entry["path"], entry["name"], entry["revision"]) == ("allenai/ai2_arc", "ARC-Easy", first)
    assert entry["size"] > 0
    hub_moves_on(standin_hub, 5)

    locked = evaluation(["arc_easy"]).eval_sets(locked_dataset_revisions({"datasets": [entry]}))["search"]
    assert rehearse_eval_set(locked, resolve_tasks(locked)) == 3
    go_offline()
    standin_hub.clear_requests()
    assert rehearse_eval_set(locked, resolve_tasks(locked)) == 3
    assert standin_hub.requests == []


def hub_moves_on(hub, rows: int) -> None:
    files = {
        f"{config}/{split}-00000-of-00001.parquet": parquet_bytes(arc_rows(rows))
        for config in ("ARC-Easy", "ARC-Challenge")
        for split in ARC_SPLITS
    }
    hub.commit("allenai/ai2_arc", files, repo_type="dataset")


def test_a_run_reads_the_dataset_commits_its_input_fingerprints_hold(standin_hub):
    first = add_arc_easy(standin_hub, arc_rows(3))
    sets = evaluation(["arc_easy"]).eval_sets()
    rehearse_eval_set(sets["search"], resolve_tasks(sets["search"]))  # validate caches the dataset
    fingerprints = dataset_fingerprints(sets["search"])
    assert fingerprints == {"dataset:allenai/ai2_arc:ARC-Easy": f"revision:{first}"}
    hub_moves_on(standin_hub, 5)

    pinned = pin_datasets(sets, revisions_from_fingerprints(fingerprints))["search"]
    assert rehearse_eval_set(pinned, resolve_tasks(pinned)) == 3
    assert rehearse_eval_set(sets["search"], resolve_tasks(sets["search"])) == 5


def test_without_carving_the_seeded_draw_is_unchanged():
    search = evaluation(["tiny_add"], limit=8).eval_sets()["search"]
    assert doc_subset(40, search, "tiny_add", "tiny_add") == seeded_subset(40, 8, 0, "tiny_add")
    assert seeded_subset(40, 8, 0, "tiny_add") == [5, 18, 19, 22, 23, 24, 33, 34]  # the draw every earlier run made


@pytest.mark.parametrize("limits", [{}, {"limit": 6, "heldout_limit": 5}])
def test_carved_held_out_docs_are_disjoint_seeded_and_the_same_on_every_draw(limits):
    spec = evaluation(["tiny_add"], heldout_fraction=0.25, **limits)
    search, heldout = spec.eval_sets().values()
    assert heldout.tasks == search.tasks and heldout.task_field(0) == "evaluation.tasks[0]"

    searched, held = (doc_subset(40, part, "tiny_add", "tiny_add") for part in (search, heldout))

    assert not set(searched) & set(held)
    assert (len(searched), len(held)) == ((6, 5) if limits else (30, 10))
    assert (searched, held) == tuple(doc_subset(40, part, "tiny_add", "tiny_add") for part in (search, heldout))
    reseeded = evaluation(["tiny_add"], heldout_fraction=0.25, seed=1, **limits).eval_sets()["heldout"]
    assert doc_subset(40, reseeded, "tiny_add", "tiny_add") != held


def test_raced_slices_of_a_carved_task_stay_in_its_search_part():
    search = evaluation(["tiny_add"], heldout_fraction=0.5, fidelity={"rungs": [0.3, 1.0]}).eval_sets()["search"]
    slices = [doc_subset(40, part, "tiny_add", "tiny_add") for part in search.slices()]
    assert sorted(slices[0] + slices[1]) == doc_subset(40, search, "tiny_add", "tiny_add")
    assert not set(slices[0]) & set(slices[1])


def test_a_group_s_standard_error_comes_from_its_subtasks():
    subtasks = {"g": {"weighting": "size", "metrics": {"a": 0.5, "b": 1.0}, "n_docs": {"a": 100, "b": 300}}}
    exact = ((100 / 400) ** 2 * 0.25 / 100) ** 0.5
    assert standard_error({"g": 0.875}, {"g": 400}, subtasks=subtasks) == pytest.approx(exact)
    subtasks["g"]["weighting"] = "equal"
    assert standard_error({"g": 0.75}, {"g": 400}, subtasks=subtasks) == pytest.approx((0.25 * 0.25 / 100) ** 0.5)


def test_the_journal_keeps_subtask_scores_and_reads_results_written_before_them():
    parts = {"g": {"weighting": "size", "metrics": {"a": 0.5, "b": 1.0}, "n_docs": {"a": 2, "b": 6}}}
    result = EvalResult(0.875, {"g": 0.875}, {"g": 8}, 1.0, parts)
    event = TrialResult(
        trial=3, ok=True, score=result.score, metrics=result.metrics, n_docs=result.n_docs, subtasks=result.subtasks
    ).to_journal()
    assert TrialResult.from_event({"event": "completed", **event}).subtasks == parts
    older = {"event": "completed", "trial": 1, "score": 0.5, "metrics": {"t": 0.5}, "n_docs": {"t": 4}}
    assert TrialResult.from_event(older).subtasks is None


@pytest.mark.parametrize("name", ["mistral-7b", "llama-3-8b"])
def test_the_example_specs_score_standard_benchmarks_with_carved_held_out(name):
    spec = load_spec(REPO / "search_spaces" / f"{name}.yaml")
    search, heldout = (resolve_tasks(part) for part in spec.evaluation.eval_sets().values())

    assert [(task.name, task.kind.value, task.result_key) for task in search.tasks] == [
        ("gsm8k", "task", "exact_match,strict-match"),
        ("arc_challenge", "task", "acc_norm,none"),
        ("mmlu", "group", "acc,none"),
    ]
    assert len(search.tasks[2].leaves) == 57 and search.tasks[2].weighting == "size"
    assert heldout.names == search.names  # carved: the same tasks, the other docs
    keys = {ref.key for ref in eval_datasets(spec.evaluation.eval_sets().values())}
    assert {"openai/gsm8k:main", "allenai/ai2_arc:ARC-Challenge", "cais/mmlu:anatomy"} <= keys and len(keys) == 59


def test_a_worker_scores_a_group_on_carved_search_and_held_out_docs(tmp_path):
    from search_zoo import build_trained_zoo

    from evomerge.preflight import preflight
    from evomerge.search.worker import MergeWorker, WorkerSettings

    zoo = build_trained_zoo(tmp_path / "zoo")
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "tiny_pair.yaml").write_text(TINY_PAIR)
    spec = {
        "name": "carved-group",
        "runs_dir": str(tmp_path / "runs"),
        "models": {"base": zoo["base"], "experts": [zoo["even"], zoo["odd"]]},
        "genome": {"layer_groups": 2},
        "evaluation": {"include": [str(FIXTURES), str(tmp_path / "evals")], "tasks": ["tiny_pair"]}
        | {"heldout_fraction": 0.25, "limit": 12, "batch_size": 8},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    prepared = preflight(load_spec(tmp_path / "spec.yaml"))
    settings = WorkerSettings(zoo["base"], prepared.union_config, prepared.eval_sets)
    worker = MergeWorker(settings, "w0")

    searched, held = worker.subset_indices("search"), worker.subset_indices("heldout")
    assert set(searched) == set(held) == {"tiny_add", "tiny_choice"}
    assert all(len(searched[t]) == 12 and len(held[t]) == 10 and not set(searched[t]) & set(held[t]) for t in held)
    config = prepared.genome.to_merge_config(prepared.genome.x0()).model_dump(mode="json", exclude_none=True)
    result = worker.evaluate(0, config, "heldout")
    assert result.ok and result.n_docs == {"tiny_pair": 20}
    assert result.subtasks["tiny_pair"]["n_docs"] == {"tiny_add": 10, "tiny_choice": 10}


def test_a_dataset_the_hub_does_not_have_is_one_line(standin_hub, tmp_path):
    arc = Path(bundled_tasks_folder()) / "arc" / "arc_easy.yaml"
    (tmp_path / "my_arc.yaml").write_text(
        arc.read_text().replace("task: arc_easy", "task: my_arc").replace("allenai/ai2_arc", "allenai/ai2_arcc")
    )
    search = evaluation(["my_arc"], include=[str(tmp_path)]).eval_sets()["search"]

    with pytest.raises(UserError) as caught:
        rehearse_eval_set(search, resolve_tasks(search))

    assert str(caught.value).startswith("evaluation.tasks[0]: task 'my_arc' reads hub dataset 'allenai/ai2_arcc'")
    assert "404" in str(caught.value) and "\n" not in str(caught.value)


def test_a_gated_dataset_without_a_token_is_one_line(standin_hub):
    add_arc_easy(standin_hub, gated=True)
    search = evaluation(["arc_easy"]).eval_sets()["search"]

    with pytest.raises(UserError) as caught:
        rehearse_eval_set(search, resolve_tasks(search))

    assert "reads hub dataset 'allenai/ai2_arc' (config 'ARC-Easy'), which is gated or private" in str(caught.value)
    assert "HF_TOKEN" in str(caught.value) and "\n" not in str(caught.value)


NESTED = """\
group: tiny_nested
task:
  - mmlu_abstract_algebra
  - group: tiny_inner
    task: [mmlu_anatomy, mmlu_astronomy]
    aggregate_metric_list: [{metric: acc, weight_by_size: false}]
aggregate_metric_list: [{metric: acc, weight_by_size: true}]
num_fewshot: 1
"""


def test_a_nested_group_with_overrides_scores_what_lm_eval_itself_reports(standin_hub, model, tmp_path):
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    include = add_tiny_mmlu(standin_hub, tmp_path)
    (tmp_path / "tiny_nested.yaml").write_text(NESTED)
    search = evaluation(["tiny_nested"], include=include).eval_sets()["search"]
    ours = Evaluator(model, char_tokenizer(), search).evaluate()

    manager = TaskManager(
        include_path=[str(tmp_path), str(bundled_tasks_folder() / "mmlu" / "default")], include_defaults=False
    )
    loaded = manager.load(["tiny_nested"])
    for task in loaded["tasks"].values():
        task.set_fewshot_seed(1234)
    lm = HFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=8)
    reported = evaluate(lm=lm, task_dict=loaded, bootstrap_iters=0, log_samples=False)["results"]

    assert set(ours.subtasks["tiny_nested"]["metrics"]) == set(loaded["tasks"])
    assert all(task.config.num_fewshot == 1 for task in loaded["tasks"].values())
    assert ours.metrics["tiny_nested"] == pytest.approx(reported["tiny_nested"]["acc,none"], abs=1e-12)
    for leaf, value in ours.subtasks["tiny_nested"]["metrics"].items():
        assert value == reported[leaf]["acc,none"], leaf


def test_offline_a_broken_template_over_a_cached_dataset_is_named_as_such(standin_hub, go_offline, tmp_path):
    add_arc_easy(standin_hub)
    arc = Path(bundled_tasks_folder()) / "arc" / "arc_easy.yaml"
    (tmp_path / "my_arc.yaml").write_text(
        arc.read_text().replace("task: arc_easy", "task: my_arc").replace("{{choices.text}}", "{{choices.txt[9]}}")
    )
    fetch_datasets([evaluation(["arc_easy"]).eval_sets()["search"]])
    go_offline()
    search = evaluation(["my_arc"], include=[str(tmp_path)]).eval_sets()["search"]

    with pytest.raises(UserError) as caught:
        rehearse_eval_set(search, resolve_tasks(search))

    assert "prefetch" not in str(caught.value) and "fix doc_to_text, doc_to_target and doc_to_choice" in str(
        caught.value
    )
