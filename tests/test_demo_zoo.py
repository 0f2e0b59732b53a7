"""The bundled demo zoo: deterministic quick builds, one shared tokenizer, honest eval splits."""

from __future__ import annotations

import json
from pathlib import Path

import demo_data
import pytest
import torch
import yaml
from zoo_builds import assert_identical_builds, load_build_script, load_weights, quick_builds

REPO = Path(__file__).resolve().parents[1]
EVALS = REPO / "evals"
MODEL_DIRS = ["base"] + [f"expert_{name}" for name in demo_data.SKILLS]


@pytest.fixture(scope="module")
def build_script():
    return load_build_script("build_demo_zoo")


@pytest.fixture(scope="module")
def quick_zoos(build_script, tmp_path_factory):
    return quick_builds(build_script, tmp_path_factory, "zoo")


def test_two_quick_builds_give_identical_tensors(quick_zoos):
    first, second = quick_zoos
    assert_identical_builds(first, second, MODEL_DIRS)


def test_each_expert_moves_its_own_block_most_and_shares_embeddings(quick_zoos, build_script):
    zoo = quick_zoos[0]
    base = load_weights(zoo / "base")
    for skill, own_layers in build_script.RECIPE["expert_layers"].items():
        expert = load_weights(zoo / f"expert_{skill}")
        shift = {"own": [], "drift": []}
        for name, tensor in base.items():
            layer = build_script.layer_index(name)
            if layer is None:
                assert torch.equal(tensor, expert[name]), f"expert_{skill} changed {name}"
            else:
                shift["own" if layer in own_layers else "drift"].append((expert[name] - tensor).abs().mean().item())
        own, drift = (sum(v) / len(v) for v in (shift["own"], shift["drift"]))
        assert own > 2 * drift > 0, (skill, own, drift)


def test_every_model_loads_offline_with_one_shared_tokenizer(quick_zoos):
    from transformers import AutoConfig, AutoTokenizer

    zoo = quick_zoos[0]
    tokenizer_files = {(zoo / name / "tokenizer.json").read_bytes() for name in MODEL_DIRS}
    assert len(tokenizer_files) == 1
    prompt = "rev:abc=cba"
    for name in MODEL_DIRS:
        tokenizer = AutoTokenizer.from_pretrained(zoo / name)
        config = AutoConfig.from_pretrained(zoo / name)
        assert config.architectures == ["LlamaForCausalLM"]
        assert config.vocab_size == len(tokenizer) < 100
        ids = tokenizer(prompt)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and len(ids) == len(prompt) + 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt


def test_second_build_with_same_recipe_is_a_no_op(quick_zoos, build_script):
    zoo = quick_zoos[0]
    weights = zoo / "base" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    build_script.build_zoo(zoo, quick=True, threads=1, check=False)
    assert weights.stat().st_mtime_ns == before
    manifest = json.loads((zoo / "zoo_manifest.json").read_text())
    assert manifest["recipe_hash"] == build_script.recipe_hash(build_script.make_recipe(quick=True))
    assert manifest["models"] == MODEL_DIRS


def test_quick_and_full_recipes_hash_differently(build_script):
    quick, full = (build_script.recipe_hash(build_script.make_recipe(q)) for q in (True, False))
    assert quick != full


def read_docs(skill: str, split: str) -> list[dict]:
    path = EVALS / demo_data.EVAL_TASK_DIR / "data" / f"{skill}_{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("skill", list(demo_data.SKILLS))
def test_search_and_heldout_are_disjoint_and_correct(skill):
    search, heldout = read_docs(skill, "search"), read_docs(skill, "heldout")
    search_prompts, heldout_prompts = {d["prompt"] for d in search}, {d["prompt"] for d in heldout}
    assert len(search_prompts) == len(search) >= 200 and len(heldout_prompts) == len(heldout) >= 300
    assert not search_prompts & heldout_prompts
    definition = demo_data.SKILLS[skill]
    for doc in search + heldout:
        tag, text = doc["prompt"].rstrip("=").split(":")
        assert tag == definition.tag and set(text) <= set(definition.alphabet)
        assert doc["target"] == definition.answer(text)


def test_committed_evals_match_the_generator(tmp_path):
    for written in demo_data.write_eval_suite(tmp_path):
        committed = EVALS / written.relative_to(tmp_path)
        assert committed.read_text() == written.read_text(), f"{committed} is stale: rerun with --write-evals"


def test_training_stream_never_yields_an_eval_prompt():
    evaluated = demo_data.all_eval_prompts()
    stream = demo_data.training_stream(list(demo_data.SKILLS.values()), "test", evaluated)
    drawn = {next(stream)["prompt"] for _ in range(3000)}
    assert not drawn & evaluated
    assert demo_data.SKILLS["reverse"].tag in {prompt.split(":")[0] for prompt in drawn}


def all_eval_yamls() -> list[Path]:
    return sorted(EVALS.rglob("*.yaml"))


@pytest.mark.parametrize("spec", all_eval_yamls(), ids=lambda p: str(p.relative_to(EVALS)))
def test_every_eval_yaml_loads_and_its_data_exists(spec):
    config = yaml.safe_load(spec.read_text())
    data_files = config.get("dataset_kwargs", {}).get("data_files", {})
    for relative in data_files.values():
        assert (spec.parent / relative).is_file(), f"{spec}: {relative} not found next to the YAML"
    if "group" in config:
        siblings = [yaml.safe_load(p.read_text()) for p in spec.parent.glob("*.yaml")]
        assert set(config["task"]) <= {sibling["task"] for sibling in siblings if "group" not in sibling}
    else:
        assert config["output_type"] == "loglikelihood" and data_files


@pytest.mark.slow
def test_the_full_zoo_is_bit_identical_to_the_reference_build(build_script):
    """The README's demo numbers come from this zoo; any x86-64 machine must build the same bytes."""
    zoo = build_script.build_zoo(build_script.DEFAULT_OUT)  # cached; else built with pinned numerics
    manifest = json.loads((zoo / "zoo_manifest.json").read_text())
    assert manifest["numerics"] == "pinned"
    assert build_script.weights_sha256(zoo) == manifest["zoo_sha256"] == build_script.reference_sha256()
