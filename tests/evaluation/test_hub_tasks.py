"""Standard lm-eval tasks, groups and tags with hub data, scored against the stand-in hub.

Promises: a bundled task's YAML runs unchanged on its hub dataset; a group is scored as lm-eval
aggregates it (both backends alike) and the result keeps every subtask's score; a tag scores the
mean of its tasks; a mistyped name gets did-you-mean; an offline node without the dataset in its
cache gets one line naming the task, the dataset and `evomerge prefetch`; held-out docs carved from
the search tasks are disjoint from the search docs, seeded, and the same on every build.
"""

from __future__ import annotations

import pytest
from hub_fixtures import add_arc_easy, add_config_dataset, arc_row, mmlu_row
from scoring_fixtures import FIXTURES, char_model, char_tokenizer, single_torch_thread  # noqa: F401 - autouse fixture

from evomerge.errors import UserError
from evomerge.evaluation.config import EvaluationSpec
from evomerge.evaluation.dry_run import rehearse_eval_set
from evomerge.evaluation.evaluate import Evaluator
from evomerge.evaluation.tasks import resolve_tasks


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
    print(message)
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
