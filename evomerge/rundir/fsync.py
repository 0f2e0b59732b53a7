"""The journal's group commit: a helper thread that fsyncs the journal behind the search loop."""

from __future__ import annotations

import os
import threading


class BackgroundFsync:
    """fsyncs a file from a helper thread whenever asked, coalescing requests that pile up.

    `request` returns at once; `wait` blocks until everything requested so far is on disk. An
    fsync error is kept and raised to the driver on its next append (or at `close`).
    """

    def __init__(self, fileno):
        self._fileno = fileno
        self._condition = threading.Condition()
        self._requested = self._synced = 0
        self._failure: OSError | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="journal-fsync", daemon=True)
        self._thread.start()

    def request(self) -> None:
        with self._condition:
            self._requested += 1
            self._condition.notify_all()

    def wait(self, raise_failure: bool = True) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._synced >= self._requested or self._failure is not None)
        if raise_failure:
            self.raise_failure()

    def raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def close(self) -> None:
        self.wait()
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._requested > self._synced or self._closing)
                if self._requested <= self._synced:
                    return
                target = self._requested
            try:
                os.fsync(self._fileno())
            except OSError as error:
                with self._condition:
                    self._failure = error
            with self._condition:
                self._synced = target
                self._condition.notify_all()
