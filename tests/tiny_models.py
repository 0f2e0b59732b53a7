"""Builders for tiny, deterministic Llama checkpoints used as merge inputs in tests.

A "zoo" is one base model plus several fine-tunes made by adding seeded deltas to
the base, saved in fp32 and bf16 with the same word-level tokenizer, plus a few
deliberately incompatible or broken checkpoints for the error tests.  Both
evomerge and mergekit read these directories, so each one carries a tokenizer.
"""

from __future__ import annotations

import copy
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
BASE_VOCAB = 64
BASE_HIDDEN = 32
NUM_LAYERS = 4

# (name, seed, scale): scales differ by 5x so weighted deltas have mixed magnitudes.
FINETUNES = (("ft_a", 11, 0.02), ("ft_b", 12, 0.05), ("ft_c", 13, 0.01))
# Fraction of each fine-tune's delta that is exactly zero, so TIES sign election
# sees zero votes and, where every model is zero, a zero divisor.
ZERO_FRACTION = 0.2
# Tensors no fine-tune touches: every delta is exactly zero there.
UNTOUCHED_SUFFIXES = ("layers.0.post_attention_layernorm.weight",)
# Grid (in steps per unit) of the region where two fine-tunes' deltas cancel exactly.
MIRROR_GRID = 2**12


@dataclass(frozen=True)
class TinyZoo:
    """Paths of the checkpoints one test session builds."""

    root: Path

    def model(self, name: str, dtype: str = "fp32") -> str:
        """Path of checkpoint `name` ('base', 'ft_a', ...) saved in `dtype` ('fp32'/'bf16')."""
        return str(self.root / f"{name}_{dtype}")

    @property
    def wide(self) -> str:
        """A Llama whose hidden size differs from the base (shape mismatch)."""
        return str(self.root / "wide_fp32")

    @property
    def big_vocab(self) -> str:
        """A Llama whose vocabulary is larger than the base's."""
        return str(self.root / "bigvocab_fp32")

    @property
    def corrupt(self) -> str:
        """Valid config.json, tokenizer and safetensors header, but truncated tensor data."""
        return str(self.root / "corrupt_fp32")


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary has exactly `vocab_size` entries."""
    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def tiny_llama_config(vocab_size: int = BASE_VOCAB, hidden_size: int = BASE_HIDDEN) -> LlamaConfig:
    """Llama config small enough that a merge runs in well under a second."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def build_base(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A randomly initialised model; the seed makes it identical across runs."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Norm weights start as exact ones; jitter them so deltas on them are not degenerate.
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight"):
                tensor.add_(0.1 * torch.randn_like(tensor))
    return model.eval()


def leading_region(flat: torch.Tensor, cols: int, index: int) -> torch.Tensor:
    """View of row `index` of a 2-D-or-more tensor, or of a short stretch of a 1-D one."""
    width = cols if flat.numel() > cols else max(1, cols // 8)
    return flat[index * width : (index + 1) * width]


def finetune_delta(shape: torch.Size, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Seeded delta with mixed signs, per-tensor magnitude, and exact zeros."""
    tensor_scale = scale * (0.25 + 1.5 * torch.rand((), generator=generator))
    delta = tensor_scale * torch.randn(shape, generator=generator)
    delta = delta * (torch.rand(shape, generator=generator) >= ZERO_FRACTION)
    # Region 0 is zero in every fine-tune: all-zero sign votes and a zero TIES divisor.
    leading_region(delta.view(-1), shape[-1], 0).zero_()
    return delta


def finetune_deltas(base: LlamaForCausalLM, seed: int, scale: float) -> dict[str, torch.Tensor]:
    """Deltas for every tensor a fine-tune changes (all but UNTOUCHED_SUFFIXES)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: finetune_delta(tensor.shape, scale, generator)
        for name, tensor in base.named_parameters()
        if not name.endswith(UNTOUCHED_SUFFIXES)
    }


def mirror_regions(base: LlamaForCausalLM, deltas: list[dict[str, torch.Tensor]]) -> None:
    """Make region 1 an exact sign tie: fine-tune 2's delta is minus fine-tune 1's, others zero.

    Base and deltas there sit on a 2**-12 grid, so `ft - base` recovers each delta exactly in
    fp32 and equal weights give a weighted delta sum of exactly 0 (TIES elects '+' on a tie).
    """
    with torch.no_grad():
        for name, tensor in base.named_parameters():
            if name not in deltas[0]:
                continue
            cols = tensor.shape[-1]
            base_region = leading_region(tensor.view(-1), cols, 1)
            base_region.copy_(torch.round(base_region * MIRROR_GRID) / MIRROR_GRID)
            first = leading_region(deltas[0][name].view(-1), cols, 1)
            first.copy_(torch.round(first * MIRROR_GRID) / MIRROR_GRID)
            leading_region(deltas[1][name].view(-1), cols, 1).copy_(-first)
            for other in deltas[2:]:
                leading_region(other[name].view(-1), cols, 1).zero_()


def with_deltas(base: LlamaForCausalLM, deltas: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """Copy of `base` with `deltas` added."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name in deltas:
                tensor.add_(deltas[name])
    return model.eval()


def save_checkpoint(model: LlamaForCausalLM, tokenizer, path: Path, dtype: torch.dtype) -> None:
    """Save weights (in `dtype`), config and tokenizer the way a hub checkpoint looks."""
    # A copy, so saving in bf16 does not round the caller's fp32 weights.
    copy.deepcopy(model).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_corrupt_checkpoint(good_dir: Path, path: Path) -> None:
    """Copy of `good_dir` whose safetensors header is intact but whose tensor data is cut off.

    Anything that only reads config.json or the header succeeds; reading any weight fails,
    which is how the error tests prove validation happens before weights are read.
    """
    shutil.copytree(good_dir, path, dirs_exist_ok=True)
    weights = path / "model.safetensors"
    raw = weights.read_bytes()
    header_length = struct.unpack("<Q", raw[:8])[0]
    weights.write_bytes(raw[: 8 + header_length] + b"garbage")


def build_zoo(root: Path) -> TinyZoo:
    """Build every checkpoint the merge tests use under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(BASE_VOCAB)
    base = build_base(tiny_llama_config(), seed=0)
    deltas = [finetune_deltas(base, seed, scale) for _, seed, scale in FINETUNES]
    mirror_regions(base, deltas)
    members = {"base": base}
    members.update({name: with_deltas(base, delta) for (name, _, _), delta in zip(FINETUNES, deltas, strict=False)})
    for name, model in members.items():
        save_checkpoint(model, tokenizer, root / f"{name}_fp32", torch.float32)
        save_checkpoint(model, tokenizer, root / f"{name}_bf16", torch.bfloat16)
    wide = build_base(tiny_llama_config(hidden_size=48), seed=1)
    save_checkpoint(wide, tokenizer, root / "wide_fp32", torch.float32)
    big_vocab = build_base(tiny_llama_config(vocab_size=BASE_VOCAB + 16), seed=2)
    save_checkpoint(big_vocab, build_tokenizer(BASE_VOCAB + 16), root / "bigvocab_fp32", torch.float32)
    write_corrupt_checkpoint(root / "base_fp32", root / "corrupt_fp32")
    return TinyZoo(root)


def load_checkpoint_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, by name."""
    shards = sorted(Path(folder).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(shard))
    return tensors
