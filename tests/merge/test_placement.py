"""Multi-device workers on CPU: k simulated devices ("cpu" k times) take the code path of k GPUs.

The layer cut (`placement.split_layers`), the per-device fused merge (one `FusedSources` per device,
under Triton's interpreter), the reference path's per-device sources, and the forward across the
devices (accelerate's hooks) are checked against one device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fused_merge import DEVICE, assert_same_weights, gradient_candidate, merged_by_reference, union

from evomerge.merge.config import MergeConfig
from evomerge.merge.io import ModelFolder, TensorInfo, inspect_model_folder
from evomerge.merge.placement import EMBED, HEAD, contiguous_cut, place_model, split_layers, unit_of
from evomerge.merge.resident import write_merge
from evomerge.merge.validate import validate_merge_config

EXPERTS = ("ft_a", "ft_b", "ft_c")
# Three simulated GPUs: "cpu" three times here; on a GPU machine its one GPU three times.
DEVICES = (DEVICE,) * 3


def load_model(path: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def test_units_follow_hugging_face_module_order():
    assert unit_of("model.embed_tokens.weight") == EMBED
    assert unit_of("model.layers.7.mlp.up_proj.weight") == 7
    assert unit_of("model.norm.weight") == HEAD and unit_of("lm_head.weight") == HEAD


@pytest.mark.parametrize(
    ("weights", "parts", "expected_max"),
    [([5, 1, 1, 1, 1, 1, 1, 5], 3, 6), ([1] * 10, 4, 3), ([9, 1, 1], 3, 9), ([2, 2], 4, 2)],
)
def test_contiguous_cut_is_contiguous_balanced_and_uses_every_part(weights, parts, expected_max):
    cut = contiguous_cut(weights, parts)
    assert cut == sorted(cut) and cut[0] == 0, "runs are contiguous and in device order"
    loads = [sum(w for w, p in zip(weights, cut, strict=True) if p == part) for part in set(cut)]
    assert max(loads) == expected_max
    assert len(set(cut)) == min(parts, len(weights)), "no device left idle while there are units to give it"


def test_an_80_layer_model_splits_evenly_by_bytes():
    shapes = {"model.embed_tokens.weight": (32000, 8192), "lm_head.weight": (32000, 8192), "model.norm.weight": (8192,)}
    for layer in range(80):
        shapes[f"model.layers.{layer}.mlp.down_proj.weight"] = (8192, 28672)
    folder = ModelFolder(
        path=None, config={}, tensors={n: TensorInfo(s, torch.bfloat16, None) for n, s in shapes.items()}
    )
    split = split_layers(folder, [f"cuda:{i}" for i in range(8)])
    layers_per_device = np.bincount([split.part_of(f"model.layers.{i}.mlp.down_proj.weight") for i in range(80)])
    assert len(layers_per_device) == 8 and layers_per_device.min() >= 9, "every GPU gets its share of layers"
    assert split.device_of("model.embed_tokens.weight") == "cuda:0" and split.device_of("lm_head.weight") == "cuda:7"


def test_split_forward_equals_one_device(zoo):
    base = zoo.model("base")
    validated = validate_merge_config(union(base, [zoo.model(n) for n in EXPERTS], "float32"))
    model, split = place_model(load_model(base), validated, DEVICES)
    assert split is not None and len({split.part_of(p.output) for p in validated.plan.tensors}) == 3
    assert any(hasattr(module, "_hf_hook") for module in model.modules()), "the cross-device hooks are installed"
    tokens = torch.tensor([[1, 5, 9, 12, 3, 7]])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, load_model(base).to(DEVICE)(tokens.to(DEVICE)).logits)


def test_the_reference_path_reads_each_input_onto_its_layers_device(zoo):
    from evomerge.merge.fused.candidate import split_reference_sources

    base, experts = zoo.model("base"), [zoo.model(n) for n in EXPERTS]
    sources = union(base, experts, "float32")
    split = split_layers(inspect_model_folder(base, "base"), DEVICES)
    resident = split_reference_sources(sources, split)
    assert {(m, n) for m, n in resident.tensors} == {
        (p, n) for p in (base, *experts) for n in load_model(base).state_dict()
    }
    model, _ = place_model(load_model(base), validate_merge_config(sources), DEVICES)
    candidate = gradient_candidate(base, experts, "ties", "float32")
    write_merge(model, resident, resident.plan_for(candidate))
    expected = merged_by_reference(base, sources, candidate, torch.float32)
    got = dict(model.named_parameters())
    assert all(torch.equal(got[name], expected[name]) for name in expected)


@pytest.mark.parametrize("placement", ["device", "host"])
def test_fused_merge_split_over_simulated_devices_equals_one_device(zoo, placement):
    pytest.importorskip("triton")
    from evomerge.merge.fused.candidate import CandidateMerger

    base, experts = zoo.model("base", "bf16"), [zoo.model(n, "bf16") for n in EXPERTS]
    sources = union(base, experts, "bfloat16")
    model, split = place_model(load_model(base, torch.bfloat16), validate_merge_config(sources), DEVICES)
    merger = CandidateMerger.create(
        model, sources, "ties", DEVICES, placement, split=split, shared_host=False, interpreter_ok=True
    )
    assert merger.path == "fused" and len(merger.parts) == 3
    names = [set(part.sources.layout.names) for part in merger.parts]
    assert sum(map(len, names)) == len(set().union(*names)) == len(dict(model.named_parameters()))
    for config in (gradient_candidate(base, experts, "ties", "bfloat16"), _one_density(base, experts, 0.3)):
        merger.merge(config)
        assert merger.path == "fused" and merger.verified
        assert_same_weights(merger, merged_by_reference(base, sources, config, torch.bfloat16))
    assert merger.first_non_finite() is None


def _one_density(base: str, experts: list[str], density: float) -> MergeConfig:
    return MergeConfig.model_validate(
        {
            "merge_method": "ties",
            "base_model": base,
            "dtype": "bfloat16",
            "models": [
                {"model": p, "parameters": {"weight": 0.4 + i / 5, "density": density}} for i, p in enumerate(experts)
            ],
        }
    )
