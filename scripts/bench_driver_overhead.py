"""Benchmark: optimizer overhead per trial (ask + tell, plus a snapshot per generation) on a
500-dim genome, i.e. what the search driver spends outside evaluation. Prints ms/trial.

    python scripts/bench_driver_overhead.py [--dim 500] [--trials 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from evomerge.optim import make_optimizer


def measure(name: str, dim: int, trials: int, seed: int = 0) -> tuple[float, int]:
    """Return (ms per trial, snapshot bytes) for ``trials`` sequential ask/tell rounds."""
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.2, 0.8, dim)
    optimizer = make_optimizer(name, np.zeros(dim), np.ones(dim), np.full(dim, 0.5), seed)
    snapshot_bytes = 0
    started = time.perf_counter()
    done = 0
    while done < trials:
        batch = []
        while (ask := optimizer.ask()) is not None and len(batch) < 32:
            batch.append(ask)
        for ask in batch:
            optimizer.tell(ask.trial_id, -float(np.sum((ask.x - target) ** 2)))
        done += len(batch)
        # The driver snapshots once per generation (per batch for asynchronous optimizers).
        snapshot_bytes = len(optimizer.snapshot())
    elapsed = time.perf_counter() - started
    return 1000.0 * elapsed / done, snapshot_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=500)
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    print(f"dim={args.dim} trials={args.trials}")
    for name in ("cmaes", "tpe", "random"):
        ms_per_trial, snapshot_bytes = measure(name, args.dim, args.trials)
        print(f"{name:>6}: {ms_per_trial:8.2f} ms/trial   snapshot {snapshot_bytes / 1e6:6.2f} MB")


if __name__ == "__main__":
    main()
