"""Benchmark: scheduler scaling and driver overhead on CPU, through the real search loop.

Both parts run `evomerge.search.loop.Search._search` unchanged, on a real run directory (journal with
fsync, optimizer snapshots) and a real optimizer over a 500-gene genome (TIES, 5 experts, weight
and density per 25 layer groups, attention and MLP apart); only the workers are fakes.

* Scaling: W Ray actors with MergeWorker's `evaluate(trial_id, merge_config, eval_set)` signature
  sleep a seeded 0.05-0.4 s per candidate (the same durations for every W). Efficiency is
  throughput(W) / (W x throughput(1)); busy share is the sleep time over W x wall time.
  `--durations lognormal --sigma 0.5` draws the times from a lognormal (median `--median`) instead,
  `--scaling-optimizer cmaes --popsize 8` runs the scaling with CMA-ES, and `--search-version 1`
  with its generation barrier (version 2 asks on while stragglers finish), e.g.:

    python scripts/bench_scheduler.py --workers 1,8 --depths 1 --scaling-optimizer cmaes --popsize 8 \
        --durations lognormal --sigma 0.5 --skip-overhead [--search-version 1]
* Driver overhead: the same loop with an in-process scheduler that answers at once, so all the
  time is the driver's: ask, genome -> merge config, journal appends, tell, snapshots.

    python scripts/bench_scheduler.py [--workers 1,2,4] [--depths 1,2] [--optimizers cmaes,tpe,random] [--smoke]
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import platform
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

GENOME_LAYERS = 32
GENOME_SPEC = {"layer_groups": 25, "split_attn_mlp": True}  # 2 params x 5 experts x 25 x 2 = 500 genes
EXPERTS = 5


@dataclass(frozen=True)
class ScalingRow:
    workers: int
    queue_depth: int
    candidates: int
    wall_s: float
    busy_share: float

    @property
    def throughput(self) -> float:
        return self.candidates / self.wall_s


@dataclass
class OverheadRow:
    optimizer: str
    trials: int
    wall_s: float
    seconds_in: dict = field(default_factory=dict)  # part -> total seconds
    finished_at: list = field(default_factory=list)  # perf_counter at each completed trial


@dataclass(frozen=True)
class Durations:
    """How long a fake candidate takes: uniform in [low, high], or lognormal around a median."""

    kind: str = "uniform"
    low: float = 0.05
    high: float = 0.4
    median: float = 0.1
    sigma: float = 0.5

    def of(self, seed: int, trial_id: int) -> float:
        draw = random.Random(f"{seed}:{trial_id}")
        if self.kind == "lognormal":
            return draw.lognormvariate(math.log(self.median), self.sigma)
        return draw.uniform(self.low, self.high)

    def __str__(self) -> str:
        if self.kind == "lognormal":
            return f"lognormal, median {self.median} s, sigma {self.sigma}"
        return f"uniform {self.low}-{self.high} s"


def bench_spec(
    runs_dir: Path,
    name: str,
    optimizer: str,
    max_evals: int,
    queue_depth: int = 2,
    popsize: int | None = None,
    version: int | None = None,
):
    from evomerge.spec import SEARCH_VERSION, Spec

    return Spec.model_validate(
        {
            "name": name,
            "runs_dir": str(runs_dir),
            "models": {"base": "/bench/base", "experts": [f"/bench/expert{i}" for i in range(EXPERTS)]},
            "merge": {"method": "ties"},
            "genome": GENOME_SPEC,
            "optimizer": {"name": optimizer, "seed": 0, "popsize": popsize},
            "evaluation": {"tasks": ["synthetic"]},
            "budget": {"max_evals": max_evals, "baselines": False},
            "workers": {"queue_depth": queue_depth},
            "version": version or SEARCH_VERSION,
        }
    )


def new_search(spec):
    """A Search on a fresh run directory; no model folder is read (preflight is skipped)."""
    from evomerge.genome import Genome
    from evomerge.preflight import Prepared
    from evomerge.search.loop import Search, create_run_dir

    genome = Genome(spec, GENOME_LAYERS)
    return Search(Prepared(spec, genome, {}, {}, []), create_run_dir(spec), progress=False)


def sleep_seconds(seed: int, trial_id: int, durations: Durations) -> float:
    """A candidate's fake evaluation time: a function of the trial only, not of who runs it."""
    return durations.of(seed, trial_id)


class SleepingWorker:
    """Stands in for MergeWorker: same `evaluate` signature and result fields, no model."""

    def __init__(self, worker_id: str, seed: int, durations: Durations):
        self.worker_id, self.seed, self.durations = worker_id, seed, durations

    def ping(self) -> str:
        return self.worker_id

    def evaluate(self, trial_id: int, merge_config: dict, eval_set: str = "search", race=None):
        from evomerge.rundir.events import TrialResult

        seconds = sleep_seconds(self.seed, trial_id, self.durations)
        time.sleep(seconds)
        return TrialResult(
            trial=trial_id,
            ok=True,
            score=-seconds,
            metrics={"synthetic": -seconds},
            n_docs={"synthetic": 1},
            worker=self.worker_id,
            merge_s=0.0,
            eval_s=round(seconds, 4),
        )


