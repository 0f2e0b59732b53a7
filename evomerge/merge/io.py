"""Reading and writing model folders: safetensors headers, lazy tensor reads, streamed shards.

Headers are parsed by hand (8-byte length + JSON) so validation can learn every tensor's name,
shape and dtype without opening a single weight. The writer knows every output tensor's shape and
dtype up front, so it writes each shard's header first and then streams tensors one at a time:
peak memory is about one tensor per input, not one shard.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

from evomerge.errors import UserError
from evomerge.files import write_text_atomic
from evomerge.hub import LOCAL_FOLDER_FIX

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
DTYPE_NAMES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | None, field: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPE_NAMES:
        raise UserError(f"{field}: unknown dtype '{name}'; use one of float32, bfloat16, float16")
    return DTYPE_NAMES[name]


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes in one .safetensors file, reading only its header."""
    with open(path, "rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) != 8:
            raise UserError(f"{path}: not a safetensors file (too short); re-save the model")
        (length,) = struct.unpack("<Q", raw_length)
        if length > 100_000_000:
            raise UserError(f"{path}: not a safetensors file (bad header length); re-save the model")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise UserError(f"{path}: unreadable safetensors header; re-save the model") from None
    header.pop("__metadata__", None)
    return {
        name: TensorInfo(tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]], path)
        for name, entry in header.items()
    }


@dataclass(frozen=True)
class ModelFolder:
    """A local Hugging Face model folder: its config.json and the tensors its shards hold."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))


def inspect_model_folder(path: str | Path, field: str) -> ModelFolder:
    """Read config.json and safetensors headers (no weights); a bad folder is a UserError."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"{field}: model folder '{path}' does not exist; {LOCAL_FOLDER_FIX}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{field}: '{path}' has no config.json; give a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except ValueError:
        raise UserError(f"{field}: '{config_file}' is not valid JSON; re-save the model") from None
    if not isinstance(config, dict):
        raise UserError(
            f"{field}: '{config_file}' holds a JSON {type(config).__name__}, not an object; re-save the model"
        )
    shard_files = sorted(folder.glob("*.safetensors"))
    if not shard_files:
        raise UserError(
            f"{field}: '{path}' has no .safetensors weights; convert it with save_pretrained(safe_serialization=True)"
        )
    tensors: dict[str, TensorInfo] = {}
    for shard in shard_files:
        tensors.update(read_safetensors_header(shard))
    return ModelFolder(folder.resolve(), config, tensors)


class LazyTensorReader:
    """Reads single tensors on demand, keeping each shard's handle open."""

    def __init__(self, folder: ModelFolder):
        self.folder = folder
        self._handles: dict[Path, safe_open] = {}

    def read(self, name: str, device: str = "cpu") -> torch.Tensor:
        file = self.folder.tensors[name].file
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        tensor = self._handles[file].get_tensor(name)
        return tensor.to(device) if device != "cpu" else tensor


ShardEntry = tuple[str, tuple[int, ...], torch.dtype, int]  # name, shape, dtype, bytes


def _shard_plan(
    outputs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
) -> list[list[ShardEntry]]:
    shards: list[list[ShardEntry]] = []
    current: list[ShardEntry] = []
    current_bytes = 0
    for name, shape, dtype in outputs:
        size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((name, shape, dtype, size))
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


class StreamingShardWriter:
    """Writes a known list of tensors as sharded safetensors, one tensor at a time, in order."""

    def __init__(
        self, out_dir: Path, outputs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int = 2 * 1024**3
    ):
        self.out_dir = Path(out_dir)
        self.shards = _shard_plan(outputs, max_shard_bytes)
        count = len(self.shards)
        self.file_names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._order = [entry for shard in self.shards for entry in shard]
        self._position = 0
        self._shard_index = -1
        self._handle: BinaryIO | None = None
        self._left_in_shard = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, shape, dtype, size = self._order[self._position]
        if name != expected_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"writer expected {expected_name} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self._handle is None or self._left_in_shard == 0:
            self._handle = self._open_next_shard()
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(data.tobytes())
        self._left_in_shard -= 1
        self._position += 1

    def _open_next_shard(self) -> BinaryIO:
        self._close_shard()
        self._shard_index += 1
        shard = self.shards[self._shard_index]
        header: dict[str, object] = {}
        offset = 0
        for name, shape, dtype, size in shard:
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        handle = open(self.out_dir / self.file_names[self._shard_index], "wb")  # noqa: SIM115 - open across calls, closed by _close_shard
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._left_in_shard = len(shard)
        return handle

    def _close_shard(self) -> None:
        # fsync before the folder is renamed into place: a published folder must survive a power cut.
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        self._close_shard()
        if self._position != len(self._order):
            raise RuntimeError(f"writer closed after {self._position} of {len(self._order)} tensors")
        if len(self.shards) > 1:
            self._write_index()

    def abort(self) -> None:
        """Close the open shard without checks (the caller discards the folder)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _write_index(self) -> None:
        weight_map = {name: self.file_names[i] for i, shard in enumerate(self.shards) for name, *_ in shard}
        total = sum(entry[3] for shard in self.shards for entry in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text_atomic(self.out_dir / "model.safetensors.index.json", json.dumps(index, indent=2))
