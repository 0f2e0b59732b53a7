"""The pass-through stacking zoo: deterministic quick builds, experts that move only the expanded
block, the block-contribution loss and the hooks that measure it."""

from __future__ import annotations

import pytest
import torch
from zoo_builds import assert_identical_builds, load_build_script, load_weights, quick_builds


@pytest.fixture(scope="module")
def build_script():
    return load_build_script("build_stacking_pass_zoo")


@pytest.fixture(scope="module")
def quick_zoos(build_script, tmp_path_factory):
    return quick_builds(build_script, tmp_path_factory, "stacking_pass")


def test_two_quick_builds_give_identical_tensors(quick_zoos, build_script):
    first, second = quick_zoos
    assert_identical_builds(first, second, build_script.MODEL_DIRS)


def test_the_base_is_the_stacking_zoos_and_experts_move_only_the_expanded_block(quick_zoos, build_script):
    stacking = build_script.stacking
    other = stacking.build_zoo(quick_zoos[0].parent / "stacking_base", quick=True, threads=1, check=False)
    base = load_weights(quick_zoos[0] / "base")
    assert all(torch.equal(tensor, load_weights(other / "base")[name]) for name, tensor in base.items())
    block = set(build_script.RECIPE["expert_layers"])
    for skill in build_script.SKILLS:
        expert = load_weights(quick_zoos[0] / f"expert_{skill}")
        moved = {stacking.zoo_common.layer_index(name) for name in base if not torch.equal(base[name], expert[name])}
        assert moved == block, (skill, moved)


def test_relative_change_counts_only_unmasked_positions(build_script):
    before = torch.ones(1, 3, 2)
    after = before.clone()
    after[0, 1] += 1.0  # a change of squared size 2 at the second position
    after[0, 2] += 5.0  # masked out
    mask = torch.tensor([[1, 1, 0]])
    assert build_script.relative_change(before, after, mask).item() == pytest.approx(2 / 4)


def test_the_tap_sees_the_blocks_input_and_output_and_leaves_the_model_as_it_was(build_script):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        untapped = model(input_ids=ids, output_hidden_states=True)
        tap = build_script.BlockTap(model, [1, 2])
        tapped = model(input_ids=ids).logits
        tap.remove()
    torch.testing.assert_close(tap.entering, untapped.hidden_states[1])
    torch.testing.assert_close(tap.leaving, untapped.hidden_states[3])
    torch.testing.assert_close(tapped, untapped.logits)
