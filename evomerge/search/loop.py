"""The search loop and its run directory: start, resume (= replay the journal), finish.

`runs/NAME/` holds a frozen copy of the spec, the append-only journal and optimizer snapshots.
Resume restores the last snapshot whose hash the journal vouches for, replays the ask/tell events
after it (checking the optimizer proposes exactly what was journaled), re-queues candidates that
were in flight, and carries on; so a resumed search reaches the state an uninterrupted one would.
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path

import numpy as np
import yaml

from evomerge.errors import UserError
from evomerge.files import write_text_atomic
from evomerge.optim import make_optimizer
from evomerge.preflight import Prepared, preflight
from evomerge.rundir.journal import Journal, load_snapshot, read_events
from evomerge.rundir.pareto import objective_values
from evomerge.rundir.trials import Tally, Trial, is_default_merge, replay
from evomerge.search.progress import SearchProgress
from evomerge.search.scheduler import Job, Scheduler
from evomerge.search.tracking import Tracker
from evomerge.spec import Spec, parse_spec

SPEC_FILE = "spec.yaml"


def run_dir_of(spec: Spec) -> Path:
    return Path(spec.runs_dir).expanduser().resolve() / spec.name


def create_run_dir(spec: Spec) -> Path:
    """A new run directory with a frozen spec; refuses to reuse an existing run."""
    run_dir = run_dir_of(spec)
    if (run_dir / "journal.jsonl").exists():
        raise UserError(
            f"name: run '{spec.name}' already exists in {run_dir.parent}; use 'evomerge resume {run_dir}' or pick another name"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Frozen with absolute paths, so the run does not depend on where it is resumed from.
        write_text_atomic(run_dir / SPEC_FILE, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    except OSError as error:
        raise UserError(f"runs_dir: cannot write {run_dir} ({error.strerror}); choose a writable runs_dir") from None
    return run_dir


def load_run_spec(run_dir: Path) -> Spec:
    path = Path(run_dir) / SPEC_FILE
    if not path.exists():
        raise UserError(f"{run_dir}: not a run directory (no {SPEC_FILE}); give runs/NAME")
    return parse_spec(yaml.safe_load(path.read_text()), str(path), path.parent)


class Search:
    """One driver process working on one run directory."""

    def __init__(self, prepared: Prepared, run_dir: Path, address: str | None = None, progress: bool = True):
        self.prepared = prepared
        self.spec = prepared.spec
        self.run_dir = run_dir
        self.address = address
        self.show_progress = progress
        self.journal = Journal(run_dir)
        self.events = read_events(self.journal.path)
        self.journal.count = len(self.events)
        _refuse_changed_spec(self.events, self.spec, run_dir)
        self.trials = replay(self.events)
        # (label, x) of the baselines handed to the optimizer; None until chosen (_seed_optimizer).
        self.seeds = _journaled_seeds(self.events) if self.spec.budget.baselines else []
        self.tally = Tally.of(self.trials)
        self.optimizer = self._restore_optimizer()
        self.tracker = Tracker(self.spec, self.run_dir)
        self.tells_since_snapshot = 0

    def _new_optimizer(self):
        genome = self.prepared.genome
        settings = self.spec.optimizer
        extra = {"popsize": settings.popsize, "sigma0": settings.sigma0} if settings.name == "cmaes" else {}
        if settings.name in ("tpe", "nsga2"):
            extra = {
                "storage_path": str(self.run_dir / "optuna.log"),
                "objectives": max(1, len(self.spec.evaluation.objectives)),
            }
            if settings.name == "tpe":
                extra["n_startup_trials"] = settings.n_startup_trials
            if settings.popsize and settings.name == "nsga2":
                extra["population_size"] = settings.popsize
        extra = {k: v for k, v in extra.items() if v is not None}
        return make_optimizer(settings.name, genome.lower, genome.upper, genome.x0(), settings.seed, **extra)

    def _restore_optimizer(self):
        snapshots = [i for i, e in enumerate(self.events) if e["event"] == "snapshot"]
        if snapshots:
            event = self.events[snapshots[-1]]
            optimizer = type(self._new_optimizer()).restore(load_snapshot(self.run_dir, event))
            start = event["after_events"]
        else:
            optimizer, start = self._new_optimizer(), 0
        for event in self.events[start:]:
            _replay_event(optimizer, event, self.trials)
        return optimizer

    def run(self) -> dict[int, Trial]:
        import ray

        # The driver's numpy work (CMA-ES eigendecompositions) is small; extra BLAS threads only
        # fight the workers for cores.
        from threadpoolctl import threadpool_limits

        from evomerge.search.cluster import connect, make_actor_factory

        threadpool_limits(1)
        connect(self.spec, self.address)
        factory, count = make_actor_factory(self.prepared, self.spec)
        scheduler = Scheduler(factory, count, self.spec.workers.queue_depth)
        self.journal.append("run_started", spec_fingerprint=self.spec.fingerprint(), workers=count)
        try:
            with SearchProgress(self.spec.budget.max_evals, enabled=self.show_progress) as progress:
                progress.update(self.tally)
                self._search(scheduler, progress)
                self._rescore_heldout(scheduler)
            self._snapshot(wait=True)
            self.journal.append("run_finished", completed=self.tally.completed)
        finally:
            self.tracker.close()
            scheduler.shutdown()
            self.journal.close()
            if self.address is None:
                ray.shutdown()
        return self.trials

    def _search(self, scheduler: Scheduler, progress: SearchProgress) -> None:
        started = time.monotonic()
        time_limit = (self.spec.budget.time_limit_min or math.inf) * 60
        pending = [
            Job(t.trial_id, t.merge_config)
            for t in self.trials.values()
            if t.status == "asked" and t.kind in ("optimizer", "baseline")
        ]
        scheduler.requeued.extend(pending)
        while True:
            out_of_time = time.monotonic() - started > time_limit
            while scheduler.free_slots and not out_of_time:
                job = scheduler.requeued.popleft() if scheduler.requeued else self._next_job()
                if job is None:
                    break
                scheduler.submit(job)
            if scheduler.in_flight == 0:
                return
            for job, result in scheduler.poll(timeout=1.0):
                self._record(job, result)
                progress.update(self.tally)
            self._stop_if_nothing_works(scheduler)

    def _stop_if_nothing_works(self, scheduler: Scheduler) -> None:
        """Every evaluation so far failed: the setup is broken, not the candidates; say why and stop."""
        tally = self.tally
        if tally.completed == 0 and tally.failed >= max(6, 3 * len(scheduler.slots)):
            raise UserError(
                f"the first {tally.failed} evaluations all failed (last: {tally.last_failure}); fix the cause and run 'evomerge resume {self.run_dir}'"
            )

    def _next_job(self) -> Job | None:
        for label, config in self.prepared.baselines:
            if label not in self.tally.baseline_labels:
                trial_id = -1 - len(self.tally.baseline_labels)
                return self._ask(Trial(trial_id, "baseline", label, config))
        if self.tally.asked >= (self.spec.budget.max_evals or math.inf) or not self._seed_optimizer():
            return None
        ask = self.optimizer.ask()
        if ask is None:
            return None
        genome = self.prepared.genome
        params = genome.decode(ask.x)
        seeded = next((label for label, point in self.seeds if np.array_equal(point, ask.x)), None)
        label = f"trial {ask.trial_id}" + (f" (seeded: {seeded})" if seeded else "")
        trial = Trial(ask.trial_id, "optimizer", label, genome.merge_config_dict(ask.x, params), params)
        return self._ask(trial, x=[float(v) for v in ask.x])

    def _seed_optimizer(self) -> bool:
        """Once every baseline is scored, hand the optimizer those worth starting from; False until then.

        Seeded: the baselines the genome can express exactly (each parent alone, and linear for
        task arithmetic) that score at least as well as the best default merge. A weaker one
        injected into CMA-ES's first generation only drags its mean toward a poor corner.
        """
        if self.seeds is not None:
            return True
        if any(t.kind == "optimizer" for t in self.trials.values()):
            self.seeds = []  # a run journaled before seeding existed: resume it as it was
            return True
        baselines = [t for t in self.trials.values() if t.kind == "baseline"]
        if any(t.status == "asked" for t in baselines):
            return False
        self.seeds = seeds_worth_trying(self.prepared.genome.baseline_points(), baselines)
        self.journal.append("seeded", seeds=[{"label": label, "x": [float(v) for v in x]} for label, x in self.seeds])
        for _, x in self.seeds:
            self.optimizer.enqueue(x)
        return True

    def _ask(self, trial: Trial, x: list | None = None) -> Job:
        self.trials[trial.trial_id] = trial
        self.tally.add_asked(trial)
        self.journal.append(
            "asked",
            trial=trial.trial_id,
            kind=trial.kind,
            label=trial.label,
            x=x,
            params=trial.params,
            merge_config=trial.merge_config,
        )
        return Job(trial.trial_id, trial.merge_config)

    def _record(self, job: Job, result: dict) -> None:
        trial = self.trials[job.trial_id]
        if job.eval_set == "heldout":
            trial.heldout = self.journal.append("heldout", **_result_fields(result))
            return
        ok = result["ok"] and math.isfinite(result.get("score", math.nan))
        trial.status = "completed" if ok else "failed"
        if not ok:
            result = {**result, "ok": False, "reason": result.get("reason", "score is not finite")}
        objectives = self._objectives(result) if ok else None
        extra = {"objectives": objectives} if objectives is not None else {}
        trial.result = self.journal.append(trial.status, **_result_fields(result), **extra)
        self.tally.add_finished(trial)
        if ok:
            self.tracker.log_trial(trial, self.tally.best_score)
        if trial.kind == "optimizer":
            self.optimizer.tell(trial.trial_id, (objectives or result["score"]) if ok else None)
            self.tells_since_snapshot += 1
            if self.tells_since_snapshot >= (self.spec.optimizer.popsize or 10):
                self._snapshot()

    def _objectives(self, result: dict) -> list[float] | None:
        if not self.spec.multi_objective:
            return None
        weights = {t.name: t.weight for t in self.spec.evaluation.tasks}
        return objective_values(result["metrics"], self.spec.evaluation.objectives, weights)

    def _snapshot(self, wait: bool = False) -> None:
        """Pickle the optimizer now; hashing, writing and fsyncing it overlap the search unless `wait`."""
        blob, after_events = self.optimizer.snapshot(), self.journal.count
        # The trials' configs are hundreds of thousands of long-lived containers; left in the
        # collector's oldest generation, each full collection rescans them all (66-190 ms stalls
        # by trial 200 of a 500-gene search). Frozen, they are still freed by refcounting.
        gc.freeze()
        if wait:
            self.journal.wait_for_snapshots()
            self.journal.write_snapshot(blob, after_events)
        else:
            self.journal.write_snapshot_in_background(blob, after_events)
        self.tells_since_snapshot = 0

    def _rescore_heldout(self, scheduler: Scheduler) -> None:
        if "heldout" not in self.prepared.eval_sets:
            return
        chosen = heldout_candidates(self.trials, self.spec.evaluation.top_k)
        jobs = [Job(t.trial_id, t.merge_config, "heldout") for t in chosen if t.heldout is None]
        while jobs or scheduler.in_flight or scheduler.requeued:
            jobs.extend(scheduler.requeued)
            scheduler.requeued.clear()
            while jobs and scheduler.free_slots:
                scheduler.submit(jobs.pop(0))
            for job, result in scheduler.poll(timeout=1.0):
                self._record(job, result)


def heldout_candidates(trials: dict[int, Trial], top_k: int) -> list[Trial]:
    """Every completed baseline plus the top-k completed optimizer trials by search score."""
    done = [t for t in trials.values() if t.status == "completed"]
    searched = sorted((t for t in done if t.kind == "optimizer"), key=lambda t: -t.result["score"])
    return [t for t in done if t.kind == "baseline"] + searched[:top_k]


def seeds_worth_trying(points: list[tuple[str, np.ndarray]], baselines: list[Trial]) -> list[tuple[str, np.ndarray]]:
    """The expressible baselines that scored at least as well as every default merge."""
    scores = {t.label: t.result["score"] for t in baselines if t.status == "completed"}
    merges = [score for label, score in scores.items() if is_default_merge(label)]
    bar = max(merges, default=-math.inf)
    return [(label, x) for label, x in points if label in scores and scores[label] >= bar]


def _journaled_seeds(events: list[dict]) -> list[tuple[str, np.ndarray]] | None:
    seeded = [e for e in events if e["event"] == "seeded"]
    return [(s["label"], np.asarray(s["x"], dtype=float)) for s in seeded[-1]["seeds"]] if seeded else None


def _result_fields(result: dict) -> dict:
    keep = (
        "trial",
        "ok",
        "score",
        "metrics",
        "n_docs",
        "worker",
        "merge_s",
        "prepare_s",
        "merge_path",
        "eval_s",
        "subset",
        "reason",
        "seconds",
    )
    return {k: result[k] for k in keep if k in result}


def _refuse_changed_spec(events: list[dict], spec: Spec, run_dir: Path) -> None:
    started = [e for e in events if e["event"] == "run_started"]
    if started and started[0]["spec_fingerprint"] != spec.fingerprint():
        raise UserError(
            f"{run_dir / SPEC_FILE}: the spec was changed after the run started; restore it, or start a new run for the new spec"
        )


def _replay_event(optimizer, event: dict, trials: dict[int, Trial]) -> None:
    kind = event["event"]
    if kind == "asked" and event["kind"] == "optimizer":
        ask = optimizer.ask()
        if ask is None or ask.trial_id != event["trial"] or not np.allclose(ask.x, event["x"], rtol=0, atol=1e-12):
            raise UserError(
                f"journal: the optimizer no longer proposes trial {event['trial']} as journaled; the spec or the optimizer code changed, start a new run"
            )
    elif kind == "seeded":
        for seed in event["seeds"]:
            optimizer.enqueue(np.asarray(seed["x"], dtype=float))
    elif kind in ("completed", "failed") and event["trial"] in trials and trials[event["trial"]].kind == "optimizer":
        optimizer.tell(event["trial"], (event.get("objectives") or event.get("score")) if kind == "completed" else None)


def start_search(spec: Spec, address: str | None = None, progress: bool = True, source: str = "spec") -> Path:
    prepared = preflight(spec, source)
    _check_local_devices(spec, address, source)
    run_dir = create_run_dir(spec)
    Search(prepared, run_dir, address, progress).run()
    return run_dir


def _check_local_devices(spec: Spec, address: str | None, source: str) -> None:
    """A local run that asks for CUDA on a machine without it fails before any run dir exists."""
    if address is None and spec.workers.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"{source}: workers.device: cuda was asked for but this machine has no GPU; use device: cpu or auto, or --address a GPU cluster"
            )


def resume_search(
    run_dir: Path, address: str | None = None, progress: bool = True, spec_path: Path | None = None
) -> Path:
    run_dir = Path(run_dir).resolve()
    frozen = load_run_spec(run_dir)
    if spec_path is not None:
        from evomerge.spec import load_spec

        current = load_spec(spec_path)
        if current.fingerprint() != frozen.fingerprint():
            raise UserError(
                f"{spec_path}: differs from the spec frozen in {run_dir}; resume continues the original search, start a new run for a changed spec"
            )
    Search(preflight(frozen, str(run_dir / SPEC_FILE)), run_dir, address, progress).run()
    return run_dir