@dataclass(frozen=True)
class ScalingSetup:
    """What every scaling run shares: durations, seed, optimizer, popsize, search version."""

    durations: Durations
    seed: int = 0
    optimizer: str = "random"
    popsize: int | None = None
    version: int | None = None


def measure_scaling(workers: int, depth: int, candidates: int, setup: ScalingSetup, runs_dir: Path) -> ScalingRow:
    import ray

    from evomerge.search.progress import SearchProgress
    from evomerge.search.scheduler import Scheduler

    # num_cpus=0: sleeping actors need no core, so W may exceed the machine's cores.
    actor_class = ray.remote(num_cpus=0, max_restarts=0)(SleepingWorker)
    seed = setup.seed
    scheduler = Scheduler(lambda index: actor_class.remote(f"w{index}", seed, setup.durations), workers, depth)
    name = f"scale-{setup.optimizer}-p{setup.popsize}-v{setup.version}-w{workers}-d{depth}"
    spec = bench_spec(runs_dir, name, setup.optimizer, candidates, depth, setup.popsize, setup.version)
    search = new_search(spec)
    try:
        ray.get([slot.actor.ping.remote() for slot in scheduler.slots])  # actor start-up is not timed
        started = time.perf_counter()
        with SearchProgress(candidates, False) as progress:
            search._search(scheduler, progress)
        wall = time.perf_counter() - started
    finally:
        scheduler.shutdown()
        search.journal.close()
    slept = sum(sleep_seconds(seed, trial, setup.durations) for trial in range(candidates))
    return ScalingRow(workers, depth, candidates, wall, slept / (workers * wall))


def instant_scheduler(score_of):
    """The real Scheduler's bookkeeping around one in-process worker that answers at once."""
    from evomerge.rundir.events import TrialResult
    from evomerge.search.scheduler import Scheduler

    class InstantScheduler(Scheduler):
        def submit(self, job) -> None:
            self.slots[0].in_flight[job.trial_id] = job

        def poll(self, timeout: float) -> list:
            done = list(self.slots[0].in_flight.values())
            self.slots[0].in_flight.clear()
            return [
                (job, TrialResult(trial=job.trial_id, ok=True, score=score_of(job.trial_id), eval_s=0.0))
                for job in done
            ]

    return InstantScheduler(lambda index: None, num_workers=1, queue_depth=1)


class _TimedOptimizer:
    """Delegates to the real optimizer, adding the seconds spent in ask/tell/snapshot to `seconds_in`."""

    def __init__(self, inner, seconds_in: dict):
        self._inner, self._seconds_in = inner, seconds_in

    def __getattr__(self, name):
        method = getattr(self._inner, name)
        if name not in ("ask", "tell", "snapshot"):
            return method

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._seconds_in[name] += time.perf_counter() - started

        return timed


def _time_journal(journal, row: OverheadRow) -> None:
    """Time the driver's journal writes (the snapshot thread's are not the driver's time)."""
    import threading

    append, snapshot_later = journal.append, journal.write_snapshot_in_background

    def timed_append(event, **fields):
        started = time.perf_counter()
        record = append(event, **fields)
        if threading.current_thread() is threading.main_thread():
            row.seconds_in["journal"] += time.perf_counter() - started
        if event == "completed":
            row.finished_at.append(time.perf_counter())
        return record

    def timed_snapshot_later(blob, after_events):
        started = time.perf_counter()
        snapshot_later(blob, after_events)
        row.seconds_in["snapshot file"] += time.perf_counter() - started

    journal.append, journal.write_snapshot_in_background = timed_append, timed_snapshot_later


def _synthetic_score(params: dict) -> float:
    """A score that depends on the recipe, so model-based optimizers have something to fit."""
    return -sum((value - 0.3) ** 2 for value in params.values())


def measure_overhead(optimizer: str, trials: int, runs_dir: Path) -> OverheadRow:
    from evomerge.search.progress import SearchProgress

    search = new_search(bench_spec(runs_dir, f"overhead-{optimizer}", optimizer, trials, 1))
    row = OverheadRow(optimizer, trials, 0.0, collections.defaultdict(float))
    search.optimizer = _TimedOptimizer(search.optimizer, row.seconds_in)
    _time_journal(search.journal, row)
    try:
        started = time.perf_counter()
        with SearchProgress(trials, False) as progress:
            search._search(instant_scheduler(lambda trial: _synthetic_score(search.trials[trial].params)), progress)
        row.wall_s = time.perf_counter() - started
        row.finished_at.insert(0, started)
    finally:
        search.journal.close()
    return row


