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
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from evomerge.evaluation.fidelity import RaceTargets
from evomerge.evaluation.hub_data import pin_datasets, revisions_from_fingerprints
from evomerge.evaluation.scores import task_weights
from evomerge.optim import Problem, build_optimizer
from evomerge.preflight import Prepared
from evomerge.rundir.events import EventName, TrialResult
from evomerge.rundir.journal import Journal
from evomerge.rundir.layout import RunDir
from evomerge.rundir.ledger import TIES_FIELD, Ledger, rate_per_min
from evomerge.rundir.pareto import objective_values
from evomerge.rundir.trials import Trial
from evomerge.search.budget import docs_spent_of, refuse_a_broken_setup
from evomerge.search.heldout import rescore_heldout
from evomerge.search.inputs import checked_inputs, input_fingerprints
from evomerge.search.phases import LAYERS, Phases, layer_prepared
from evomerge.search.progress import ProgressMode, ProgressSettings, SearchProgress
from evomerge.search.replay import restore_optimizer
from evomerge.search.runs import create_run_dir
from evomerge.search.scheduler import Job, Scheduler
from evomerge.search.selection import best_expressible_baseline, seeds_worth_trying
from evomerge.search.study_log import StudyLog, study_shape
from evomerge.search.tracking import Tracker

