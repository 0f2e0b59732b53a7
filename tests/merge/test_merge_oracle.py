"""Proves `evomerge merge` writes the same checkpoint as mergekit 0.1.5 for deterministic methods.

Each case is a mergekit YAML over the tiny zoo; both tools merge it into their own folder and
every tensor is compared: fp32 to a relative 1e-5 of the tensor's scale, bf16 to one ulp of
mergekit's value. Also checks that merging into a resident model equals merging to disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import TinyZoo, load_checkpoint_tensors

FP32_RELATIVE_TOLERANCE = 1e-5
FILTERED_WEIGHT = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]
ATTENTION_MLP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def entry(zoo: TinyZoo, name: str, dtype: str = "fp32", **parameters) -> dict:
    """A `models:` entry for zoo member `name`."""
    item = {"model": zoo.model(name, dtype)}
    return {**item, "parameters": parameters} if parameters else item


def source(zoo: TinyZoo, name: str, start: int, stop: int, dtype: str = "fp32", **parameters) -> dict:
    """A `slices: - sources:` entry taking layers [start, stop) of zoo member `name`."""
    return {**entry(zoo, name, dtype, **parameters), "layer_range": [start, stop]}


ORACLE_CASES = {
    "linear-gradients-fp32": lambda z: {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [
            entry(z, "ft_a", weight=[1.0, 0.2, 0.6]),
            entry(z, "ft_b", weight=[0.1, 0.9]),
            entry(z, "ft_c", weight=0.5),
        ],
    },
    "linear-filters-unnormalized-bf16": lambda z: {
        "merge_method": "linear",
        "dtype": "bfloat16",
        "parameters": {"normalize": False},
        "models": [
            entry(z, "ft_a", "bf16", weight=FILTERED_WEIGHT),
            entry(z, "ft_b", "bf16", weight=[{"filter": "mlp", "value": [0.1, 0.4]}, {"value": 0.5}]),
        ],
    },
    "linear-tokenizer-base-bf16-inputs-fp32-math": lambda z: {
        "merge_method": "linear",
        "base_model": z.model("base", "bf16"),
        "dtype": "float32",
        "tokenizer_source": "base",
        "models": [
            entry(z, "base", "bf16", weight=0.2),
            entry(z, "ft_a", "bf16", weight=0.5),
            entry(z, "ft_c", "bf16", weight=0.3),
        ],
    },
    "task-arithmetic-lambda-normalize": lambda z: {
        "merge_method": "task_arithmetic",
        "base_model": z.model("base"),
        "dtype": "float32",
        "parameters": {"normalize": True, "lambda": 0.7},
        "models": [entry(z, "ft_a", weight=[0.2, 1.0]), entry(z, "ft_b", weight=FILTERED_WEIGHT)],
    },
    "task-arithmetic-bf16-out-fp32": lambda z: {
        "merge_method": "task_arithmetic",
        "base_model": z.model("base", "bf16"),
        "dtype": "bfloat16",
        "out_dtype": "float32",
        "models": [
            entry(z, "ft_a", "bf16", weight=0.6),
            entry(z, "ft_b", "bf16", weight=0.4),
            entry(z, "ft_c", "bf16", weight=-0.3),
        ],
    },
    # TIES cases whose trim cuts through equal magnitudes ("ties-gradients-fp32", "ties-bf16-equal-weights")
    # are compared in test_tie_rule.py, element by element at and away from those magnitudes.
    "ties-global-params-unnormalized-lambda": lambda z: {
        "merge_method": "ties",
        "base_model": z.model("base"),
        "dtype": "float32",
        "parameters": {"density": 0.6, "weight": 0.3, "normalize": False, "lambda": 1.3},
        "models": [entry(z, "ft_a", weight=0.9), entry(z, "ft_b"), entry(z, "ft_c")],
    },
    # ft_a and ft_b cancel exactly in the zoo's mirror region: equal weights make the sign vote a tie.
    "ties-exact-sign-ties-fp32": lambda z: {
        "merge_method": "ties",
        "base_model": z.model("base"),
        "dtype": "float32",
        "models": [
            entry(z, "ft_a", weight=0.5, density=0.9),
            entry(z, "ft_b", weight=0.5, density=0.9),
            entry(z, "ft_c", weight=0.5, density=0.6),
        ],
    },
    "ties-fp32-math-out-bf16": lambda z: {
        "merge_method": "ties",
        "base_model": z.model("base"),
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "models": [entry(z, "ft_a", weight=1.0, density=0.3), entry(z, "ft_b", weight=0.6, density=0.8)],
    },
    "breadcrumbs-fp32": lambda z: {
        "merge_method": "breadcrumbs",
        "base_model": z.model("base"),
        "dtype": "float32",
        "models": [
            entry(z, "ft_a", weight=0.7, density=0.8, gamma=0.05),
            entry(z, "ft_b", weight=0.4, density=[0.6, 0.9], gamma=0.02),
        ],
    },
    "breadcrumbs-ties-bf16-math": lambda z: {
        "merge_method": "breadcrumbs_ties",
        "base_model": z.model("base"),
        "dtype": "bfloat16",
        "parameters": {"normalize": True},
        "models": [
            entry(z, "ft_a", weight=0.5, density=0.7, gamma=[{"filter": "mlp", "value": 0.1}, {"value": 0.01}]),
            entry(z, "ft_b", weight=0.5, density=0.6),
            entry(z, "ft_c", weight=0.3, density=0.9, gamma=0.0),
        ],
    },
    "slerp-filter-gradients": lambda z: {
        "merge_method": "slerp",
        "base_model": z.model("base"),
        "dtype": "float32",
        "parameters": {"t": ATTENTION_MLP_T},
        "models": [entry(z, "base"), entry(z, "ft_a")],
    },
    "slerp-bf16": lambda z: {
        "merge_method": "slerp",
        "base_model": z.model("base", "bf16"),
        "dtype": "bfloat16",
        "parameters": {"t": [0.1, 0.9]},
        "models": [entry(z, "base", "bf16"), entry(z, "ft_b", "bf16")],
    },
    "slices-subrange-linear": lambda z: {
        "merge_method": "linear",
        "dtype": "float32",
        "slices": [{"sources": [source(z, "ft_a", 1, 3, weight=0.3), source(z, "ft_b", 1, 3, weight=0.7)]}],
    },
    "slices-stacked-linear": lambda z: {
        "merge_method": "linear",
        "dtype": "float32",
        "slices": [
            {"sources": [source(z, "ft_a", 0, 2, weight=0.5), source(z, "ft_b", 0, 2, weight=0.5)]},
            {
                "sources": [source(z, "ft_b", 2, 4), source(z, "ft_c", 1, 3, weight=0.4)],
                "parameters": {"weight": [0.2, 0.8]},
            },
            {"sources": [source(z, "ft_a", 0, 2, weight=[1, 0]), source(z, "ft_c", 0, 2, weight=[0, 1])]},
        ],
    },
    "slices-ties-slice-and-source-params": lambda z: {
        "merge_method": "ties",
        "base_model": z.model("base"),
        "dtype": "float32",
        "parameters": {"density": 0.8},
        "slices": [
            {
                "sources": [
                    source(z, "base", 0, 2),
                    source(z, "ft_a", 0, 2, weight=0.6, density=0.5),
                    source(z, "ft_b", 0, 2, weight=0.4, density=[0.3, 0.9]),
                ]
            },
            {
                "sources": [
                    source(z, "base", 2, 4),
                    source(z, "ft_a", 2, 4, weight=1.0),
                    source(z, "ft_c", 1, 3, weight=0.5),
                ],
                "parameters": {"normalize": False, "density": 0.4},
            },
        ],
    },
    "slerp-slices-stacked": lambda z: {
        "merge_method": "slerp",
        "base_model": z.model("base"),
        "dtype": "float32",
        "slices": [
            {"sources": [source(z, "base", 0, 4), source(z, "ft_b", 0, 4)], "parameters": {"t": [0, 1]}},
            {"sources": [source(z, "base", 2, 4), source(z, "ft_b", 2, 4)], "parameters": {"t": 0.3}},
        ],
    },
}


def bf16_ulp(reference: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |reference| (as float64), never below bf16's smallest normal."""
    magnitude = reference.to(torch.bfloat16).abs()
    above = torch.nextafter(magnitude, torch.full_like(magnitude, float("inf")))
    return (above.double() - magnitude.double()).clamp_min(torch.finfo(torch.bfloat16).tiny)


