"""The stacking zoo: deterministic quick builds, a block expansion that leaves the base's function
unchanged, experts that move only the expanded block, the stacked path, and the design check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from zoo_builds import assert_identical_builds, load_build_script, load_weights, quick_builds

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build_script():
    return load_build_script("build_stacking_zoo")


@pytest.fixture(scope="module")
def quick_zoos(build_script, tmp_path_factory):
    return quick_builds(build_script, tmp_path_factory, "stacking")


def layer_of(build_script, name: str) -> int | None:
    return build_script.zoo_common.layer_index(name)


def test_two_quick_builds_give_identical_tensors(quick_zoos, build_script):
    first, second = quick_zoos
    assert_identical_builds(first, second, build_script.MODEL_DIRS)


def test_the_expanded_block_copies_the_pretrained_layers_with_zero_output(quick_zoos, build_script):
    base = load_weights(quick_zoos[0] / "base")
    depth = build_script.RECIPE["model"]["num_hidden_layers"]
    block = build_script.RECIPE["expert_layers"]
    assert block == list(range(depth, build_script.RECIPE["expanded_layers"]))
    for layer in block:
        prefix, source = f"model.layers.{layer}.", f"model.layers.{layer - depth}."
        for name in (name for name in base if name.startswith(prefix)):
            if name.endswith(build_script.OUTPUT_PROJECTIONS):
                assert not base[name].any(), name
            else:
                assert torch.equal(base[name], base[source + name[len(prefix) :]]), name


def test_expansion_keeps_the_function(build_script):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    shallow = LlamaForCausalLM(config).eval()
    expanded = build_script.expand(shallow, 5)
    ids = torch.randint(0, 32, (2, 7))
    assert expanded.config.num_hidden_layers == 5
    with torch.no_grad():
        torch.testing.assert_close(expanded(input_ids=ids).logits, shallow(input_ids=ids).logits)


def test_experts_move_only_the_expanded_block(quick_zoos, build_script):
    base = load_weights(quick_zoos[0] / "base")
    block = set(build_script.RECIPE["expert_layers"])
    for skill in build_script.SKILLS:
        expert = load_weights(quick_zoos[0] / f"expert_{skill}")
        moved = {layer_of(build_script, name) for name in base if not torch.equal(base[name], expert[name])}
        assert moved == block, (skill, moved)


def test_the_stacked_path_runs_each_block_in_turn(quick_zoos, build_script):
    from transformers import AutoModelForCausalLM

    models = {name: AutoModelForCausalLM.from_pretrained(quick_zoos[0] / name) for name in build_script.MODEL_DIRS}
    path = build_script.stacked_path(models, build_script.RECIPE)
    assert path.config.num_hidden_layers == 12
    weights = {name: tensor for name, tensor in path.state_dict().items()}
    expected = {0: "base", 4: "expert_increment", 8: "expert_decrement"}
    for position, model in expected.items():
        source_layer = position if position < 4 else 4
        name = f"model.layers.{position}.mlp.down_proj.weight"
        source = models[model].state_dict()[f"model.layers.{source_layer}.mlp.down_proj.weight"]
        assert torch.equal(weights[name], source), position


def test_eval_splits_are_disjoint_and_match_the_committed_files(build_script, tmp_path):
    splits = build_script.eval_splits("decrement")
    assert not {d["prompt"] for d in splits["search"]} & {d["prompt"] for d in splits["heldout"]}
    for path in build_script.write_eval_suite(tmp_path):
        committed = REPO / "evals" / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), committed


def test_the_check_flags_an_untrained_zoo(quick_zoos, build_script):
    tokenizer = build_script.demo_data.build_char_tokenizer()
    table = build_script.heldout_table(quick_zoos[0], build_script.make_recipe(quick=True), tokenizer, limit=8)
    assert {"linear", "task_arithmetic", "ties", build_script.STACKED} | set(build_script.MODEL_DIRS) <= set(table)
    assert build_script.check_design(table)


def test_the_check_accepts_the_designed_table(build_script):
    table = {
        "base": {"increment": 0.0, "decrement": 0.0, "mean": 0.0},
        "expert_increment": {"increment": 1.0, "decrement": 0.0, "mean": 0.5},
        "expert_decrement": {"increment": 0.0, "decrement": 1.0, "mean": 0.5},
        "task_arithmetic": {"increment": 0.1, "decrement": 0.1, "mean": 0.1},
        build_script.STACKED: {"increment": 0.9, "decrement": 0.9, "mean": 0.9},
    }
    assert build_script.check_design(table) == []
    table[build_script.STACKED] = {"increment": 0.5, "decrement": 0.0, "mean": 0.25}
    assert len(build_script.check_design(table)) == 1
