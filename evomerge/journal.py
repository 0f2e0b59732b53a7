"""The run directory's source of truth: an append-only JSONL journal plus optimizer snapshots.

Each event is one JSON line, flushed and fsynced before the driver acts on it, so a killed driver
loses at most the line it was writing; `read_events` drops such a torn last line with a warning.
Optimizer state is the only pickle, written atomically under `optimizer/` and referenced from the
journal by its SHA-256, so a resume refuses a blob that does not match.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

from evomerge.errors import UserError


class RunLocked(UserError):
    pass


def read_events(path: Path) -> list[dict]:
    """Every complete event; a torn final line is dropped with a warning, earlier damage is an error."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    events = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            events.append(json.loads(raw))
        except ValueError:
            if number >= len(lines) - 1:
                warnings.warn(f"{path}: dropping a torn last line (the driver was killed while writing it)", stacklevel=2)
                break
            raise UserError(f"{path}: line {number} is not valid JSON; the journal was edited or damaged, restore it from a backup") from None
    return events


class Journal:
    """Appends events to runs/NAME/journal.jsonl; holds an exclusive lock while open."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "journal.jsonl"
        self.snapshot_dir = self.run_dir / "optimizer"
        self._lock = open(self.run_dir / ".lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{self.run_dir}: another evomerge process is using this run; wait for it or stop it first") from None
        self._repair_torn_tail()
        self._handle = open(self.path, "ab")
        self.count = len(read_events(self.path))

    def _repair_torn_tail(self) -> None:
        """Cut a partial last line so the next event starts on a fresh line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
                handle.flush()
                os.fsync(handle.fileno())

    def append(self, event: str, **fields) -> dict:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        try:
            self._handle.write(line.encode())
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:
            self._handle.close()
            self._repair_torn_tail()
            self._handle = open(self.path, "ab")
            raise UserError(f"{self.path}: cannot write the journal ({error.strerror}); free disk space or fix permissions, then 'evomerge resume {self.run_dir}'") from None
        self.count += 1
        return record

    def write_snapshot(self, blob: bytes, after_events: int) -> dict:
        digest = hashlib.sha256(blob).hexdigest()
        self.snapshot_dir.mkdir(exist_ok=True)
        final = self.snapshot_dir / f"{digest[:16]}.pkl"
        temporary = final.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        return self.append("snapshot", file=final.name, sha256=digest, after_events=after_events)

    def close(self) -> None:
        self._handle.close()
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()


def load_snapshot(run_dir: Path, event: dict) -> bytes:
    """The blob a snapshot event names, refused when its hash does not match the journal."""
    path = Path(run_dir) / "optimizer" / event["file"]
    if not path.exists():
        raise UserError(f"{path}: optimizer snapshot named in the journal is missing")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != event["sha256"]:
        raise UserError(f"{path}: optimizer snapshot does not match the hash in the journal; it was modified, refusing to load it")
    return blob
