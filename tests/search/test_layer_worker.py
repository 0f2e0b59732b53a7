"""A real MergeWorker for `search.space: layers` (no Ray) on the trained tiny zoo: preflight plans
the layer space, the base's own path scores what the parameter-space worker scores for the base,
a deeper path with a repeated layer and a scaled step scores on both the native scorer and
lm-eval's own HFLM with the same numbers, and the next candidate rewires the model back."""

from __future__ import annotations

import pytest
import torch
import yaml
from search_zoo import FIXTURE_EVALS, build_trained_zoo

from evomerge.errors import UserError
from evomerge.layer_genome import Step, path_config
from evomerge.merge.registry import single_model_config


def write_spec(root, zoo, name: str, **sections) -> str:
    spec = {
        "name": name,
        "runs_dir": str(root / "runs"),
        "models": {"base": zoo["base"], "experts": [zoo["even"], zoo["odd"]]},
        "search": {"space": "layers", "max_steps": 6, "scales": True},
        "evaluation": {"include": [str(FIXTURE_EVALS)], "tasks": ["tiny_add"], "limit": 24, "seed": 5, "batch_size": 8},
        **sections,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("layer_worker")
    return root, build_trained_zoo(root / "zoo")


def prepared_for(zoo_root, name: str, **sections):
    from evomerge.preflight import preflight
    from evomerge.spec import load_spec

    root, zoo = zoo_root
    return preflight(load_spec(write_spec(root, zoo, name, **sections)))


def make_worker(prepared, layer_paths: bool = True):
    from evomerge.search.worker import MergeWorker, WorkerSettings

    settings = WorkerSettings(
        base_model=prepared.spec.models.base,
        union_config=prepared.union_config,
        eval_sets=prepared.eval_sets,
        layer_paths=layer_paths,
    )
    return MergeWorker(settings, "w0")


def test_preflight_plans_the_layer_space(zoo_root):
    prepared = prepared_for(zoo_root, "plan")
    assert prepared.genome.steps == 6
    labels = [label for label, _ in prepared.baselines]
    assert labels == ["base", "parent:even", "parent:odd"]
    assert all(config["merge_method"] == "passthrough" for _, config in prepared.baselines)


def test_too_few_steps_are_refused_before_any_weight_is_read(zoo_root):
    with pytest.raises(UserError, match="search.max_steps: 3 is fewer than the base model's 4 layers"):
        prepared_for(zoo_root, "short", search={"space": "layers", "max_steps": 3})


def test_layer_paths_score_like_merges_and_on_both_backends(zoo_root):
    prepared = prepared_for(zoo_root, "worker")
    spec = prepared.spec
    models = [spec.models.base, *spec.models.experts]
    worker = make_worker(prepared)
    base_path = worker.evaluate(0, dict(prepared.baselines)["base"])
    params_worker = make_worker(prepared, layer_paths=False)
    assert base_path.ok and base_path.merge_path == "layers"
    assert base_path.score == params_worker.evaluate(0, single_model_config(spec.models.base, "float32")).score

    deeper = path_config(
        [Step(1, 0), Step(1, 1), Step(2, 1), Step(0, 2, 1.2), Step(2, 2), Step(0, 3)], models, "float32"
    )
    native = worker.evaluate(1, deeper)
    assert native.ok, native.reason
    assert worker.model.config.num_hidden_layers == len(worker.model.model.layers) == 6
    evaluation = {"include": [str(FIXTURE_EVALS)], "tasks": ["tiny_add"], "limit": 24, "seed": 5, "batch_size": 8}
    lm_eval = prepared_for(zoo_root, "lm-eval", evaluation={**evaluation, "backend": "lm_eval"})
    reference = make_worker(lm_eval).evaluate(1, deeper)
    assert reference.ok and reference.metrics == native.metrics

    again = worker.evaluate(2, dict(prepared.baselines)["base"])
    assert again.score == base_path.score and len(worker.model.model.layers) == 4


def test_validate_plans_the_memory_of_the_deepest_path(zoo_root):
    from merge.cli_runner import run_cli_in_process

    from evomerge.merge.io import inspect_model_folder
    from evomerge.merge.layer_memory import plan_layer_memory

    root, zoo = zoo_root
    done = run_cli_in_process("validate", write_spec(root, zoo, "validate"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: layer paths (passthrough) over 2 experts, 18 genes")
    assert "memory plan: device (sources on the device), layers merge" in done.stdout

    base = inspect_model_folder(zoo["base"], "models.base")
    plan = lambda **change: plan_layer_memory(  # noqa: E731
        **{
            "base": base,
            "experts": 2,
            "dtype": torch.float32,
            "steps": 4,
            "scales": False,
            "token_budget": 256,
            **change,
        }
    )
    shallow, deep, scaled = plan(), plan(steps=8), plan(steps=8, scales=True)
    assert shallow.devices[0].sources == 2 * shallow.devices[0].model  # every expert whole, beside the base
    assert deep.devices[0].workspace > shallow.devices[0].workspace  # the KV cache of 8 layers, not 4
    assert scaled.devices[0].model > deep.devices[0].model == shallow.devices[0].model
    assert not plan(gpu_bytes=1024**2, gpus=1).fits
