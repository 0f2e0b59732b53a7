"""Direct tests of model-folder I/O (`evomerge.merge.io`): headers, lazy reads, streaming shards.

safetensors' own loader is the oracle: whatever evomerge writes must load back bit for bit with it,
and whatever it writes must be what `from_pretrained` finds (one file, or shards plus an index).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.errors import UserError
from evomerge.merge.io import (
    LazyTensorReader,
    StreamingShardWriter,
    inspect_model_folder,
    read_safetensors_header,
)


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=generator),
        "b.weight": torch.randn(16, generator=generator).to(torch.bfloat16),
        "c.bias": torch.randn(3, 5, generator=generator).to(torch.float16),
    }


def write_streaming(out_dir, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> StreamingShardWriter:
    outputs = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = StreamingShardWriter(out_dir, outputs, max_shard_bytes=max_shard_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    return writer


def loaded(out_dir) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out_dir.glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


def test_one_shard_round_trips_through_safetensors(tmp_path):
    tensors = sample_tensors()
    writer = write_streaming(tmp_path, tensors, max_shard_bytes=1 << 20)
    assert writer.file_names == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    back = loaded(tmp_path)
    assert all(back[name].dtype == t.dtype and torch.equal(back[name], t) for name, t in tensors.items())


def test_shards_split_by_size_and_the_index_maps_every_tensor(tmp_path):
    tensors = sample_tensors()
    # a.weight (128 bytes) overflows a 64-byte shard alone; b (32) and c (30) share the next one.
    writer = write_streaming(tmp_path, tensors, max_shard_bytes=64)
    assert writer.file_names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = loaded(tmp_path)
    assert all(torch.equal(back[name], t) for name, t in tensors.items())


def test_the_writer_refuses_tensors_out_of_order_and_an_early_close(tmp_path):
    tensors = sample_tensors()
    outputs = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = StreamingShardWriter(tmp_path, outputs)
    with pytest.raises(RuntimeError, match="expected a.weight"):
        writer.write("b.weight", tensors["b.weight"])
    writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(RuntimeError, match="closed after 1 of 3 tensors"):
        writer.close()


def test_headers_and_lazy_reads_match_the_file(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    header = read_safetensors_header(tmp_path / "model.safetensors")
    assert {name: (info.shape, info.dtype) for name, info in header.items()} == {
        name: (tuple(t.shape), t.dtype) for name, t in tensors.items()
    }
    folder = inspect_model_folder(tmp_path, "models.base")
    assert folder.num_layers == 2
    reader = LazyTensorReader(folder)
    assert all(torch.equal(reader.read(name), t) for name, t in tensors.items())


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\x01\x02", "too short"), (b"\xff" * 16, "bad header length"), (b"\x04" + b"\0" * 7 + b"{{{{", "unreadable")],
)
def test_a_damaged_safetensors_header_is_one_user_error(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_safetensors_header(path)


def test_a_folder_without_config_or_weights_names_the_field(tmp_path):
    with pytest.raises(UserError, match=r"^models.experts\[0\]: '.*' has no config.json"):
        inspect_model_folder(tmp_path, "models.experts[0]")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has no .safetensors weights"):
        inspect_model_folder(tmp_path, "models.base")
    with pytest.raises(UserError, match="does not exist"):
        inspect_model_folder(tmp_path / "missing", "models.base")