def scaling_table(rows: list[ScalingRow]) -> str:
    """Efficiency vs W=1 compares throughputs, so it moves with the mean duration of the candidates
    each run drew; busy share (evaluating time / W x wall) and its ratio to W=1's do not."""
    single = {r.queue_depth: r for r in rows if r.workers == 1}
    lines = [
        "| workers | queue depth | candidates | wall (s) | candidates/s | efficiency vs W=1 | busy share | busy share vs W=1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        one = single.get(r.queue_depth)
        efficiency = f"{r.throughput / (r.workers * one.throughput):.2f}" if one else "-"
        busy = f"{r.busy_share / one.busy_share:.2f}" if one else "-"
        lines.append(
            f"| {r.workers} | {r.queue_depth} | {r.candidates} | {r.wall_s:.2f} | {r.throughput:.2f} | {efficiency} | {r.busy_share:.2f} | {busy} |"
        )
    return "\n".join(lines)


def overhead_table(rows: list[OverheadRow]) -> str:
    parts = ("ask", "tell", "snapshot", "journal", "snapshot file")
    lines = [
        "| optimizer | trials | ms/trial (mean) | ms/trial (last 10%) | "
        + " | ".join(f"{p} ms" for p in parts)
        + " | rest ms |",
        "|---" * (5 + len(parts)) + "|",
    ]
    for r in rows:
        per_trial = {p: 1000 * r.seconds_in.get(p, 0.0) / r.trials for p in parts}
        rest = 1000 * r.wall_s / r.trials - sum(per_trial.values())
        tail = max(1, len(r.finished_at) // 10)
        last = 1000 * (r.finished_at[-1] - r.finished_at[-1 - tail]) / tail
        lines.append(
            f"| {r.optimizer} | {r.trials} | {1000 * r.wall_s / r.trials:.2f} | {last:.2f} | "
            + " | ".join(f"{per_trial[p]:.2f}" for p in parts)
            + f" | {rest:.2f} |"
        )
    return "\n".join(lines)


def machine_line() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{cpu.group(1) if cpu else platform.processor()}, nproc={os.cpu_count()}, load average {load}"


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int_list, default=[1, 2, 4])
    parser.add_argument("--depths", type=int_list, default=[1, 2])
    parser.add_argument("--per-worker", type=int, default=40, help="candidates per worker in the scaling runs")
    parser.add_argument("--sleep", type=float, nargs=2, default=(0.05, 0.4), metavar=("LOW", "HIGH"))
    parser.add_argument("--optimizers", default="cmaes,tpe,random")
    parser.add_argument("--trials", type=int, default=200, help="trials per optimizer in the driver-overhead runs")
    parser.add_argument("--durations", choices=("uniform", "lognormal"), default="uniform")
    parser.add_argument("--median", type=float, default=0.1, help="median seconds of the lognormal durations")
    parser.add_argument("--sigma", type=float, default=0.5, help="sigma of the lognormal durations")
    parser.add_argument("--scaling-optimizer", default="random", help="the optimizer of the scaling runs")
    parser.add_argument("--popsize", type=int, default=None, help="CMA-ES popsize of the scaling runs")
    parser.add_argument("--search-version", type=int, default=None, help="1: CMA-ES with its generation barrier")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run with tiny counts (for the tests)")
    args = parser.parse_args()
    if args.smoke:
        args.workers, args.depths, args.per_worker, args.sleep, args.trials = [1, 2], [2], 4, (0.01, 0.04), 12
    return args


def main() -> None:
    args = parse_args()
    print(f"Machine: {machine_line()}")
    with tempfile.TemporaryDirectory(prefix="bench_scheduler_") as scratch:
        runs_dir = Path(scratch)
        if not args.skip_scaling:
            import ray

            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, 1),
                include_dashboard=False,
                log_to_driver=False,
                _node_ip_address="127.0.0.1",
            )
            durations = Durations(args.durations, *args.sleep, args.median, args.sigma)
            setup = ScalingSetup(durations, args.seed, args.scaling_optimizer, args.popsize, args.search_version)
            try:
                rows = [
                    measure_scaling(w, d, w * args.per_worker, setup, runs_dir)
                    for d in args.depths
                    for w in args.workers
                ]
            finally:
                ray.shutdown()
            print(
                f"\nScheduler scaling ({setup.optimizer}, popsize {setup.popsize}, search version "
                f"{setup.version or 'latest'}; fake workers sleeping {durations}):\n"
            )
            print(scaling_table(rows))
        if args.skip_overhead:
            return
        overhead = [measure_overhead(name, args.trials, runs_dir) for name in args.optimizers.split(",")]
        print("\nDriver overhead per trial, 500-gene genome (ms; parts are means over all trials):\n")
        print(overhead_table(overhead))


if __name__ == "__main__":
    main()
