"""In-process stand-ins for the search's Ray workers: the real `Scheduler` and `Search`, no Ray, no model.

`FakeWorker.evaluate` answers like `MergeWorker.evaluate`, with a score that is a pure function of
the merge config, so a resumed search must reproduce an uninterrupted one exactly. It is the fake
that wrote the frozen run in tests/fixtures/runs/v0-cmaes (trial 5 fails there). `FakeCalls` is the
scheduler's `WorkerCalls` over such workers: one call finishes per poll, in submission order, and a
worker dies (raises `WorkerDied`) on every candidate `kills(trial_id)` names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from evomerge.evaluation.fidelity import RaceTarget
from evomerge.rundir.events import TrialResult
from evomerge.search.scheduler import Scheduler, WorkerDied

NUM_LAYERS = 4  # of the base model the fake specs pretend to have
FIXTURE_RUNS = Path(__file__).parent / "fixtures" / "runs"
FAILING_TRIAL = 5
FAKE_DOCS = 32  # search docs per candidate


def fake_spec_data(runs_dir: Path, name: str, **sections) -> dict:
    """The spec of the frozen v0-cmaes run: TIES over two experts that never existed, CMA-ES, held-out tasks."""
    return {
        "name": name,
        "runs_dir": str(runs_dir),
        "models": {"base": "/frozen-run/base", "experts": ["/frozen-run/expert_a", "/frozen-run/expert_b"]},
        "merge": {"method": "ties"},
        "genome": {"layer_groups": 2},
        "optimizer": {"name": "cmaes", "seed": 7, "popsize": 4},
        "evaluation": {
            "include": ["/frozen-run/evals"],
            "tasks": ["tiny_add"],
            "heldout_tasks": ["tiny_choice"],
            "limit": 32,
            "seed": 3,
            "batch_size": 16,
            "top_k": 2,
        },
        "budget": {"max_evals": 19},
        "workers": {"count": 1},
        **sections,
    }


def fake_prepared(spec):
    """What preflight would return for `spec`, without reading a model folder or a task file."""
    from evomerge.genome import Genome
    from evomerge.preflight import Prepared, baseline_configs

    eval_sets = {"search": None, **({"heldout": None} if spec.evaluation.heldout_tasks else {})}
    baselines = baseline_configs(spec) if spec.budget.baselines else []
    return Prepared(spec, Genome(spec, NUM_LAYERS), {}, eval_sets, baselines)


def open_search(spec, run_dir, inputs: dict[str, str] | None = None, **options):
    """A Search on `run_dir` whose input fingerprints are `inputs` (there are no files to hash)."""
    from evomerge.search.loop import Search

    search = Search(fake_prepared(spec), run_dir, progress=False, **options)
    search.current_inputs = lambda: dict(inputs or {})
    return search


def fake_score(merge_config: dict, eval_set: str = "search") -> float:
    values = list(_floats(merge_config))
    score = round(1.0 / (1.0 + sum((v - 0.3) ** 2 for v in values)), 6)
    return round(score * 0.9, 6) if eval_set == "heldout" else score


class FakeWorker:
    """`rungs` (cumulative doc shares, as `evaluation.fidelity.rungs`) makes it race its search
    results with the real `fidelity.race`, every slice scoring the candidate's pure score."""

    def __init__(
        self,
        worker_id: str,
        score: Callable[[int, dict, str], float] | None = None,
        rungs: tuple[float, ...] | None = None,
        z: float = 2.0,
    ):
        self.worker_id = worker_id
        self.score = score or (lambda trial, config, eval_set: fake_score(config, eval_set))
        self.rungs, self.z = rungs, z
        self.dead = False

    def evaluate(
        self, trial_id: int, merge_config: dict, eval_set: str = "search", race: RaceTarget | None = None
    ) -> TrialResult:
        if trial_id == FAILING_TRIAL and eval_set == "search":
            reason = "merged weights are not finite (model.norm.weight)"
            return TrialResult.failure(trial_id, reason, worker=self.worker_id, seconds=0.5)
        score = self.score(trial_id, merge_config, eval_set)
        task = "tiny_add" if eval_set == "search" else "tiny_choice"
        outcome = self._race(task, score, race) if self.rungs and eval_set == "search" else None
        return TrialResult(
            trial=trial_id,
            ok=True,
            score=outcome.result.score if outcome else score,
            metrics=outcome.result.metrics if outcome else {task: score},
            n_docs=outcome.result.n_docs if outcome else {task: FAKE_DOCS},
            rungs=outcome.rungs_scored if outcome else None,
            stopped_early=(outcome.stopped_early or None) if outcome else None,
            rung_scores=list(outcome.rung_scores) if outcome else None,
            worker=self.worker_id,
            merge_s=0.01,
            prepare_s=0.002,
            merge_path="reference",
            eval_s=0.2,
            subset="5d41402abc4b2a76",
        )

    def _race(self, task: str, score: float, target: RaceTarget | None):
        from evomerge.evaluation.fidelity import race
        from evomerge.evaluation.scores import EvalResult

        assert self.rungs is not None
        ends = [math.ceil(share * FAKE_DOCS) for share in self.rungs]
        sizes = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]
        slices = [EvalResult(score, {task: score}, {task: size}, 0.1) for size in sizes]
        return race(slices.__getitem__, len(slices), {task: 1.0}, target, self.z)


class FakeReference:
    """What `submit` hands back; identity-hashed like a Ray ObjectRef."""

    def __init__(self, actor: FakeWorker, job):
        self.actor, self.job = actor, job


class FakeCalls:
    def __init__(
        self,
        kills: Callable[[int], bool] = lambda trial: False,
        on_poll: Callable[[], None] | None = None,
        charged: bool = True,
    ):
        self.kills = kills
        self.on_poll = on_poll or (lambda: None)
        self.charged = charged  # False: the deaths are lost connections to the worker's node
        self.deaths = 0

    def submit(self, actor: FakeWorker, job) -> FakeReference:
        return FakeReference(actor, job)

    def wait(self, references: list, timeout: float) -> list:
        self.on_poll()
        return references[:1]

    def result(self, reference: FakeReference) -> TrialResult:
        job = reference.job
        if reference.actor.dead or self.kills(job.trial_id):
            reference.actor.dead = True
            self.deaths += 1
            if not self.charged:
                raise WorkerDied("ActorUnavailableError: connection reset by peer", charged=False)
            raise WorkerDied("ActorDiedError: the worker process died (SIGKILL)")
        return reference.actor.evaluate(job.trial_id, job.merge_config, job.eval_set, job.race)

    def kill(self, actor: FakeWorker) -> None:
        actor.dead = True


def fake_scheduler(
    calls: FakeCalls | None = None, workers: int = 1, queue_depth: int = 2, score=None, rungs=None
) -> Scheduler:
    generation = iter(range(1_000_000))
    return Scheduler(
        lambda index: FakeWorker(f"w{index}@fake:{next(generation)}", score, rungs),
        workers,
        queue_depth,
        calls or FakeCalls(),
    )


def _floats(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _floats(item)
    elif isinstance(value, list):
        for item in value:
            yield from _floats(item)
