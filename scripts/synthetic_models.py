"""Synthetic Llama-shaped models for the benchmarks: no download, no training, seeded.

Checkpoints on disk (a random bf16 base and fine-tunes = base + seeded noise, cached per shape),
model folders held only in memory (config and tensor headers, for host-side benchmarks and for
sources generated on the GPU), the union config a search worker keeps resident, and the candidates
a search proposes: seeded points of a layer-group genome, written as `slices:` configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from bench_merge_cpu import build_tokenizer

from evomerge.merge.io import ModelFolder, TensorInfo

SHAPES = {
    "1.5b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "3.6b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=34,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "smoke": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
}
FINETUNE_SCALES = {"ft_a": 0.004, "ft_b": 0.01}
GENOME = {"layer_groups": 4, "split_attn_mlp": True}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1024**3 if device.startswith("cuda") else None


def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SHAPES[size],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
        architectures=["LlamaForCausalLM"],
    )


def build_checkpoints(size: str, root: Path, device: str) -> dict[str, Path]:
    """Random bf16 base + fine-tunes (base + seeded noise), rebuilt only when the shape changes."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    folder = root / size
    paths = {name: folder / name for name in ("base", *FINETUNE_SCALES)}
    stamp, spec = (
        folder / "spec.json",
        json.dumps({"shape": SHAPES[size], "scales": FINETUNE_SCALES, "format": 2}, sort_keys=True),
    )
    if stamp.exists() and stamp.read_text() == spec:
        return paths
    config = llama_config(size)
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator(device=device).manual_seed(0)
    base = {name: _random_weight(name, shape, generator, device) for name, shape in shapes.items()}
    tokenizer = build_tokenizer(config.vocab_size)
    for name, path in paths.items():
        scale = FINETUNE_SCALES.get(name, 0.0)
        tensors = {
            key: (t + scale * torch.randn(t.shape, generator=generator, device=device, dtype=t.dtype)).cpu()
            for key, t in base.items()
        }
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(path)
        tokenizer.save_pretrained(path)
    stamp.write_text(spec)
    return paths


def _random_weight(name: str, shape, generator, device: str) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1 + 0.1 * torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
    return 0.02 * torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)


def candidate_configs(paths: dict[str, Path], method: str, count: int, seed: int) -> list:
    """`count` candidates as a search proposes them: a seeded point of the genome, written as slices."""
    experts = [str(paths[n]) for n in FINETUNE_SCALES]
    return genome_candidates(str(paths["base"]), experts, llama_config_layers(paths["base"]), method, count, seed)


def genome_candidates(base: str, experts: list[str], layers: int, method: str, count: int, seed: int) -> list:
    """`count` merge configs at seeded uniform points (0.05 to 0.95) of the GENOME of `method`."""
    from evomerge.genome import Genome
    from evomerge.spec import Spec

    spec = Spec.model_validate(
        {
            "name": "bench",
            "models": {"base": base, "experts": experts},
            "merge": {"method": method, "dtype": "bfloat16"},
            "genome": GENOME,
            "evaluation": {"tasks": ["none"]},
        }
    )
    genome = Genome(spec, layers)
    rng = np.random.default_rng(seed)
    return [genome.to_merge_config(rng.uniform(0.05, 0.95, genome.dim)) for _ in range(count)]


def in_memory_folders(config, label: str, names) -> dict[str, ModelFolder]:
    """One bf16 ModelFolder per name (config + tensor headers of `config`'s Llama), no files behind them."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    folders = {}
    for name in names:
        path = Path(f"/in-memory/{label}/{name}")
        tensors = {key: TensorInfo(shape, torch.bfloat16, path / "model.safetensors") for key, shape in shapes.items()}
        folders[str(path)] = ModelFolder(path, config.to_dict(), tensors)
    return folders


def llama_config_layers(folder: Path) -> int:
    """The layer count in a checkpoint folder's config.json."""
    return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])


def union_config(paths: dict[str, Path]):
    """Every tensor of every model, as a search worker keeps resident (cf. preflight)."""
    from evomerge.merge.config import MergeConfig

    return MergeConfig.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(paths["base"]),
            "dtype": "bfloat16",
            "models": [{"model": str(paths[n]), "parameters": {"weight": 1.0}} for n in FINETUNE_SCALES],
        }
    )
