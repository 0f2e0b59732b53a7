"""The run directory's source of truth: an append-only JSONL journal plus optimizer snapshots.

Each event is one JSON line, flushed to the OS before the driver acts on it, so a killed driver
loses at most the line it was writing; `read_events` drops such a torn last line with a warning.
A helper thread fsyncs behind the driver (group commit: one fsync covers every line written before
it; an 'asked' line asks for none and rides on the next result's), so the search loop never waits
on the disk; power loss can cost only the last few events, which a resume re-runs. `close` fsyncs
whatever is left and waits for it.
Optimizer state is the only pickle, written atomically under `optimizer/` and referenced from the
journal by its SHA-256; a blob that is missing or does not match is never unpickled (the search
replays the whole journal instead).
Lines that parse but are no event (`{}`, `123`) and a second result for one trial are skipped with
a one-line warning naming the line, so a hand-edited journal still reads; the first result stands.

Test-only hook: with EVOMERGE_TEST_KILL_AFTER_EVENT=EVENT:N in the environment, the process
SIGKILLs itself right after its N-th EVENT line is flushed; the reliability tests use it to kill
the driver at exact points of a search. Nothing else reads that variable.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from evomerge.errors import UserError
from evomerge.rundir.events import RESULT_EVENTS, EventName
from evomerge.rundir.fsync import BackgroundFsync
from evomerge.rundir.layout import RunDir

KILL_HOOK_VARIABLE = "EVOMERGE_TEST_KILL_AFTER_EVENT"
# Warnings go through logging, one line each: warnings.warn would print a line of our source too.
LOG = logging.getLogger(__name__)

# Events that only announce work (an 'asked' is re-derived by replay) wake no fsync of their own:
# the next result's fsync covers them.
UNSYNCED_EVENTS = frozenset({EventName.ASKED})
# Fields without which an event cannot be replayed; such a line is skipped as junk.
REQUIRED_FIELDS = {
    EventName.ASKED: ("trial", "kind", "label", "merge_config"),
    EventName.COMPLETED: ("trial",),
    EventName.FAILED: ("trial",),
    EventName.HELDOUT: ("trial",),
    EventName.SNAPSHOT: ("file", "sha256", "after_events"),
    EventName.SEEDED: ("seeds",),
}


class RunLocked(UserError):
    pass


class SnapshotUnusable(Exception):
    """A journaled optimizer snapshot that is missing or does not match its hash."""


def read_events(path: Path, warn: bool = True) -> list[dict]:
    """Every complete event; a torn final line is dropped with a warning, earlier damage is an error.

    JSON-valid junk and a repeated result for a trial are skipped with a warning; the first stands.
    `warn=False` is for a second reading of the same lines, so each problem is told once.
    """
    return read_journal(path, warn)[0]


def read_journal(path: Path, warn: bool = True) -> tuple[list[dict], int]:
    """(`read_events`, the size in bytes of the journal they were read from)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as error:
        raise UserError(
            f"{path}: cannot read the journal ({error.strerror or error}); it must be the run's journal file, restore it from a backup"
        ) from None
    return _parsed(path, data.split(b"\n"), warn), len(data)


