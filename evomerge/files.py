"""Atomic file writes, and the one walk over the paths a config names.

Atomic writes: a reader (or a crash) sees the old file or the new one, never half of either. The one
place evomerge writes a whole file: run directories (frozen spec, optimizer snapshots), merged model
folders (config, index, model card) and exported YAML all go through here. Failures surface as
`OSError` with no temporary file left behind; callers turn them into a one-line `UserError` that
names their own file and fix.

`nested_leaves` walks a YAML value (a path, a list of them, a split -> paths mapping, or deeper),
for the task YAMLs' data paths and the files a search fingerprints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a hidden temporary file beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`write_bytes_atomic` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def fsync_folder(folder: Path) -> None:
    """Make a folder's entries (a file renamed into it) durable; a no-op where the filesystem refuses."""
    # The rename itself lives in the folder's entry table; without this a power cut can undo it.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(descriptor)


def nested_leaves(value: Any) -> Iterator[Any]:
    """Every leaf under nested dicts (their values) and lists, depth first, in order; a leaf as it is."""
    if isinstance(value, dict):
        for item in value.values():
            yield from nested_leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from nested_leaves(item)
    else:
        yield value
