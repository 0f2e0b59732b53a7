"""The search loop: start, resume (= replay the journal), finish.

`runs/NAME/` (see `evomerge.rundir.layout`) holds a frozen copy of the spec, the append-only
journal and optimizer snapshots. Resume rebuilds the optimizer from the journal (`replay.py`: the
last good snapshot plus the ask/tell events after it, or the whole journal), re-queues candidates
that were in flight, and carries on; so a resumed search reaches the state an uninterrupted one
would.

Before any worker starts, the models and evaluation files are fingerprinted (`inputs.py`) and
compared with the fingerprints of the last start; the time limit counts the search time of every
earlier start too (each result journals the search time so far as `search_s`).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from evomerge.errors import UserError
from evomerge.optim import make_optimizer
from evomerge.preflight import Prepared, preflight
from evomerge.rundir.events import EventName, TrialResult
from evomerge.rundir.journal import Journal, read_events
from evomerge.rundir.layout import RunDir
from evomerge.rundir.pareto import objective_values
from evomerge.rundir.trials import Tally, Trial, is_default_merge, replay, search_seconds
from evomerge.rundir.verdict import TIES_FIELD
from evomerge.search.budget import BudgetRequest, effective_spec, extended_spec, journal_budget, requested_budget
from evomerge.search.inputs import first_change, input_fingerprints
from evomerge.search.progress import ProgressSettings, SearchProgress
from evomerge.search.replay import journaled_seeds, restore_optimizer
from evomerge.search.runs import create_run_dir, open_run
from evomerge.search.scheduler import Job, Scheduler
from evomerge.search.study_log import StudyLog, study_shape
from evomerge.search.tracking import Tracker
from evomerge.spec import Spec

__all__ = ["Search", "create_run_dir", "resume_search", "start_search"]
LOG = logging.getLogger(__name__)
TIE_CAP_FACTOR = 2  # trials tied at the top-k cut are re-scored up to 2 x top_k trials in all


class Search:
    """One driver process working on one run directory."""

    clock = staticmethod(time.monotonic)  # the search's wall clock; a test gives it a fake one

    def __init__(
        self,
        prepared: Prepared,
        run_dir: Path | RunDir,
        address: str | None = None,
        progress: bool | ProgressSettings = True,
        accept_changed_inputs: bool = False,
    ):
        self.prepared = prepared
        self.spec = prepared.spec
        self.rundir = RunDir.of(run_dir)
        self.run_dir = self.rundir.root
        self.address = address
        self.show_progress = progress
        self.accept_changed_inputs = accept_changed_inputs
        self.journal = Journal(self.rundir)
        try:
            self.events = read_events(self.journal.path)
            self.journal.count = len(self.events)
            self.trials = replay(self.events)
            # (label, x) of the baselines handed to the optimizer; None until chosen (_seed_optimizer).
            self.seeds = journaled_seeds(self.events) if self.spec.budget.baselines else []
            self.tally = Tally.of(self.trials)
            self.optimizer = self._restore_optimizer()
            self.tracker = Tracker(self.spec, self.run_dir)
            self.study_log = StudyLog(self.rundir.optuna_log, study_shape(prepared, self.rundir))
        except BaseException:
            self.journal.close()  # frees the run's lock for another attempt in this process
            raise
        self.tells_since_snapshot = 0
        self.deaths_in_a_row = 0  # candidates failed one after another because their workers died
        self.searched_before = search_seconds(self.events)
        self._search_started: float | None = None

    def _new_optimizer(self):
        genome = self.prepared.genome
        settings = self.spec.optimizer
        extra = {"popsize": settings.popsize, "sigma0": settings.sigma0} if settings.name == "cmaes" else {}
        if settings.name == "cmaes" and self.spec.version >= 2:
            extra["overlap"] = True  # no generation barrier; version 1 runs keep theirs
        if settings.name in ("tpe", "nsga2"):
            extra = {"objectives": max(1, len(self.spec.evaluation.objectives))}
            if settings.name == "tpe":
                extra["n_startup_trials"] = settings.n_startup_trials
            if settings.popsize and settings.name == "nsga2":
                extra["population_size"] = settings.popsize
        extra = {k: v for k, v in extra.items() if v is not None}
        return make_optimizer(settings.name, genome.lower, genome.upper, genome.x0(), settings.seed, **extra)

    def _restore_optimizer(self):
        return restore_optimizer(self.rundir, self.events, self.trials, self._new_optimizer)

    def run(self) -> dict[int, Trial]:
        """Check the inputs, start Ray (a local cluster unless `address`) and the workers, search."""
        # The driver's numpy work (CMA-ES eigendecompositions) is small; extra BLAS threads only
        # fight the workers for cores.
        from threadpoolctl import threadpool_limits

        from evomerge.search.cluster import ClusterSession, make_actor_factory

        session = ClusterSession(self.spec, self.address)
        try:
            inputs = self._checked_inputs()
            threadpool_limits(1)
            session.open()
            factory, count = make_actor_factory(self.prepared, self.spec)
            calls = session.watched_calls(self.run_dir)  # a lost cluster ends the search in one line
            self._search_and_finish(Scheduler(factory, count, self.spec.workers.queue_depth, calls=calls), inputs)
        finally:
            self.close()
            session.close()
        return self.trials

    def run_with(self, scheduler: Scheduler) -> dict[int, Trial]:
        """The same search on workers the caller started (tests and benchmarks: in-process ones)."""
        try:
            self._search_and_finish(scheduler, self._checked_inputs())
        finally:
            self.close()
        return self.trials

    def close(self) -> None:
        self.tracker.close()
        self.journal.close()

    def _search_and_finish(self, scheduler: Scheduler, inputs: dict[str, str]) -> None:
        try:
            genes = [row.to_json() for row in self.prepared.genome.gene_table()]  # what the report's heatmaps read
            self.journal.append(
                EventName.RUN_STARTED,
                spec_fingerprint=self.spec.fingerprint(),
                workers=len(scheduler.slots),
                genes=genes,
                inputs=inputs,
            )
            self.study_log.rebuild(self.events, self.trials)  # every optimizer's optuna.log, never duplicated
            with SearchProgress(self.spec.budget.max_evals, self.show_progress, self.trials.values()) as progress:
                progress.update(self.tally)
                self._search(scheduler, progress)
                if "heldout" in self.prepared.eval_sets:
                    progress.say("re-scoring the top trials and the baselines on the held-out tasks")
                ties = self._rescore_heldout(scheduler)
            self._snapshot(wait=True)
            self.study_log.rebuild(read_events(self.journal.path, warn=False), self.trials)  # with held-out scores
            self.journal.append(
                EventName.RUN_FINISHED, completed=self.tally.completed, **({TIES_FIELD: ties} if ties else {})
            )
        finally:
            scheduler.shutdown()

    def current_inputs(self) -> dict[str, str]:
        """Fingerprints of the model folders and the evaluation files as they are on disk now."""
        models = [self.spec.models.base, *self.spec.models.experts]
        return input_fingerprints(models, self.prepared.eval_sets.values())

    def _checked_inputs(self) -> dict[str, str]:
        """The inputs now; refused (one line naming the file) when they differ from the last start's."""
        current = self.current_inputs()
        started = [e for e in self.events if e["event"] == EventName.RUN_STARTED and isinstance(e.get("inputs"), dict)]
        # A run journaled before input fingerprints existed has nothing to compare with.
        change = first_change(started[-1]["inputs"], current) if started else None
        if change and not self.accept_changed_inputs:
            raise UserError(
                f"{change}; restore it, or run 'evomerge resume {self.rundir} --accept-changed-inputs' to go on with the changed inputs"
            )
        if change:
            LOG.warning("%s; going on with the changed inputs (--accept-changed-inputs)", change)
        return current

    def _searched(self) -> float:
        """Seconds this run has searched: this start's so far plus every earlier start's."""
        now = 0.0 if self._search_started is None else self.clock() - self._search_started
        return self.searched_before + now

    def _search(self, scheduler: Scheduler, progress: SearchProgress) -> None:
        self._search_started = self.clock()
        time_limit = (self.spec.budget.time_limit_min or math.inf) * 60
        pending = [
            Job(t.trial_id, t.merge_config)
            for t in self.trials.values()
            if t.status == EventName.ASKED and t.kind in ("optimizer", "baseline")
        ]
        scheduler.requeued.extend(pending)
        while True:
            out_of_time = self._searched() > time_limit
            while scheduler.free_slots and not out_of_time:
                job = scheduler.requeued.popleft() if scheduler.requeued else self._next_job()
                if job is None:
                    break
                scheduler.submit(job)
            if scheduler.in_flight == 0:
                return
            for job, result in scheduler.poll(timeout=1.0):
                self._record(job, result)
                progress.update(self.tally, self.trials[job.trial_id])
            progress.update(self.tally)  # a status line per minute even when no result came
            self._stop_if_nothing_works(scheduler)

    def _stop_if_nothing_works(self, scheduler: Scheduler) -> None:
        """Every evaluation so far failed, or workers died on every recent candidate: the setup is
        broken, not the candidates; say why and stop."""
        tally, enough = self.tally, max(6, 3 * len(scheduler.slots))
        if tally.completed == 0 and tally.failed >= enough:
            raise UserError(
                f"the first {tally.failed} evaluations all failed (last: {tally.last_failure}); fix the cause and run 'evomerge resume {self.run_dir}'"
            )
        if self.deaths_in_a_row >= enough:
            raise UserError(
                f"workers died on each of the last {self.deaths_in_a_row} candidates (last: {tally.last_failure}); fix what kills them (memory, a model or task file), then run 'evomerge resume {self.run_dir}'"
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
        if any(t.status == EventName.ASKED for t in baselines):
            return False
        genome = self.prepared.genome
        if self.spec.version >= 2:
            self.seeds = best_expressible_baseline(genome.baseline_points(), baselines, genome.x0())
        else:
            self.seeds = seeds_worth_trying(genome.baseline_points(), baselines)
        seeds = [{"label": label, "x": [float(v) for v in x]} for label, x in self.seeds]
        self.journal.append(EventName.SEEDED, seeds=seeds)
        for _, x in self.seeds:
            self.optimizer.enqueue(x)
        return True

    def _ask(self, trial: Trial, x: list | None = None) -> Job:
        self.trials[trial.trial_id] = trial
        self.tally.add_asked(trial)
        record = self.journal.append(
            EventName.ASKED,
            trial=trial.trial_id,
            kind=trial.kind,
            label=trial.label,
            x=x,
            params=trial.params,
            merge_config=trial.merge_config,
        )
        self.study_log.asked(trial.trial_id, record["time"])
        return Job(trial.trial_id, trial.merge_config)

    def _record(self, job: Job, result: TrialResult) -> None:
        trial = self.trials[job.trial_id]
        if job.eval_set == "heldout":
            trial.heldout = _finite(result)
            self.journal.append(EventName.HELDOUT, **trial.heldout.to_journal())
            return
        result = _finite(self._with_objectives(result))
        trial.status = EventName.COMPLETED if result.ok else EventName.FAILED
        trial.result = result
        record = self.journal.append(trial.status, **result.to_journal(), search_s=round(self._searched(), 3))
        self.study_log.finished(trial, record["time"])
        self.tally.add_finished(trial)
        self.deaths_in_a_row = self.deaths_in_a_row + 1 if job.gave_up else 0
        if result.ok:
            self.tracker.log_trial(trial, self.tally.best_score)
        if trial.kind == "optimizer":
            self.optimizer.tell(trial.trial_id, (result.objectives or result.score) if result.ok else None)
            self.tells_since_snapshot += 1
            if self.tells_since_snapshot >= (self.spec.optimizer.popsize or 10):
                self._snapshot()

    def _with_objectives(self, result: TrialResult) -> TrialResult:
        if not (result.ok and self.spec.multi_objective and result.metrics is not None):
            return result
        weights = {t.name: t.weight for t in self.spec.evaluation.tasks}
        return replace(result, objectives=objective_values(result.metrics, self.spec.evaluation.objectives, weights))

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

    def _rescore_heldout(self, scheduler: Scheduler) -> dict | None:
        """Re-score the baselines and the top-k on the held-out tasks; returns the tie report, if any."""
        if "heldout" not in self.prepared.eval_sets:
            return None
        chosen, ties = heldout_candidates(self.trials, self.spec.evaluation.top_k)
        jobs = [Job(t.trial_id, t.merge_config, "heldout") for t in chosen if t.heldout is None]
        while jobs or scheduler.in_flight or scheduler.requeued:
            jobs.extend(scheduler.requeued)
            scheduler.requeued.clear()
            while jobs and scheduler.free_slots:
                scheduler.submit(jobs.pop(0))
            for job, result in scheduler.poll(timeout=1.0):
                self._record(job, result)
        return ties


def heldout_candidates(trials: dict[int, Trial], top_k: int) -> tuple[list[Trial], dict | None]:
    """Every completed baseline plus the top-k completed optimizer trials by search score.

    Trials tied with the k-th on the search score are all re-scored too, up to TIE_CAP_FACTOR x
    top_k trials in all (past the cap, the lowest trial ids): cutting a tie silently would pick
    by age, not merit. The second value reports the tie ({score, top_k, cap, tied, rescored,
    skipped}) for the journal and the verdict; None when nothing tied across the cut.
    """
    done = [t for t in trials.values() if t.status == EventName.COMPLETED]
    searched = sorted((t for t in done if t.kind == "optimizer"), key=lambda t: (-t.score, t.trial_id))
    chosen, ties = searched[:top_k], None
    if 0 < top_k < len(searched) and searched[top_k].score == searched[top_k - 1].score:
        cut = searched[top_k - 1].score
        above = [t for t in searched if t.score > cut]
        tied = [t for t in searched if t.score == cut]
        cap = TIE_CAP_FACTOR * top_k
        rescored = tied[: max(0, cap - len(above))]
        chosen = above + rescored
        ties = {"score": cut, "top_k": top_k, "cap": cap, "tied": len(tied), "rescored": len(rescored)}
        ties["skipped"] = len(tied) - len(rescored)
    return [t for t in done if t.kind == "baseline"] + chosen, ties


def seeds_worth_trying(points: list[tuple[str, np.ndarray]], baselines: list[Trial]) -> list[tuple[str, np.ndarray]]:
    """The expressible baselines that scored at least as well as every default merge."""
    scores = {t.label: t.score for t in baselines if t.status == EventName.COMPLETED}
    merges = [score for label, score in scores.items() if is_default_merge(label)]
    bar = max(merges, default=-math.inf)
    return [(label, x) for label, x in points if label in scores and scores[label] >= bar]


def best_expressible_baseline(
    points: list[tuple[str, np.ndarray]], baselines: list[Trial], x0: np.ndarray
) -> list[tuple[str, np.ndarray]]:
    """Version 2's seed: the best-scoring baseline the space expresses (the base included), unless
    it is x0, which the optimizer asks first anyway."""
    scores = {t.label: t.score for t in baselines if t.status == EventName.COMPLETED}
    scored = [(label, x) for label, x in points if label in scores]
    if not scored:
        return []
    label, x = max(scored, key=lambda item: scores[item[0]])  # the first of equals, in the genome's order
    return [] if np.array_equal(x, x0) else [(label, x)]


def _finite(result: TrialResult) -> TrialResult:
    """A result holding a NaN or an infinity becomes a failure that names it: the journal never holds NaN."""
    reason = result.non_finite()
    return result.as_failure(reason) if reason else result


def start_search(
    spec: Spec, address: str | None = None, progress: bool | ProgressSettings = True, source: str = "spec"
) -> Path:
    from evomerge.search.cluster import ClusterSession

    prepared = preflight(spec, source)
    _check_local_devices(spec, address, source)
    _refuse_unusable_run_dir(spec)
    # Ray before the run directory: a failed connect leaves no empty run blocking the name.
    with ClusterSession(spec, address):
        run_dir = create_run_dir(spec)
        Search(prepared, run_dir, address, progress).run()
    return run_dir


def _refuse_unusable_run_dir(spec: Spec) -> None:
    """What create_run_dir would refuse, found before Ray takes its seconds to start."""
    run = RunDir.inside(spec.runs_dir, spec.name)
    if run.journal.exists():
        create_run_dir(spec)  # refuses an existing run with its own line, before writing anything
    existing = next(folder for folder in (run.root, *run.root.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"runs_dir: cannot write {run.root} ({existing} is not a writable folder); choose a writable runs_dir"
        )


def _check_local_devices(spec: Spec, address: str | None, source: str) -> None:
    """A local run that asks for CUDA on a machine without it fails before any run dir exists."""
    if address is None and spec.workers.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"{source}: workers.device: cuda was asked for but this machine has no GPU; use device: cpu or auto, or --address a GPU cluster"
            )


def resume_search(
    run_dir: Path,
    address: str | None = None,
    progress: bool | ProgressSettings = True,
    spec_path: Path | None = None,
    accept_changed_inputs: bool = False,
    budget: BudgetRequest | None = None,
) -> Path:
    """Continue a run, with a larger `budget` if asked; refused when its frozen spec, or (unless
    accepted) its inputs, changed, or when a given spec differs from it beyond the budget."""
    run, frozen, events = open_run(Path(run_dir).resolve())
    spec = effective_spec(frozen, events)
    request = budget or BudgetRequest()
    if spec_path is not None:
        from evomerge.spec import load_spec

        from_file = requested_budget(load_spec(spec_path), spec, str(spec_path))
        request = request if not request.empty else from_file  # the flags win over the file
    asked = sum(1 for e in events if e["event"] == EventName.ASKED)
    extended = extended_spec(spec, request, asked)
    prepared = preflight(extended, str(run.spec))
    journal_budget(run, spec, extended)
    Search(prepared, run, address, progress, accept_changed_inputs=accept_changed_inputs).run()
    return run.root
