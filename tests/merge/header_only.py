"""Model folders whose weights are holes: a real safetensors header, then `truncate -s` to full size.

`evomerge validate` reads only headers and config.json, so 7B and 70B plans run on a laptop over
these folders; the files take a few kilobytes of disk whatever their size.
"""

from __future__ import annotations

import json
import os
import struct
from math import prod
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

MISTRAL_7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
)
LLAMA_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=32000,
)


def llama_shapes(shape: dict) -> tuple[LlamaConfig, dict[str, tuple[int, ...]]]:
    config = LlamaConfig(**shape, tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    with torch.device("meta"):
        tensors = LlamaForCausalLM(config).state_dict()
    return config, {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def write_header_only_model(folder: Path, shape: dict, name: str, tokenizer) -> Path:
    """A bf16 Llama folder of the given shape: config, tokenizer, one sparse safetensors file.

    `name` goes into the header's metadata, so the folders' fingerprints differ as real fine-tunes' do.
    """
    config, shapes = llama_shapes(shape)
    folder.mkdir(parents=True, exist_ok=True)
    header: dict = {"__metadata__": {"format": "pt", "model": name}}
    offset = 0
    for tensor, tensor_shape in sorted(shapes.items()):
        size = prod(tensor_shape) * 2
        header[tensor] = {"dtype": "BF16", "shape": list(tensor_shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = folder / "model.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + offset)  # `truncate -s`: the data is a hole, no disk used
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