def mismatch_score(ours: torch.Tensor, theirs: torch.Tensor, bf16_math: bool) -> float:
    """How far `ours` is from mergekit's `theirs`, in units of the allowed error (<= 1 passes)."""
    difference = (ours.double() - theirs.double()).abs()
    if bf16_math or theirs.dtype == torch.bfloat16:
        return float((difference / bf16_ulp(theirs)).max())
    scale = max(float(theirs.double().abs().max()), 1e-30)
    return float(difference.max()) / scale / FP32_RELATIVE_TOLERANCE


def assert_same_tensors(ours_dir: Path, theirs_dir: Path, bf16_math: bool) -> None:
    """Same names, shapes, dtypes, and values within tolerance; names the worst tensor if not."""
    ours, theirs = load_checkpoint_tensors(ours_dir), load_checkpoint_tensors(theirs_dir)
    assert sorted(ours) == sorted(theirs), (
        f"only in evomerge: {sorted(set(ours) - set(theirs))}; only in mergekit: {sorted(set(theirs) - set(ours))}"
    )
    for name in theirs:
        assert ours[name].shape == theirs[name].shape, f"{name}: shape {ours[name].shape} vs {theirs[name].shape}"
        assert ours[name].dtype == theirs[name].dtype, f"{name}: dtype {ours[name].dtype} vs {theirs[name].dtype}"
    scores = {name: mismatch_score(ours[name], theirs[name], bf16_math) for name in theirs}
    worst = max(scores, key=scores.get)
    difference = (ours[worst].double() - theirs[worst].double()).abs()
    assert scores[worst] <= 1.0, (
        f"worst tensor {worst}: {scores[worst]:.3g}x the tolerance "
        f"({'1 bf16 ulp' if bf16_math else f'{FP32_RELATIVE_TOLERANCE} relative'}); "
        f"max |diff| {float(difference.max()):.3g} at flat index {int(difference.argmax())}, "
        f"{int((difference > 0).sum())}/{difference.numel()} elements differ"
    )


