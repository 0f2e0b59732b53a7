"""One host copy of a worker's flat sources per node, shared by every worker that streams from it.

Workers whose sources do not fit their GPU stream them from host memory ("host" placement). Each
worker holding its own pinned copy multiplies host memory by the workers per node (8 copies of a
7B merge's 58 GB do not fit a node), so the copy lives in a file in shared memory (/dev/shm),
mapped by every worker and registered with CUDA by each (`cudaHostRegister`), which makes it
pinned for that worker's copies without a second copy.

Coordination uses `flock` on two lock files beside the data, so a crashed worker never leaves a
lock held. Every user holds a shared lock on the "users" file while it maps the data. The "fill"
lock is taken exclusively around the check-and-fill: the first worker there fills the data and
writes a ready marker (atomically, last); the others see the marker and map the data. A worker
that closes tries to turn its users lock exclusive without waiting: it succeeds only when it is
the last user, and then removes the data (a newcomer waits for that, then fills it anew). The
file name carries a digest of everything the bytes depend on (the models' weight fingerprints, the
layout, the dtype), so a leftover from a killed run is reused only when it holds exactly these
bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from evomerge.files import write_text_atomic
from evomerge.merge.fingerprint import weights_fingerprint

SHARED_DIR_ENV = "EVOMERGE_SHARED_DIR"


def shared_directory() -> Path:
    """Where shared copies live: $EVOMERGE_SHARED_DIR, else /dev/shm (memory, not disk), else the temp folder."""
    chosen = os.environ.get(SHARED_DIR_ENV)
    if chosen:
        return Path(chosen)
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def content_key(model_paths: list[str], layout: dict) -> str:
    """A digest of the models' weight fingerprints and the layout: equal keys, equal bytes."""
    facts = {"models": {path: weights_fingerprint(Path(path)) for path in model_paths}, "layout": layout, "format": 1}
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()[:32]


def has_room_for(size_bytes: int, directory: Path | None = None) -> bool:
    """Whether the shared folder can hold `size_bytes` more (a full tmpfs kills the worker with SIGBUS, not an error)."""
    folder = directory or shared_directory()
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize >= size_bytes


class SharedHostCopy:
    """A flat tensor backed by a node-wide shared-memory file, filled once by whichever worker comes first."""

    def __init__(self, tensor: torch.Tensor, data_path: Path, users, registered: bool, created: bool):
        self.tensor = tensor
        self.data_path = data_path
        self.created = created  # this process filled it
        self._finalizer = weakref.finalize(self, _release, tensor, data_path, users, registered)

    @classmethod
    def open(
        cls,
        key: str,
        numel: int,
        dtype: torch.dtype,
        fill: Callable[[torch.Tensor], None],
        pin: bool,
        directory: Path | None = None,
    ) -> SharedHostCopy:
        """Map the copy named `key`, calling `fill(tensor)` only if no worker has filled it yet."""
        folder = directory or shared_directory()
        stem = f"evomerge-{os.getuid()}-{key}"
        data_path, ready_path = folder / f"{stem}.data", folder / f"{stem}.ready"
        marker = json.dumps({"numel": numel, "dtype": str(dtype)})
        users = open(folder / f"{stem}.users", "a+")  # noqa: SIM115 - held for the copy's lifetime
        try:
            fcntl.flock(users, fcntl.LOCK_SH)
            with open(folder / f"{stem}.fill", "a+") as fill_lock:
                fcntl.flock(fill_lock, fcntl.LOCK_EX)
                created = not (ready_path.is_file() and ready_path.read_text() == marker)
                created = created or not _has_size(data_path, numel, dtype)
                if created:
                    with contextlib.suppress(FileNotFoundError):
                        ready_path.unlink()
                    with open(data_path, "wb") as handle:
                        handle.truncate(numel * dtype.itemsize)
                tensor = torch.from_file(str(data_path), shared=True, size=numel, dtype=dtype)
                if created:
                    fill(tensor)
                    write_text_atomic(ready_path, marker)
        except BaseException:
            users.close()
            raise
        registered = pin and _register_with_cuda(tensor)
        return cls(tensor, data_path, users, registered, created)

    def close(self) -> None:
        """Stop using the copy; the last user on the node removes it."""
        self._finalizer()


def _has_size(path: Path, numel: int, dtype: torch.dtype) -> bool:
    return path.is_file() and path.stat().st_size == numel * dtype.itemsize


def _register_with_cuda(tensor: torch.Tensor) -> bool:
    """Page-lock the mapping for this process, so copies from it are asynchronous DMA."""
    if not torch.cuda.is_available() or tensor.numel() == 0:
        return False
    error = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    if int(getattr(error, "value", error)) != 0:
        raise RuntimeError(f"cudaHostRegister of the shared source copy failed ({error})")
    return True


def _release(tensor: torch.Tensor, data_path: Path, users, registered: bool) -> None:
    if registered:
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # another worker still maps it
        users.close()
        return
    # The lock files stay: removing one would let a newcomer lock a fresh file while another
    # still waits on the old one.
    for path in (data_path.with_suffix(".ready"), data_path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    users.close()
