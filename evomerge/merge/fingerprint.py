"""A cheap fingerprint of a model folder's weights: equal for byte-identical copies, read in milliseconds.

It hashes every safetensors file's size and header, plus a few small windows of every tensor's
bytes (its start, evenly spaced points, its end) and the file's last bytes. Two folders holding
the same weights always agree; two different fine-tunes disagree unless every sampled window of
every tensor is equal, which a fine-tune (it moves nearly every element of the tensors it trains)
does not produce. A few hundred kilobytes are read even for a 70B model; no tensor is loaded.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import struct
from pathlib import Path

WINDOWS_PER_TENSOR = 8
WINDOW_BYTES = 64


def weights_fingerprint(folder: Path) -> str:
    """sha256 over the folder's safetensors files: sizes, headers and sampled data windows."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode())
        _hash_file(path, digest)
    return digest.hexdigest()


def same_weights(first: Path, second: Path) -> bool:
    """Byte-for-byte equality of two folders' safetensors files: the confirmation of a fingerprint match.

    A fine-tune that moved only a few unsampled rows (say, new token embeddings) has the same
    fingerprint as its base; only a full read tells them apart, and it runs only on a match.
    """
    names = sorted(p.name for p in first.glob("*.safetensors"))
    if names != sorted(p.name for p in second.glob("*.safetensors")):
        return False
    return all(filecmp.cmp(first / name, second / name, shallow=False) for name in names)


def _hash_file(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    with open(path, "rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) != 8:
            return
        (length,) = struct.unpack("<Q", raw_length)
        raw_header = handle.read(min(length, size))
        digest.update(raw_header)
        data_start = 8 + length
        for offset in _sample_offsets(raw_header, data_start, size):
            handle.seek(offset)
            digest.update(handle.read(WINDOW_BYTES))


def _sample_offsets(raw_header: bytes, data_start: int, size: int) -> list[int]:
    """Where to read: windows spread over every tensor, and the last bytes of the file."""
    try:
        header = json.loads(raw_header)
    except ValueError:
        header = {}
    offsets = []
    for entry in header.values() if isinstance(header, dict) else []:
        begin, end = (entry.get("data_offsets") or (0, 0)) if isinstance(entry, dict) else (0, 0)
        span = max(0, end - begin - WINDOW_BYTES)
        offsets += [data_start + begin + span * i // (WINDOWS_PER_TENSOR - 1) for i in range(WINDOWS_PER_TENSOR)]
    offsets.append(max(data_start, size - WINDOW_BYTES))
    return sorted({offset for offset in offsets if offset < size})