def assert_same_model_config(ours_dir: Path, theirs_dir: Path) -> None:
    ours = json.loads((ours_dir / "config.json").read_text())
    theirs = json.loads((theirs_dir / "config.json").read_text())
    for key in ("architectures", "num_hidden_layers", "hidden_size", "vocab_size"):
        assert ours.get(key) == theirs.get(key), f"config.json {key}: {ours.get(key)} vs mergekit {theirs.get(key)}"


def assert_same_tokenizer(ours_dir: Path, theirs_dir: Path) -> None:
    ours = json.loads((ours_dir / "tokenizer.json").read_text())
    theirs = json.loads((theirs_dir / "tokenizer.json").read_text())
    assert ours["model"] == theirs["model"], "tokenizer.json vocabulary differs from mergekit's"


def evomerge_to_disk(config_path: Path, out_dir: Path, seed: int = 0) -> Path:
    from evomerge.merge.config import load_merge_config
    from evomerge.merge.engine import merge_to_disk

    merge_to_disk(load_merge_config(config_path), out_dir, device="cpu", seed=seed)
    return out_dir


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_merge_matches_mergekit(case, zoo, write_config, mergekit_merge, tmp_path):
    config = ORACLE_CASES[case](zoo)
    config_path = write_config(config)
    theirs = mergekit_merge(config_path, tmp_path / "mergekit")
    ours = evomerge_to_disk(config_path, tmp_path / "evomerge")
    assert_same_model_config(ours, theirs)
    assert_same_tensors(ours, theirs, bf16_math=config.get("dtype") == "bfloat16")
    assert_same_tokenizer(ours, theirs)


def test_cli_output_matches_mergekit(zoo, write_config, mergekit_merge, evomerge_cli, tmp_path):
    config_path = write_config(ORACLE_CASES["slices-ties-slice-and-source-params"](zoo))
    theirs = mergekit_merge(config_path, tmp_path / "mergekit")
    finished = evomerge_cli("merge", config_path, tmp_path / "evomerge", "--device", "cpu")
    assert finished.returncode == 0, finished.stderr
    ours = tmp_path / "evomerge"
    assert_same_model_config(ours, theirs)
    assert_same_tensors(ours, theirs, bf16_math=False)
    assert_same_tokenizer(ours, theirs)
    copied = yaml.safe_load((ours / "mergekit_config.yml").read_text())
    assert copied == yaml.safe_load(config_path.read_text())


IN_MEMORY_CASES = {
    "ties-gradients-fp32": lambda z: {
        "merge_method": "ties",
        "base_model": z.model("base"),
        "dtype": "float32",
        "models": [
            entry(z, "ft_a", weight=[0.2, 0.8], density=[0.9, 0.3]),
            entry(z, "ft_b", weight=0.5, density=FILTERED_WEIGHT),
            entry(z, "ft_c", weight=0.4, density=0.5),
        ],
    },
    "dare-ties-seeded": lambda z: {
        "merge_method": "dare_ties",
        "base_model": z.model("base"),
        "dtype": "float32",
        "models": [entry(z, "ft_a", weight=[0.3, 0.9], density=0.5), entry(z, "ft_b", weight=0.6, density=[0.7, 0.2])],
    },
}


def merge_in_memory(config, base_path: str, seed: int, model=None):
    """Merge into a resident transformers model (loading the base when none is given)."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.resident import ResidentSources, merge_into_model

    sources = ResidentSources.load(config, device="cpu")
    model = model or AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merge_into_model(model, sources, config, seed=seed)
    return model


@pytest.mark.parametrize("case", sorted(IN_MEMORY_CASES))
def test_in_memory_merge_equals_disk_merge(case, zoo, write_config, tmp_path):
    from evomerge.merge.config import load_merge_config

    config_path = write_config(IN_MEMORY_CASES[case](zoo))
    config = load_merge_config(config_path)
    on_disk = load_checkpoint_tensors(evomerge_to_disk(config_path, tmp_path / "out", seed=7))
    # Reusing one resident model proves the merge never reads the weights it overwrites.
    other = load_merge_config(write_config(ORACLE_CASES["linear-gradients-fp32"](zoo), "other.yml"))
    model = merge_in_memory(other, zoo.model("base"), seed=3)
    resident = merge_in_memory(config, zoo.model("base"), seed=7, model=model).state_dict()
    base = load_checkpoint_tensors(zoo.model("base"))
    assert sorted(resident) == sorted(on_disk)
    assert any(not torch.equal(on_disk[name], base[name]) for name in on_disk), "merge left the base unchanged"
    different = [name for name in on_disk if not torch.equal(resident[name], on_disk[name])]
    assert not different, f"in-memory merge differs from merge_to_disk in {different[:5]}"
