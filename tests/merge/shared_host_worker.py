"""A worker process for test_shared_host.py: kept apart so a spawned child imports only what a worker needs."""

from __future__ import annotations

import os
from pathlib import Path

from evomerge.merge.config import MergeConfig


def union(base: str, experts: list[str], dtype: str = "float32") -> MergeConfig:
    return MergeConfig.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "dtype": dtype,
            "models": [{"model": path, "parameters": {"weight": 1.0}} for path in experts],
        }
    )


def anonymous_bytes() -> int:
    """This process's private (anonymous) resident memory."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Anonymous line in smaps_rollup")


def load_in_worker(base, experts, shared, barrier, results) -> None:
    """Load host-placed sources, report what this process holds, wait for the others, close."""
    # Host memory accounting only: no CUDA (its pinned allocations are not anonymous memory), and
    # Triton's interpreter so the CPU may take the fused path. The shared copy's registration with
    # CUDA is exercised on a GPU by test_merging_from_the_shared_copy_equals_the_reference.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["TRITON_INTERPRET"] = "1"
    from evomerge.merge.fused.sources import FusedSources

    before = anonymous_bytes()
    # task_arithmetic: no magnitude tables, whose CPU sort would only slow the test down.
    config = union(base, experts)
    sources = FusedSources.load(config, "task_arithmetic", "cpu", "host", chunk_bytes=4 << 20, shared=shared)
    grown = anonymous_bytes() - before
    copy = sources.shared
    data = copy.data_path.stat() if copy else None
    results.put(
        {
            "shared": shared,
            "created": bool(copy and copy.created),
            "inode": data.st_ino if data else None,
            "grown": grown,
            "copy_bytes": sources.byte_size(),
            "checksum": float(sources.storage.double().sum()),
        }
    )
    barrier.wait(timeout=120)  # everyone has mapped (or copied) before anyone lets go
    sources.close()