__all__ = ["Search", "create_run_dir"]
LOG = logging.getLogger(__name__)


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
        ledger: Ledger | None = None,
    ):
        self.prepared = prepared
        self.spec = prepared.spec
        self.rundir = RunDir.of(run_dir)
        self.run_dir = self.rundir.root
        self.address = address
        self.show_progress = progress
        self.accept_changed_inputs = accept_changed_inputs
        # The run's ledger (resume hands over the one it read); the journal keeps its events in step.
        self.ledger = ledger or Ledger.read(self.rundir, for_search=True)
        self.journal = Journal(self.rundir, self.ledger)
        try:
            self.events, self.trials = self.ledger.events, self.ledger.trials
            # (label, x) of the baselines handed to the optimizer; None until chosen (_seed_optimizer).
            self.seeds = self.ledger.seeds if self.spec.budget.baselines else []
            self.tally = self.ledger.tally
            self.phases = Phases(prepared, self.rundir, self.ledger)  # one space: inactive
            if self.phases.current == LAYERS:
                self.prepared, self.seeds = self.phases.layer_prepared, self.phases.seeds
            self.optimizer = self._restore_optimizer()
            self.race_targets = RaceTargets.of_trials(self.spec, self.optimizer.block_size, self.trials)
            self.docs_spent = docs_spent_of(self.trials, self.optimizer.block_size)
            self.tracker = Tracker(self.spec, self.run_dir)
            self.study_log = StudyLog(
                self.rundir.optuna_log, study_shape(prepared, self.rundir, self.phases.layer_prepared)
            )
        except BaseException:
            self.journal.close()  # frees the run's lock for another attempt in this process
            raise
        self.tells_since_snapshot = 0
        self.deaths_in_a_row = 0  # candidates failed one after another because their workers died
        self.searched_before = self.ledger.search_seconds
        self.result_clock = self.ledger.result_clock  # what the status lines' evals/min read
        self._search_started: float | None = None

    def _new_optimizer(self):
        genome, objectives = self.prepared.genome, len(self.spec.evaluation.objectives)
        choice = getattr(genome, "choice", None)  # a method gene (genome_multi.py)
        problem = Problem(genome.lower, genome.upper, genome.x0(), max(1, objectives), self.spec.version, choice)
        return build_optimizer(self.spec.optimizer, problem)

    def _budget_spent(self) -> bool:
        """Whether the next optimizer ask is over `budget.max_evals` or `budget.max_docs`."""
        budget = self.spec.budget
        if self.tally.asked >= (budget.max_evals or math.inf) or self.phases.params_spent(self.tally):
            return True
        return budget.max_docs is not None and not self.docs_spent.fits(self.optimizer.next_trial_id, budget.max_docs)

    def _restore_optimizer(self):
        if self.phases.change is None:
            return restore_optimizer(self.rundir, self.events, self.trials, self._new_optimizer)
        # The layer phase's optimizer saw only the events after the change.
        new_optimizer = self.phases.layer_optimizer(self._new_optimizer)
        return restore_optimizer(self.rundir, self.events, self.trials, new_optimizer, self.phases.change_at + 1)

    def run(self) -> dict[int, Trial]:
        """Check the inputs, start Ray (a local cluster unless `address`) and the workers, search."""
        # The driver's numpy work (CMA-ES eigendecompositions) is small; extra BLAS threads only
        # fight the workers for cores.
        from threadpoolctl import threadpool_limits

        from evomerge.search.cluster import ClusterSession, keep_ray_logs_in, make_actor_factory

        session = ClusterSession(self.spec, self.address)
        try:
            if self._finished_already():
                return self.trials
            inputs = self._checked_inputs()
            # Workers read each hub dataset at the commit the fingerprints hold, wherever the hub moves.
            pinned = pin_datasets(self.prepared.eval_sets, revisions_from_fingerprints(inputs))
            self.prepared = replace(self.prepared, eval_sets=pinned)
            threadpool_limits(1)
            self.phases.materialize_winner()  # a layer phase's workers load it
            session.open()
            keep_ray_logs_in(self.rundir.ray_log)
            calls = session.watched_calls(self.run_dir)  # a lost cluster ends the search in one line

            def workers_for(prepared: Prepared) -> Scheduler:
                factory, count = make_actor_factory(prepared, prepared.spec)
                return Scheduler(factory, count, self.spec.workers.queue_depth, calls=calls)

            self._search_and_finish(workers_for(self.prepared), inputs, workers_for)
        finally:
            self.close()
            session.close()
        return self.trials

    def run_with(
        self, scheduler: Scheduler, workers_for: Callable[[Prepared], Scheduler] | None = None
    ) -> dict[int, Trial]:
        """The same search on workers the caller started (tests and benchmarks: in-process ones);
        `workers_for` starts a params_then_layers run's layer-phase workers."""
        try:
            if not self._finished_already():
                self.phases.materialize_winner()
                self._search_and_finish(scheduler, self._checked_inputs(), workers_for)
        finally:
            self.close()
        return self.trials

    def _finished_already(self) -> bool:
        """A finished run given no more budget: nothing to search or re-score, so no workers start."""
        if not self.ledger.finished_for_good:
            return False
        if ProgressSettings.of(self.show_progress).mode != ProgressMode.QUIET:
            print(
                f"{self.run_dir}: the run has finished; nothing to resume (give --max-evals, --time-limit-min or --max-docs for more)",
                file=sys.stderr,
                flush=True,
            )
        return True

    def close(self) -> None:
        self.tracker.close()
        self.journal.close()

    def _search_and_finish(
        self, scheduler: Scheduler, inputs: dict[str, str], workers_for: Callable[[Prepared], Scheduler] | None = None
    ) -> None:
        try:
            genes = [row.to_json() for row in self.prepared.genome.gene_table()]  # what the report's heatmaps read
            self.journal.append(
                EventName.RUN_STARTED,
                spec_fingerprint=self.spec.fingerprint(),
                workers=len(scheduler.slots),
                genes=genes,
                inputs=inputs,
                **({"models": pins} if (pins := self.prepared.sources.pins()) else {}),
            )
            self.study_log.rebuild(self.events, self.trials)  # every optimizer's optuna.log, never duplicated
            budget = self.spec.budget
            with SearchProgress(
                budget.max_evals,
                self.show_progress,
                self.trials.values(),
                max_docs=budget.max_docs,
                rate=lambda: rate_per_min(self.result_clock),
            ) as progress:
                progress.update(self.tally)
                self._search(scheduler, progress)
                if self.phases.params_spent(self.tally):
                    self._rescore_heldout(scheduler, progress)  # the parameter phase's, on its workers
                    scheduler.shutdown()
                    scheduler = self._change_phase(progress, workers_for)
                    self._search(scheduler, progress)
                ties = self._rescore_heldout(scheduler, progress)
            self._snapshot(wait=True)
            self.study_log.rebuild(self.events, self.trials)  # with held-out scores (the journal kept the events)
            self.journal.append(
                EventName.RUN_FINISHED, completed=self.tally.completed, **({TIES_FIELD: ties} if ties else {})
            )
        finally:
            scheduler.shutdown()

    def current_inputs(self) -> dict[str, str]:
        """Fingerprints of the models and the evaluation files as they are on disk now."""
        models = [self.prepared.sources.source(name) for name in (self.spec.models.base, *self.spec.models.experts)]
        return input_fingerprints(models, self.prepared.eval_sets.values())

    def _checked_inputs(self) -> dict[str, str]:
        """The inputs now; refused (one line naming the file) when they differ from the last start's."""
        return checked_inputs(self.ledger.last_inputs, self.current_inputs(), self.accept_changed_inputs, self.rundir)

    def _searched(self) -> float:
        """Seconds this run has searched: this start's so far plus every earlier start's."""
        now = 0.0 if self._search_started is None else self.clock() - self._search_started
        return self.searched_before + now

    def _search(self, scheduler: Scheduler, progress: SearchProgress) -> None:
        self._search_started = self.clock()
        time_limit = (self.spec.budget.time_limit_min or math.inf) * 60
        pending = [
            Job(t.trial_id, t.merge_config, race=t.race)
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
            refuse_a_broken_setup(self.tally, self.deaths_in_a_row, len(scheduler.slots), self.run_dir)

    def _next_job(self) -> Job | None:
        for label, config in self.prepared.baselines:
            if label not in self.tally.baseline_labels:
                trial_id = -1 - len(self.tally.baseline_labels)
                return self._ask(Trial(trial_id, "baseline", label, config))
        if self._budget_spent() or not self._seed_optimizer():
            return None
        ask = self.optimizer.ask()
        if ask is None:
            return None
        genome = self.prepared.genome
        params = genome.decode(ask.x)
        seeded = next((label for label, point in self.seeds if np.array_equal(point, ask.x)), None)
        config = genome.merge_config_dict(ask.x, params)
        method = [config["merge_method"]] if getattr(genome, "choice", None) else []  # a method gene: named
        notes = self.phases.label_notes() + method + ([f"seeded: {seeded}"] if seeded else [])
        label = f"trial {ask.trial_id}" + (f" ({', '.join(notes)})" if notes else "")
        trial = Trial(ask.trial_id, "optimizer", label, config, params)
        trial.race = self.race_targets.for_trial(ask.trial_id) if self.race_targets else None
        return self._ask(trial, x=[float(v) for v in ask.x])

    def _seed_optimizer(self) -> bool:
        """Once every baseline is scored, hand the optimizer those worth starting from; False until then.

        Seeded: the baselines the genome can express exactly (each parent alone, and linear for
        task arithmetic) that score at least as well as the best default merge. A weaker one
        injected into CMA-ES's first generation only drags its mean toward a poor corner.
        """
        if self.seeds is not None:  # chosen, or [] for a run journaled before seeding existed (the ledger)
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
        self.docs_spent.asked(trial.trial_id)
        record = self.journal.append(
            EventName.ASKED,
            trial=trial.trial_id,
            kind=trial.kind,
            label=trial.label,
            x=x,
            params=trial.params,
            merge_config=trial.merge_config,
            **(trial.race.to_journal() if trial.race else {}),
        )
        self.study_log.asked(trial.trial_id, record["time"])
        return Job(trial.trial_id, trial.merge_config, race=trial.race)

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
        self.result_clock.append((trial.kind == "optimizer", record["search_s"]))
        self.study_log.finished(trial, record["time"])
        self.tally.add_finished(trial)
        self.deaths_in_a_row = self.deaths_in_a_row + 1 if job.gave_up else 0
        self.docs_spent.add(trial.trial_id, result.docs_scored, was_in_flight=True)
        if result.ok:
            self.tracker.log_trial(trial, self.tally.best_score)
            if self.race_targets:
                self.race_targets.add(trial.trial_id, trial.whole_score, result.rung_scores)
        if trial.kind == "optimizer":
            self.optimizer.tell(trial.trial_id, (result.objectives or result.score) if result.ok else None)
            self.tells_since_snapshot += 1
            if self.tells_since_snapshot >= self.spec.optimizer.tells_per_snapshot:
                self._snapshot()

    def _with_objectives(self, result: TrialResult) -> TrialResult:
        if not (result.ok and self.spec.multi_objective and result.metrics is not None):
            return result
        weights = task_weights(self.spec.evaluation.tasks)
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

    def _rescore_heldout(self, scheduler: Scheduler, progress: SearchProgress) -> dict | None:
        """Re-score the baselines and the top-k (of the current phase) on the held-out tasks; the tie report, if any."""
        if "heldout" not in self.prepared.eval_sets:
            return None
        progress.say("re-scoring the top trials and the baselines on the held-out tasks")
        trials = self.phases.trials_of_current(self.trials)
        ties = rescore_heldout(trials, self.spec.evaluation.top_k, scheduler, self._record, progress, self.clock)
        return ties or self.phases.earlier_ties(self.trials, self.spec.evaluation.top_k)

    def _change_phase(self, progress: SearchProgress, workers_for: Callable[[Prepared], Scheduler] | None) -> Scheduler:
        """params_then_layers: journal the parameter winner, build it, and start the layer phase's workers."""
        if workers_for is None:
            raise ValueError("a params_then_layers run needs workers for its layer phase")
        event = self.journal.append(EventName.PHASE_CHANGED, **self.phases.change_fields(self.trials, self.optimizer))
        self.phases.changed(event, len(self.events) - 1)
        # From this start's prepared, so the layer phase reads hub datasets at the revisions run() pinned.
        self.prepared, self.seeds = layer_prepared(self.prepared, self.rundir), self.phases.seeds
        self.optimizer = self.phases.layer_optimizer(self._new_optimizer)()
        progress.say(self.phases.announcement())
        self.phases.materialize_winner()
        return workers_for(self.prepared)


def _finite(result: TrialResult) -> TrialResult:
    """A result holding a NaN or an infinity becomes a failure that names it: the journal never holds NaN."""
    reason = result.non_finite()
    return result.as_failure(reason) if reason else result
