"""CMA-ES (the ``cma`` package) behind the ask/tell contract, with or without a generation barrier.

Design choices:

* **Unit box.** cma works in ``[0, 1]^n`` and we rescale to ``[lower, upper]`` on the way
  out. cma's ``sigma0`` is a single scalar, so without rescaling a coordinate spanning
  ``[0, 2]`` and one spanning ``[0.1, 0.2]`` would get the same absolute step size; in the
  unit box ``sigma0`` is uniformly "a fraction of each coordinate's range". Bounds are
  then cma's own ``BoundTransform`` (the default for ``bounds``): every sample is a valid
  point, and cma keeps the unrepaired genotype internally so its update stays unbiased,
  which neither clipping nor a penalty would give us.
* **Own random stream.** cma's ``seed`` option seeds numpy's *global* RNG (and 0 means
  "seed from the clock"), which anything else in the process can advance and which a
  pickle of the strategy does not capture. Passing cma a ``randn`` bound to a private
  ``numpy.random.Generator`` makes the samples depend on ``seed`` only, makes seed 0 an
  ordinary seed, and puts the RNG state inside the pickled strategy.
* **Seeded points via ``inject(force=True)``.** x0 and enqueued points become the first
  solutions of the next generation through cma's documented injection path (telling cma
  foreign solutions directly is unsafe with active covariance updates). Points enqueued
  while a generation is in flight wait for the next generation, because cma has already
  sampled the current one.
* **Failures.** cma minimizes and only ranks, so a failed trial is told as a value worse
  than every finite value seen so far in the whole run.
* **No idle workers (``overlap``).** With the barrier, workers idle at the end of every
  generation while its stragglers finish (mergekit-evolve's issue #532). With ``overlap`` on,
  ``ask`` never waits: it keeps sampling the current distribution, and each generation is told
  the first ``popsize`` results of points sampled from it, in the order they were told; results
  of an older generation's stragglers arrive after its update and are not told to cma. The
  asks are still a pure function of the ask/tell sequence, which the journal records, so resume
  replays them exactly, but two fresh runs of one seed differ when their results arrive in a
  different order. Runs created before it (search version 1) keep the barrier, and a snapshot
  pickled then has no ``overlap`` setting; from version 2 it is on unless the spec says
  `optimizer.overlap: false` (`CMAESSettings.overlaps`).
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

import cma
import numpy as np

from evomerge.optim.base import Optimizer, Problem
from evomerge.optim.settings import CMAESSettings


class _PrivateNormal:
    """cma ``randn`` replacement drawing from a private, picklable generator."""

    def __init__(self, seed: int):
        self.generator = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.generator.standard_normal(shape)


class CMAESOptimizer(Optimizer):
    """CMA-ES; with the barrier (the default) ``ask`` returns None until the generation is told."""

    name: ClassVar[str] = "cmaes"

    def __init__(self, settings: CMAESSettings, problem: Problem):
        resolved = {
            "popsize": settings.popsize,  # None = cma's default, 4 + floor(3 ln n)
            "sigma0": settings.sigma0,
            "overlap": settings.overlaps(problem.search_version),
        }
        super().__init__(problem, settings.seed, resolved)
        self._width = self.upper - self.lower
        self._es = cma.CMAEvolutionStrategy(self._to_unit(self.x0), float(self.settings["sigma0"]), self._cma_options())
        self._queue: deque[np.ndarray] = deque([self.x0])  # the method's default recipe is always scored
        self._unit_solutions: list[np.ndarray] | None = None  # exactly what cma asked, for its tell
        self._points: list[np.ndarray] = []
        self._scores: list[float | None] = []
        self._slot_of_trial: dict[int, int] = {}  # pending trials of the current generation
        self._handed_out = 0
        self._worst_cma_value: float | None = None
        self.generation = 0
        # Overlap mode: trial -> (generation, unit solution), and the current generation's results.
        self._sampled_in: dict[int, tuple[int, np.ndarray]] = {}
        self._told: list[tuple[np.ndarray, float | None]] = []

    @property
    def popsize(self) -> int:
        return int(self._es.popsize)

    @property
    def block_size(self) -> int:
        return self.popsize

    def _cma_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "bounds": [0.0, 1.0],
            "randn": _PrivateNormal(self.seed),
            "seed": np.nan,  # nan = cma leaves numpy's global RNG alone
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,  # otherwise cma writes outcmaes/ into the working directory
        }
        if self.settings["popsize"] is not None:
            options["popsize"] = int(self.settings["popsize"])
        if self.settings.get("overlap"):
            # cma's TPA step size (its choice for some dimensions) needs the first two samples of a
            # generation's first ask told first; told in finishing order they are not, CSA needs nothing.
            from cma.sigma_adaptation import CMAAdaptSigmaCSA

            options["AdaptSigma"] = CMAAdaptSigmaCSA
        return options

    def _to_unit(self, x: np.ndarray) -> np.ndarray:
        return (x - self.lower) / self._width

    def _from_unit(self, u: np.ndarray) -> np.ndarray:
        return self.lower + np.asarray(u, dtype=np.float64) * self._width

    def _enqueue_point(self, x: np.ndarray) -> None:
        self._queue.append(x)

    @property
    def _overlapping(self) -> bool:
        return bool(self.settings.get("overlap", False))

    def _propose(self, trial_id: int) -> np.ndarray | None:
        if self._overlapping:
            return self._propose_without_barrier(trial_id)
        if self._unit_solutions is None:
            self._start_generation()
        slot = self._handed_out
        if slot == len(self._points):
            return None
        self._handed_out += 1
        self._slot_of_trial[trial_id] = slot
        return self._points[slot]

    def _observe(self, trial_id: int, x: np.ndarray, score: float | None) -> None:
        if self._overlapping:
            self._observe_without_barrier(trial_id, score)
            return
        slot = self._slot_of_trial.pop(trial_id)
        self._scores[slot] = score
        if self._handed_out == len(self._points) and not self._slot_of_trial:
            self._finish_generation()

    def _propose_without_barrier(self, trial_id: int) -> np.ndarray:
        if self._unit_solutions is None or self._handed_out == len(self._points):
            self._start_generation()  # a fresh batch from the current distribution, seeds first
        slot = self._handed_out
        self._handed_out += 1
        assert self._unit_solutions is not None
        self._sampled_in[trial_id] = (self.generation, self._unit_solutions[slot])
        return self._points[slot]

    def _observe_without_barrier(self, trial_id: int, score: float | None) -> None:
        generation, unit = self._sampled_in.pop(trial_id)
        if generation != self.generation:
            return  # a straggler of a generation already told: its distribution is gone
        self._told.append((unit, score))
        if len(self._told) == self.popsize:
            self._scores = [s for _, s in self._told]
            self._unit_solutions = [u for u, _ in self._told]
            self._told = []
            self._finish_generation()

    def _reattach(self) -> None:
        from cma.utilities.utils import SolutionDict

        for archive in vars(self._es).values():
            if isinstance(archive, SolutionDict):
                _rekey_solution_archive(archive)

    def _start_generation(self) -> None:
        seeded = [self._queue.popleft() for _ in range(min(len(self._queue), self.popsize))]
        if seeded:
            # Injected solutions are genotypes; inverting the bound transform makes cma's
            # phenotype for them land on the seeded point.
            self._es.inject([self._es.boundary_handler.inverse(self._to_unit(p)) for p in seeded], force=True)
        self._unit_solutions = self._es.ask()
        # Seeded points are handed out verbatim rather than round-tripped through the
        # unit box, so a recipe the user wrote is evaluated bit-for-bit as written.
        sampled = [self._from_unit(u) for u in self._unit_solutions[len(seeded) :]]
        self._points = seeded + sampled
        self._scores = [None] * len(self._points)
        self._handed_out = 0

    def _finish_generation(self) -> None:
        # cma minimizes, so scores are negated.
        finite = [-s for s in self._scores if s is not None]
        if finite:
            worst_now = max(finite)
            self._worst_cma_value = (
                worst_now if self._worst_cma_value is None else max(self._worst_cma_value, worst_now)
            )
        penalty = _failure_penalty(self._worst_cma_value)
        values = [penalty if s is None else -s for s in self._scores]
        # The exact arrays cma handed out, so it finds their unrepaired genotypes.
        self._es.tell(self._unit_solutions, values)
        self.generation += 1
        self._unit_solutions = None
        self._points, self._scores = [], []


def create(settings: CMAESSettings, problem: Problem) -> CMAESOptimizer:
    """CMA-ES as the spec's `optimizer:` section sets it."""
    return CMAESOptimizer(settings, problem)


def _rekey_solution_archive(solutions) -> None:
    """cma keys solutions by hash(x.tobytes()), which Python salts per process: after unpickling
    in another process every lookup would miss, so rebuild the keys with this process's hash."""
    data, same_key, originals = solutions.data, solutions.data_with_same_key, solutions._unhashed_keys
    solutions.data, solutions.data_with_same_key, solutions._unhashed_keys = {}, {}, {}
    for old_key, value in data.items():
        x = originals.get(old_key, old_key)
        new_key = solutions.key(x)
        solutions.data[new_key], solutions._unhashed_keys[new_key] = value, x
        if old_key in same_key:
            solutions.data_with_same_key[new_key] = same_key[old_key]


def _failure_penalty(worst_value: float | None) -> float:
    """A cma value (minimized) strictly worse than ``worst_value``, with a margin that
    survives float rounding at any magnitude."""
    if worst_value is None:
        return 0.0  # nothing finite seen yet: all failures tie, which is all cma can learn
    return worst_value + max(1.0, abs(worst_value))
