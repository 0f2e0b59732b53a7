"""Layer paths (`search.space: layers`) as merges: the genome's passthrough configs equal mergekit's
merges bit for bit, and a worker's in-memory rewiring equals the merge `evomerge merge` writes.

Covers fp32 and bf16 zoo members, paths deeper and shallower than the base, repeated layers,
scaled steps, and a tied-embeddings model (whose head follows the path's first embeddings).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fake_workers import fake_spec_data
from mergekit_equality import compare_with_mergekit
from tiny_models import build_base, build_tokenizer, finetune_deltas, save_checkpoint, tiny_llama_config, with_deltas

from evomerge.layer_genome import LayerGenome, Step, path_config
from evomerge.merge.config import MergeConfig, load_merge_config
from evomerge.merge.engine import merge_to_disk, named_tensors
from evomerge.merge.layer_paths import LayerPathMerger
from evomerge.merge.registry import every_tensor_config
from evomerge.spec import parse_spec

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def tied_zoo(tmp_path_factory) -> dict[str, str]:
    """A base with tied embeddings and two fine-tunes of it, fp32."""
    root = tmp_path_factory.mktemp("tied_zoo")
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    base = build_base(config, seed=5)
    tokenizer = build_tokenizer(config.vocab_size)
    members = {"base": base}
    members |= {name: with_deltas(base, finetune_deltas(base, seed, 0.03)) for name, seed in (("a", 21), ("b", 22))}
    for name, model in members.items():
        save_checkpoint(model, tokenizer, root / name, torch.float32)
    return {name: str(root / name) for name in members}


def layer_genome(base: str, experts: list[str], dtype: str = "float32", **search) -> LayerGenome:
    data = fake_spec_data(Path("/tmp"), "layers", search={"space": "layers", **search})
    data["models"] = {"base": base, "experts": experts}
    data["merge"] = {"dtype": dtype}
    return LayerGenome(parse_spec(data, "spec", Path("/")), NUM_LAYERS)


def candidate_configs(genome: LayerGenome, count: int, seed: int = 0) -> list[dict]:
    """The base and parents, then random points: paths of every length, repeats and model switches."""
    rng = np.random.default_rng(seed)
    points = [point for _, point in genome.baseline_points()] + [rng.random(genome.dim) for _ in range(count)]
    return [genome.merge_config_dict(point) for point in points]


def zoo_models(zoo, dtype: str) -> tuple[str, list[str]]:
    suffix = "bf16" if dtype == "bfloat16" else "fp32"
    return zoo.model("base", suffix), [zoo.model("ft_a", suffix), zoo.model("ft_b", suffix)]


def write_yaml(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_genome_paths_equal_mergekit(zoo, mergekit_merge, tmp_path, dtype):
    base, experts = zoo_models(zoo, dtype)
    genome = layer_genome(base, experts, dtype, scales=True, max_steps=8)
    configs = candidate_configs(genome, 3, seed=1)
    assert len({len(c["slices"]) for c in configs}) > 1  # different paths, not one path three times
    for index, config in enumerate(configs):
        work = tmp_path / str(index)
        work.mkdir()
        report = compare_with_mergekit(write_yaml(config, work / "path.yml"), work)
        report.assert_bit_for_bit()
        ours, theirs = (json.loads((work / side / "config.json").read_text()) for side in ("evomerge", "mergekit"))
        assert ours["num_hidden_layers"] == theirs["num_hidden_layers"] == _depth(config)


def test_tied_embeddings_path_equals_mergekit(tied_zoo, mergekit_merge, tmp_path):
    path = [Step(1, 0), Step(1, 1), Step(0, 1), Step(2, 2, 1.3), Step(0, 2), Step(0, 3)]
    config = path_config(path, [tied_zoo["a"], tied_zoo["base"], tied_zoo["b"]], "float32")
    report = compare_with_mergekit(write_yaml(config, tmp_path / "path.yml"), tmp_path)
    report.assert_bit_for_bit()
    assert "lm_head.weight" not in report.tensors  # tied: the head is the embeddings, written once


def test_deeper_path_config_counts_layers(zoo, tmp_path):
    config = path_config([Step(0, layer % NUM_LAYERS) for layer in range(7)], [zoo.model("base")], "float32")
    assert config["slices"] == [
        {"sources": [{"model": zoo.model("base"), "layer_range": [0, 4]}]},
        {"sources": [{"model": zoo.model("base"), "layer_range": [0, 3]}]},
    ]
    merge_to_disk(MergeConfig.model_validate(config), tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 7


def resident_merger(base: str, experts: list[str], dtype: torch.dtype) -> LayerPathMerger:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    union = MergeConfig.model_validate(every_tensor_config(base, experts, str(dtype).removeprefix("torch.")))
    return LayerPathMerger(model, union, "cpu", dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_memory_paths_equal_disk_merges(zoo, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    base, experts = zoo_models(zoo, dtype)
    genome = layer_genome(base, experts, dtype, scales=True, max_steps=7)
    merger = resident_merger(base, experts, getattr(torch, dtype))
    tokens = torch.tensor([[1, 5, 9, 14, 3, 7, 22]])
    for index, config in enumerate(candidate_configs(genome, 3, seed=2)):
        merger.merge(MergeConfig.model_validate(config))
        out = tmp_path / str(index)
        merge_to_disk(load_merge_config(write_yaml(config, tmp_path / f"{index}.yml")), out, progress=False)
        on_disk = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).eval()
        ours, theirs = named_tensors(merger.model), named_tensors(on_disk)
        assert ours.keys() == theirs.keys()
        for name, tensor in theirs.items():
            assert torch.equal(ours[name], tensor), name
        assert merger.model.config.num_hidden_layers == _depth(config)
        with torch.no_grad():
            assert torch.equal(merger.model(tokens).logits, on_disk(tokens).logits)


def test_a_layer_taken_twice_shares_its_tensors(zoo):
    base, experts = zoo_models(zoo, "float32")
    merger = resident_merger(base, experts, torch.float32)
    config = path_config([Step(1, 0), Step(1, 1), Step(1, 0), Step(1, 1, 0.5)], [base, *experts], "float32")
    merger.merge(MergeConfig.model_validate(config))
    layers = merger.model.model.layers
    first, again, scaled = layers[0], layers[2], layers[3]
    assert first.self_attn.q_proj.weight is again.self_attn.q_proj.weight
    assert first is not again and (first.self_attn.layer_idx, again.self_attn.layer_idx) == (0, 2)
    expert_layer = merger.modules[experts[0]]["model.layers.1"]
    assert scaled.mlp.up_proj.weight is expert_layer.mlp.up_proj.weight
    assert torch.equal(scaled.mlp.down_proj.weight, expert_layer.mlp.down_proj.weight * 0.5)
    assert expert_layer.self_attn.layer_idx == 1  # the source is untouched


def test_in_memory_tied_path_generates(tied_zoo):
    """Generation (the KV cache) runs through a path that repeats a layer."""
    merger = resident_merger(tied_zoo["base"], [tied_zoo["a"]], torch.float32)
    config = path_config(
        [Step(1, 0), Step(0, 1), Step(0, 1), Step(0, 2), Step(0, 3)], [tied_zoo["base"], tied_zoo["a"]], "float32"
    )
    merger.merge(MergeConfig.model_validate(config))
    model = merger.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight is merger.modules[tied_zoo["a"]]["model.embed_tokens"].weight
    tokens = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        cached = model.generate(tokens, max_new_tokens=4, do_sample=False, pad_token_id=3)
        uncached = model.generate(tokens, max_new_tokens=4, do_sample=False, pad_token_id=3, use_cache=False)
    assert torch.equal(cached, uncached)


def _depth(config: dict) -> int:
    return sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in config["slices"])
