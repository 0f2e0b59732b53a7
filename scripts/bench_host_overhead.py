"""CPU benchmark: the host-side work of one fused-kernel candidate at real model layouts.

Before its kernel launch, a GPU worker validates the candidate's merge config, plans it per tensor,
packs the parameter table and looks up every TIES threshold. That is Python on the worker's CPU,
and it adds to the per-candidate merge time however fast the kernel is, so it has to stay well
under the kernel's memory-bandwidth bound (about 4 ms at 1.5B and 10 ms at 3.6B on an H100).

No weights are needed: the model folders are built in memory from the Llama shapes (names, shapes,
dtypes), and each delta's magnitude table is synthetic (3,000 distinct bf16 magnitudes, about what
a real bf16 delta has).

    python scripts/bench_host_overhead.py --sizes 1.5b,3.6b --candidates 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_models  # noqa: E402
from bench_merge_cpu import machine_description  # noqa: E402
from synthetic_models import FINETUNE_SCALES, llama_config  # noqa: E402

from evomerge.merge.config import MergeConfig  # noqa: E402
from evomerge.merge.fused.sources import FusedSources  # noqa: E402
from evomerge.merge.io import ModelFolder  # noqa: E402
from evomerge.merge.methods import METHODS  # noqa: E402
from evomerge.merge.validate import validate_merge_config  # noqa: E402

DISTINCT_MAGNITUDES = 3000


def in_memory_folders(size: str) -> dict[str, ModelFolder]:
    """Base + fine-tunes as ModelFolders (config + tensor headers), with no files behind them."""
    return synthetic_models.in_memory_folders(llama_config(size), size, ("base", *FINETUNE_SCALES))


def synthetic_sources(folders: dict[str, ModelFolder], method: str) -> FusedSources:
    """FusedSources' host-side state for the layout, without allocating or reading any weights."""
    base, *experts = folders
    union = MergeConfig.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "dtype": "bfloat16",
            "models": [{"model": path, "parameters": {"weight": 1.0}} for path in experts],
        }
    )
    sources = FusedSources(validate_merge_config(union, folders=folders), METHODS[method], "cpu", "device")
    rng = np.random.default_rng(0)
    for segment, numel in enumerate(sources.layout.numels):
        for expert in range(len(sources.experts)):
            distinct = int(min(numel, DISTINCT_MAGNITUDES))
            counts = rng.multinomial(int(numel) - distinct, np.full(distinct, 1 / distinct)) + 1
            sources.magnitudes._values[(segment, expert)] = np.sort(rng.uniform(0, 0.1, distinct))[::-1]
            sources.magnitudes._counts[(segment, expert)] = counts.astype(np.int64)
    return sources


def candidate_dicts(folders: dict[str, ModelFolder], method: str, count: int) -> list[dict]:
    """Candidates as the driver sends them to a worker: plain dicts of a genome point."""
    base, *experts = folders
    configs = synthetic_models.genome_candidates(base, experts, folders[base].num_layers, method, count, seed=1)
    return [config.model_dump(mode="json", exclude_none=True) for config in configs]


def time_stages(sources: FusedSources, folders, candidates: list[dict]) -> dict[str, float]:
    """Median ms per candidate of each host-side stage, in the order a worker runs them."""
    stages: dict[str, list[float]] = {
        "config validation": [],
        "plan": [],
        "parameter table": [],
        "thresholds + pack": [],
    }
    for candidate in candidates:
        marks = [time.perf_counter()]
        config = MergeConfig.model_validate(candidate)
        marks.append(time.perf_counter())
        validated = validate_merge_config(config, "candidate", folders=folders)
        marks.append(time.perf_counter())
        table = sources.parameters(validated, seed=0)
        marks.append(time.perf_counter())
        counts = table.keep_counts(sources.layout.numels)
        table.pack(sources.work_dtype, sources.magnitudes.thresholds(counts))
        marks.append(time.perf_counter())
        for name, begin, end in zip(stages, marks, marks[1:], strict=False):
            stages[name].append(1000 * (end - begin))
    medians = {name: statistics.median(values) for name, values in stages.items()}
    medians["total"] = sum(medians.values())
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1.5b,3.6b")
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--method", default="ties")
    args = parser.parse_args()
    rows = []
    for size in args.sizes.split(","):
        folders = in_memory_folders(size)
        sources = synthetic_sources(folders, args.method)
        candidates = candidate_dicts(folders, args.method, args.candidates + 1)
        time_stages(sources, folders, candidates[:1])  # first call builds the threshold index
        rows.append((size, len(sources.layout.names), time_stages(sources, folders, candidates[1:])))
    print(
        f"Host: {machine_description()}; method {args.method}; median of {args.candidates} candidates; ms per candidate\n"
    )
    names = list(rows[0][2])
    print("| model | tensors | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for size, tensors, medians in rows:
        print(f"| {size} | {tensors} | " + " | ".join(f"{medians[n]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