def _parsed(path: Path, lines: list[bytes], warn: bool) -> list[dict]:
    events: list[dict] = []
    seen_results: set[tuple[str, int]] = set()
    seen_starts: dict[bytes, int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            event = json.loads(raw)
        except ValueError:
            if number >= len(lines) - 1:
                if warn:
                    LOG.warning("%s: dropping a torn last line (the driver was killed while writing it)", path)
                break
            raise UserError(
                f"{path}: line {number} is not valid JSON; the journal was edited or damaged, restore it from a backup"
            ) from None
        _refuse_a_repeated_start(path, number, raw.strip(), event, seen_starts)
        problem = _junk(event) or _repeated(event, seen_results)
        if problem:
            if warn:
                LOG.warning("%s: skipping line %d (%s)", path, number, problem)
            continue
        events.append(event)
    return events


def _refuse_a_repeated_start(path: Path, number: int, raw: bytes, event, seen_starts: dict[bytes, int]) -> None:
    """A journal appended to itself repeats its start events, which no run writes twice to the millisecond.

    Other events may legitimately match word for word (two quick events in one millisecond).
    """
    if not isinstance(event, dict) or event.get("event") not in (EventName.CREATED, EventName.RUN_STARTED):
        return
    if raw in seen_starts:
        raise UserError(
            f"{path}: line {number} repeats line {seen_starts[raw]} word for word, so the journal holds duplicated lines (was it appended to itself?); restore it from a backup"
        )
    seen_starts[raw] = number


def _junk(event) -> str | None:
    """Why a parsed line is no event the journal could have written, else None."""
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return f"not a journal event: {json.dumps(event)[:60]}"
    missing = [key for key in REQUIRED_FIELDS.get(event["event"], ()) if key not in event]
    if missing:
        return f"a '{event['event']}' event without {', '.join(missing)}"
    if "trial" in event and (isinstance(event["trial"], bool) or not isinstance(event["trial"], int)):
        return f"a '{event['event']}' event whose trial is not a number"
    return None


def _repeated(event: dict, seen: set[tuple[str, int]]) -> str | None:
    """A second result (or held-out result) for one trial: a journal only ever holds one."""
    kind = event["event"]
    if kind not in (*RESULT_EVENTS, EventName.HELDOUT):
        return None
    key = ("heldout" if kind == EventName.HELDOUT else "result", event["trial"])
    if key in seen:
        return f"a second result for trial {event['trial']}; the first one is kept"
    seen.add(key)
    return None


class ReadJournal(Protocol):
    """A reading of the journal an open `Journal` keeps in step (the run's `Ledger`)."""

    events: list[dict]
    journal_bytes: int


class Journal:
    """Appends events to runs/NAME/journal.jsonl; holds an exclusive lock while open.

    Opened over a reading of the journal (`read`), it appends every event it writes to that
    reading's events, so the reader never reads the file again; it refuses a journal that another
    process changed since that reading. Opened without one, it reads the journal to count it.
    """

    def __init__(self, run_dir: Path | RunDir, read: ReadJournal | None = None):
        self.run = RunDir.of(run_dir)
        self.run_dir = self.run.root
        self.path = self.run.journal
        self.snapshot_dir = self.run.snapshots
        self._lock = open(self.run.lock, "a")  # noqa: SIM115 - held (and locked) until close()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(
                f"{self.run_dir}: another evomerge process is using this run; wait for it or stop it first"
            ) from None
        self._read = read
        self._refuse_changed_since_read()
        if self._repair_torn_tail():
            LOG.warning("%s: dropped a torn last line (the driver was killed while writing it)", self.path)
        self._handle = open(self.path, "ab")  # noqa: SIM115 - the append handle lives until close()
        self._syncer = BackgroundFsync(lambda: self._handle.fileno())
        self._write_lock = threading.Lock()
        self._snapshot_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-snapshot")
        self._pending_snapshot: Future | None = None
        # Whoever replays the journal warns.
        self.count = len(read.events) if read is not None else len(read_events(self.path, warn=False))
        if read is not None:
            read.journal_bytes = self._size()
        self._kill_after = _kill_hook()
        self._kill_countdown = self._kill_after[1] if self._kill_after else 0

    def _size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def _refuse_changed_since_read(self) -> None:
        """The journal grew or shrank between its reading and this lock: that reading is stale."""
        if self._read is not None and self._size() != self._read.journal_bytes:
            self._lock.close()
            raise RunLocked(
                f"{self.run_dir}: another evomerge process wrote to this run while it was being opened; try again once it is done"
            )

    def _repair_torn_tail(self) -> bool:
        """Cut a torn last line so the next event starts on a fresh line; True when one was cut.

        A last line with its newline but not valid JSON is cut as well: left in place, it would sit
        in the middle of the journal after the next append and make the whole run unreadable.
        """
        if not self.path.exists():
            return False
        start, last = _last_line(self.path)
        if not last or (last.endswith(b"\n") and _is_json(last[:-1])):
            return False
        with open(self.path, "r+b") as handle:
            handle.truncate(start)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def append(self, event: EventName, **fields) -> dict:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with self._write_lock:  # the snapshot thread appends too
            try:
                self._syncer.raise_failure()
                self._handle.write(line.encode())
                self._handle.flush()
                if event not in UNSYNCED_EVENTS:
                    self._syncer.request()
            except OSError as error:
                self._reopen_after_failed_write()
                raise UserError(
                    f"{self.path}: cannot write the journal ({error.strerror}); free disk space or fix permissions, then 'evomerge resume {self.run_dir}'"
                ) from None
            self.count += 1
            if self._read is not None:
                self._read.events.append(record)
                self._read.journal_bytes += len(line.encode())
            self._kill_if_asked(event)
        return record

    def _reopen_after_failed_write(self) -> None:
        self._syncer.wait(raise_failure=False)
        with contextlib.suppress(OSError):
            self._handle.close()  # flushes what is still buffered, and fails again on a full disk
        self._repair_torn_tail()
        self._handle = open(self.path, "ab")  # noqa: SIM115 - the append handle lives until close()

    def _kill_if_asked(self, event: EventName) -> None:
        if self._kill_after is None or event != self._kill_after[0]:
            return
        self._kill_countdown -= 1
        if self._kill_countdown == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def write_snapshot_in_background(self, blob: bytes, after_events: int) -> None:
        """Hash, write and fsync the blob on a helper thread, then journal its 'snapshot' event.

        The driver goes on meanwhile. Snapshots are written in order; one that never lands (a
        killed driver) only means a resume replays from the one before. A failure is raised here,
        on the next call, or by `wait_for_snapshots`.
        """
        self.wait_for_snapshots(block=False)
        self._pending_snapshot = self._snapshot_writer.submit(self.write_snapshot, blob, after_events)

    def wait_for_snapshots(self, block: bool = True) -> None:
        pending = self._pending_snapshot
        if pending is not None and (block or pending.done()):
            self._pending_snapshot = None
            pending.result()  # re-raises the helper's UserError

    def write_snapshot(self, blob: bytes, after_events: int) -> dict:
        digest = hashlib.sha256(blob).hexdigest()
        final = self.snapshot_dir / f"{digest[:16]}.pkl"
        temporary = final.with_suffix(".tmp")
        try:
            self.snapshot_dir.mkdir(exist_ok=True)
            with open(temporary, "wb") as handle:
                handle.write(blob)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise UserError(
                f"{final}: cannot write the optimizer snapshot ({error.strerror}); free disk space or fix permissions, then 'evomerge resume {self.run_dir}'"
            ) from None
        return self.append(EventName.SNAPSHOT, file=final.name, sha256=digest, after_events=after_events)

    def close(self) -> None:
        try:
            self._snapshot_writer.shutdown(wait=True)
            self.wait_for_snapshots()
            self._syncer.request()  # covers trailing 'asked' lines, which asked for no fsync
            self._syncer.close()
        except OSError as error:
            raise UserError(
                f"{self.path}: cannot write the journal ({error.strerror}); free disk space or fix permissions, then 'evomerge resume {self.run_dir}'"
            ) from None
        finally:
            self._handle.close()
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def _last_line(path: Path, chunk: int = 1 << 16) -> tuple[int, bytes]:
    """(where the journal's last line starts, that line with its newline if any): read from the end
    back to the line before it, so opening a long journal does not read it all again."""
    with open(path, "rb") as handle:
        size = start = handle.seek(0, os.SEEK_END)
        tail = b""
        while start > 0 and b"\n" not in tail.removesuffix(b"\n"):
            step = min(chunk, start)
            start -= step
            handle.seek(start)
            tail = handle.read(step) + tail
    cut = tail.removesuffix(b"\n").rfind(b"\n") + 1
    assert start + len(tail) == size
    return start + cut, tail[cut:]


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def _kill_hook() -> tuple[str, int] | None:
    """(event, n) from EVOMERGE_TEST_KILL_AFTER_EVENT=event:n, the test-only kill point."""
    value = os.environ.get(KILL_HOOK_VARIABLE)
    if not value:
        return None
    event, _, count = value.partition(":")
    return event, int(count or 1)


def load_snapshot(run_dir: Path | RunDir, event: dict) -> bytes:
    """The blob a snapshot event names; SnapshotUnusable when it is missing or its hash does not match."""
    path = RunDir.of(run_dir).snapshot(str(event["file"]))
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise SnapshotUnusable(
            f"{path}: optimizer snapshot named in the journal cannot be read ({error.strerror})"
        ) from None
    if hashlib.sha256(blob).hexdigest() != event["sha256"]:
        raise SnapshotUnusable(f"{path}: optimizer snapshot does not match the hash in the journal")
    return blob
