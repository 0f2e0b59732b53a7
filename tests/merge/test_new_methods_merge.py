"""`evomerge merge` of the geometric and element-selecting methods against `mergekit-yaml` 0.1.5.

Each case is a mergekit YAML over the tiny zoo (and over a tied-embedding copy of it, whose
checkpoints hold no lm_head); both tools merge it and every tensor must carry the same bits, with
the dtype mergekit writes (float32 for Arcee Fusion and RAM+ from bfloat16 sources). The bfloat16
cases are held to the same bits too, stricter than the one-bf16-step rule of the task-vector
methods: these methods' arithmetic is mergekit's operation for operation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mergekit_equality import compare_with_mergekit
from safetensors.torch import load_file, save_file

from evomerge.merge.config import load_merge_config
from evomerge.merge.engine import merge_to_disk

pytest.importorskip("mergekit")

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _models(zoo, dtype: str, names_and_params: list[tuple[str, dict]]) -> list[dict]:
    return [
        {"model": zoo.model(name, dtype), **({"parameters": params} if params else {})}
        for name, params in names_and_params
    ]


def _config(zoo, dtype, method, models, parameters=None, base=True) -> dict:
    config: dict = {"merge_method": method}
    if base:
        config["base_model"] = zoo.model("base", dtype)
    config["models"] = _models(zoo, dtype, models)
    if parameters:
        config["parameters"] = parameters
    config["dtype"] = DTYPES[dtype]
    return config


# Each case: method -> (the config's models with their parameters, global parameters, with a base).
CASES = {
    "model_stock": ([("ft_a", {}), ("ft_b", {}), ("ft_c", {})], {}, True),
    "model_stock-filter_wise": ([("ft_a", {}), ("ft_b", {})], {"filter_wise": True}, True),
    "nuslerp": ([("ft_a", {"weight": 0.3}), ("ft_b", {"weight": 0.9})], {}, True),
    "nuslerp-row_wise-no_base": (
        [("ft_a", {"weight": 0.6}), ("ft_b", {"weight": 0.4})],
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        False,
    ),
    "multislerp": ([("ft_a", {"weight": 0.5}), ("ft_b", {"weight": 0.2})], {}, True),
    "multislerp-no_base": (
        [("ft_a", {"weight": 0.5}), ("ft_b", {"weight": 0.2}), ("ft_c", {"weight": 0.7})],
        {"normalize_weights": False},
        False,
    ),
    "karcher": ([("ft_a", {}), ("ft_b", {})], {}, True),
    "karcher-no_base": ([("ft_a", {}), ("ft_b", {}), ("ft_c", {})], {"max_iter": 3, "tol": 1e-4}, False),
    "sce": ([("ft_a", {}), ("ft_b", {}), ("ft_c", {})], {"select_topk": 0.5}, True),
    "sce-int8_mask": ([("ft_a", {}), ("ft_b", {})], {"int8_mask": True}, True),
    "nearswap": ([("ft_a", {})], {"t": 0.001}, True),
    "arcee_fusion": ([("ft_b", {})], {}, True),
    "ram": ([("ft_a", {}), ("ft_b", {}), ("ft_c", {})], {"epsilon": 1e-4}, True),
    "ramplus_tl": ([("ft_a", {}), ("ft_b", {}), ("ft_c", {})], {"r": 0.3, "alpha": 0.5}, True),
    "passthrough": ([("ft_a", {"scale": 0.37})], {}, False),
}


def case_config(zoo, case: str, dtype: str) -> dict:
    models, parameters, base = CASES[case]
    return _config(zoo, dtype, case.split("-")[0], models, parameters, base)


class TiedZoo:
    """The zoo's checkpoints with tied embeddings: no lm_head.weight, tie_word_embeddings true."""

    def __init__(self, zoo, root: Path):
        self.zoo, self.root = zoo, root

    def model(self, name: str, dtype: str = "fp32") -> str:
        target = self.root / f"{name}_{dtype}"
        if not target.exists():
            shutil.copytree(self.zoo.model(name, dtype), target)
            for shard in target.glob("*.safetensors"):
                tensors = load_file(shard)
                tensors.pop("lm_head.weight", None)
                save_file(tensors, shard, metadata={"format": "pt"})
            config = json.loads((target / "config.json").read_text())
            config["tie_word_embeddings"] = True
            (target / "config.json").write_text(json.dumps(config))
        return str(target)


