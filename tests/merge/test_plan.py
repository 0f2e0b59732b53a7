"""Direct tests of merge planning (`evomerge.merge.plan`): names in, per-tensor parameters out.

Planning reads tensor names only, so these tests need no model: a fake three-layer Llama's names.
The oracle tests (test_merge_oracle.py) check the same rules end to end against mergekit.
"""

from __future__ import annotations

import pytest

from evomerge.merge.config import MergeConfig
from evomerge.merge.plan import MissingParameter, Planner, interpolate_gradient, split_layer_name

LAYERS = 3
LAYER_SUFFIXES = ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")


def llama_names(tied: bool = False) -> list[str]:
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{suffix}" for i in range(LAYERS) for suffix in LAYER_SUFFIXES]
    names += ["model.norm.weight"] + ([] if tied else ["lm_head.weight"])
    return names


def plan_of(config: dict, tied: bool = False):
    merge = MergeConfig.model_validate(config)
    models = merge.referenced_models()
    return Planner(merge, {m: llama_names(tied) for m in models}, {m: LAYERS for m in models}).build()


def by_output(plan) -> dict:
    return {tensor.output: tensor for tensor in plan.tensors}


def ties(models: list[dict], **extra) -> dict:
    return {"merge_method": "ties", "base_model": "base", "models": models, **extra}


def test_layer_names_split_into_prefix_index_suffix():
    assert split_layer_name("model.layers.12.mlp.up_proj.weight") == ("model.layers.", 12, ".mlp.up_proj.weight")
    assert split_layer_name("model.embed_tokens.weight") is None


def test_gradients_interpolate_piecewise_linearly():
    assert interpolate_gradient("weight", [0.0, 1.0], 0.25) == 0.25
    assert interpolate_gradient("weight", [0.0, 1.0, 0.0], 0.75) == pytest.approx(0.5)
    assert interpolate_gradient("weight", [0.2, 0.4], 1.0) == 0.4
    # Booleans are not interpolated: the nearest lower entry wins.
    assert interpolate_gradient("normalize", [True, False], 0.4) is True


def test_source_beats_slice_beats_global_and_the_base_is_added_last():
    config = ties(
        [{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b"}],
        parameters={"weight": 0.3, "density": 0.5},
    )
    tensor = by_output(plan_of(config))["model.layers.1.mlp.up_proj.weight"]
    assert [model for model, _ in tensor.inputs] == ["a", "b", "base"]
    assert tensor.base_index == 2
    assert tensor.per_input[0] == {"weight": 0.7, "density": 0.5}
    assert tensor.per_input[1] == {"weight": 0.3, "density": 0.5}
    assert tensor.per_input[2] == {}, "the base of a task-vector method takes no parameters"
    assert tensor.shared["normalize"] is True, "ties normalizes by default, as mergekit does"


def test_filters_match_substrings_of_the_tensor_name_in_order():
    weight = [{"filter": "mlp", "value": 0.2}, {"value": 0.9}]
    config = ties([{"model": "a", "parameters": {"weight": weight, "density": 1.0}}])
    tensors = by_output(plan_of(config))
    assert tensors["model.layers.0.mlp.up_proj.weight"].per_input[0]["weight"] == 0.2
    assert tensors["model.layers.0.self_attn.q_proj.weight"].per_input[0]["weight"] == 0.9


def test_a_gradient_runs_across_the_layers_and_the_embeddings_take_its_start():
    config = ties([{"model": "a", "parameters": {"weight": [0.0, 1.0], "density": 1.0}}])
    tensors = by_output(plan_of(config))
    weights = [tensors[f"model.layers.{i}.mlp.up_proj.weight"].per_input[0]["weight"] for i in range(LAYERS)]
    assert weights == [0.0, 0.5, 1.0]
    assert tensors["model.embed_tokens.weight"].per_input[0]["weight"] == 0.0
    assert tensors["lm_head.weight"].per_input[0]["weight"] == 0.0


def test_slices_renumber_output_layers_and_take_their_own_parameters():
    def source(model, start, end, weight):
        return {"model": model, "layer_range": [start, end], "parameters": {"weight": weight, "density": 1.0}}

    config = {
        "merge_method": "ties",
        "base_model": "base",
        "slices": [
            {"sources": [source("a", 0, 2, 0.1), {"model": "base", "layer_range": [0, 2]}]},
            {"sources": [source("b", 2, 3, 0.8), {"model": "base", "layer_range": [2, 3]}]},
        ],
    }
    plan = plan_of(config)
    tensors = by_output(plan)
    assert plan.num_layers == 3
    assert tensors["model.layers.1.mlp.up_proj.weight"].inputs[0] == ("a", "model.layers.1.mlp.up_proj.weight")
    assert tensors["model.layers.2.mlp.up_proj.weight"].inputs[0] == ("b", "model.layers.2.mlp.up_proj.weight")
    assert tensors["model.layers.2.mlp.up_proj.weight"].per_input[0]["weight"] == 0.8


def test_tied_embeddings_plan_no_head_and_a_missing_weight_names_the_tensor():
    tied = plan_of(ties([{"model": "a", "parameters": {"weight": 1.0}}]), tied=True)
    assert "lm_head.weight" not in by_output(tied)
    with pytest.raises(MissingParameter, match="'weight' is not set for tensor model.embed_tokens.weight"):
        plan_of(ties([{"model": "a"}]))
