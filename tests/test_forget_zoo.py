"""The forgetting zoo: deterministic quick builds, experts that move only decoder layers, caching,
and the design check that scores every default merge against the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from zoo_builds import assert_identical_builds, load_build_script, load_weights, quick_builds

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build_script():
    return load_build_script("build_forgetting_zoo")


@pytest.fixture(scope="module")
def quick_zoos(build_script, tmp_path_factory):
    return quick_builds(build_script, tmp_path_factory, "forget")


def test_two_quick_builds_give_identical_tensors(quick_zoos, build_script):
    first, second = quick_zoos
    assert_identical_builds(first, second, build_script.MODEL_DIRS)


def test_experts_change_every_decoder_layer_and_share_embeddings(quick_zoos, build_script):
    """Stage 1 moves the expert's own block, stage 2 the others; nothing outside the layers moves."""
    zoo = quick_zoos[0]
    base = load_weights(zoo / "base")
    for skill in build_script.SKILLS:
        expert = load_weights(zoo / f"expert_{skill}")
        moved = set()
        for name, tensor in base.items():
            layer = build_script.demo_zoo.layer_index(name)
            if layer is None:
                assert torch.equal(tensor, expert[name]), f"expert_{skill} changed {name}"
            elif not torch.equal(tensor, expert[name]):
                moved.add(layer)
        assert moved == set(range(build_script.RECIPE["model"]["num_hidden_layers"])), (skill, moved)


def test_second_build_with_same_recipe_is_a_no_op(quick_zoos, build_script):
    zoo = quick_zoos[0]
    weights = zoo / "base" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    build_script.build_zoo(zoo, quick=True, threads=1, check=False)
    assert weights.stat().st_mtime_ns == before
    manifest = json.loads((zoo / "zoo_manifest.json").read_text())
    assert manifest["recipe_hash"] == build_script.recipe_hash(build_script.make_recipe(quick=True))
    assert manifest["models"] == build_script.MODEL_DIRS
    assert manifest["zoo_sha256"] == build_script.weights_sha256(zoo)


def test_quick_and_full_recipes_hash_differently(build_script):
    quick, full = (build_script.recipe_hash(build_script.make_recipe(q)) for q in (True, False))
    assert quick != full


def test_expert_blocks_split_the_layers(build_script):
    blocks = build_script.RECIPE["expert_layers"]
    assert set(blocks) == set(build_script.SKILLS)
    layers = sorted(layer for block in blocks.values() for layer in block)
    assert layers == list(range(build_script.RECIPE["model"]["num_hidden_layers"]))


def test_the_check_scores_every_default_merge_and_flags_a_broken_zoo(quick_zoos, build_script):
    """An untrained quick zoo knows no skill, so the check must say the design does not hold."""
    zoo = quick_zoos[0]
    tokenizer = build_script.demo_data.build_char_tokenizer()
    table = build_script.heldout_table(zoo, build_script.make_recipe(quick=True), tokenizer, limit=8)
    expected = {"linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "della", build_script.OWN_BLOCKS}
    assert expected | set(build_script.MODEL_DIRS) <= set(table)
    assert all(0.0 <= row["mean"] <= 1.0 for row in table.values())
    assert build_script.check_design(table)


def test_the_check_accepts_the_designed_table(build_script):
    row = {"reverse": 0.6, "increment": 0.98, "mean": 0.79}
    table = {
        "base": row,
        "expert_reverse": {"reverse": 1.0, "increment": 0.0, "mean": 0.5},
        "expert_increment": {"reverse": 0.03, "increment": 1.0, "mean": 0.515},
        "ties": {"reverse": 0.02, "increment": 0.97, "mean": 0.495},
        build_script.OWN_BLOCKS: {"reverse": 1.0, "increment": 1.0, "mean": 1.0},
    }
    assert build_script.check_design(table) == []
    table["ties"] = row
    assert len(build_script.check_design(table)) == 1