@pytest.fixture(scope="session")
def tied_zoo(zoo, tmp_path_factory):
    return TiedZoo(zoo, tmp_path_factory.mktemp("tied_zoo"))


def _assert_equal_to_mergekit(config: dict, write_config, tmp_path):
    report = compare_with_mergekit(write_config(config), tmp_path)
    report.assert_bit_for_bit()
    return report


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_mergekit_yaml(zoo, write_config, tmp_path, case, dtype):
    _assert_equal_to_mergekit(case_config(zoo, case, dtype), write_config, tmp_path)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", ["model_stock", "nuslerp", "sce", "arcee_fusion", "ramplus_tl", "karcher"])
def test_tied_embeddings_merge_equals_mergekit_yaml(tied_zoo, write_config, tmp_path, case, dtype):
    report = _assert_equal_to_mergekit(case_config(tied_zoo, case, dtype), write_config, tmp_path)
    assert "lm_head.weight" not in report.tensors


@pytest.mark.parametrize("method", ["arcee_fusion", "ramplus_tl"])
def test_bf16_sources_give_the_float32_files_mergekit_writes(zoo, tmp_path, write_config, method):
    from tiny_models import load_checkpoint_tensors

    models, parameters, _ = CASES[method]
    config = _config(zoo, "bf16", method, models, parameters)
    merge_to_disk(load_merge_config(write_config(config)), tmp_path / "out", progress=False)
    assert {t.dtype for t in load_checkpoint_tensors(tmp_path / "out").values()} == {torch.float32}
    config["out_dtype"] = "bfloat16"
    merge_to_disk(load_merge_config(write_config(config)), tmp_path / "out16", progress=False)
    assert {t.dtype for t in load_checkpoint_tensors(tmp_path / "out16").values()} == {torch.bfloat16}


def test_slices_of_a_new_method_equal_mergekit(zoo, write_config, tmp_path):
    def src(name, start, stop):
        return {"model": zoo.model(name), "layer_range": [start, stop]}

    config = {
        "merge_method": "sce",
        "base_model": zoo.model("base"),
        "dtype": "float32",
        "slices": [
            {"sources": [src("ft_a", 0, 2), src("ft_b", 0, 2), src("base", 0, 2)], "parameters": {"select_topk": 0.3}},
            {
                "sources": [src("ft_c", 2, 4), src("ft_a", 2, 4), src("base", 2, 4)],
                "parameters": {"select_topk": [0.2, 0.9]},
            },
        ],
    }
    _assert_equal_to_mergekit(config, write_config, tmp_path)


@pytest.mark.parametrize(
    "case", ["model_stock", "nuslerp", "multislerp-no_base", "karcher", "sce", "arcee_fusion", "ram"]
)
def test_in_memory_merge_equals_disk_merge(zoo, write_config, tmp_path, case):
    """What a search worker merges into its resident model is what `evomerge merge` writes."""
    from tiny_models import load_checkpoint_tensors
    from transformers import AutoModelForCausalLM

    from evomerge.merge.resident import ResidentSources, merge_into_model

    config = load_merge_config(write_config(case_config(zoo, case, "fp32")))
    merge_to_disk(config, tmp_path / "out", progress=False, seed=7)
    on_disk = load_checkpoint_tensors(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(zoo.model("base"), dtype=torch.float32)
    merge_into_model(model, ResidentSources.load(config, device="cpu"), config, seed=7)
    resident = model.state_dict()
    assert on_disk.keys() <= resident.keys()
    assert [name for name in on_disk if not torch.equal(resident[name], on_disk[name])] == []
