"""The ask/tell contract every search optimizer implements, plus the bookkeeping they share.

The search maximizes a score over a flat float genome inside a box ``[lower, upper]``
(a `Problem`). Subclasses only decide *what* to propose (``_propose``), *how* to learn from a
finished trial (``_observe``) and *where* seeded points go (``_enqueue_point``); trial ids,
pending tracking, input validation, failure normalisation and snapshots live here so that the
optimizers cannot drift apart on the contract. Each optimizer's module has a ``create(settings,
problem)`` factory taking its typed settings (`evomerge.optim.settings`).

Determinism is part of the contract: an optimizer's asks are a pure function of its
constructor arguments and the sequence of ask/tell/enqueue calls, because resuming a run is
``restore(snapshot)`` followed by replaying the journaled calls made after it.
"""

from __future__ import annotations

import math
import pickle
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from evomerge.optim.choice import MethodChoice

# Bumped whenever the pickled layout changes incompatibly, so an old run directory fails
# loudly on resume instead of continuing with a silently different search.
SNAPSHOT_FORMAT = 1


@dataclass(frozen=True)
class Problem:
    """What every optimizer is built for: the box, the first point, how many scores a trial has,
    and the search version whose defaults apply (CMA-ES's barrier)."""

    lower: np.ndarray
    upper: np.ndarray
    x0: np.ndarray
    objectives: int = 1
    search_version: int = 1
    choice: MethodChoice | None = None  # a method gene and each method's genes (`choice.py`)


@dataclass(frozen=True)
class Ask:
    """One candidate to evaluate: ``trial_id`` is unique per optimizer, 0, 1, 2, ... in ask order."""

    trial_id: int
    x: np.ndarray


def is_failed_score(score) -> bool:
    """True for the scores that mean "this trial produced no usable measurement".

    A multi-objective score (a sequence) has failed when any of its values is not finite.
    """
    if score is None:
        return True
    if isinstance(score, (list, tuple, np.ndarray)):
        return len(score) == 0 or any(not math.isfinite(float(v)) for v in score)
    return not math.isfinite(float(score))


def normalized_score(score):
    """None for a failed trial, a float, or a list of floats for several objectives."""
    if is_failed_score(score):
        return None
    if isinstance(score, (list, tuple, np.ndarray)):
        return [float(v) for v in score]
    return float(score)


class Optimizer(ABC):
    """Ask/tell optimizer over a box; higher scores are better.

    ``ask()`` returns ``None`` when the optimizer cannot propose anything until outstanding
    trials are told (for example CMA-ES at a generation boundary).
    """

    name: ClassVar[str]
    choice: MethodChoice | None = None  # a class default: snapshots pickled before method genes lack it

    def __init__(self, problem: Problem, seed: int, settings: dict[str, Any]):
        self.lower, self.upper = _validated_box(problem.lower, problem.upper)
        self.seed = _validated_seed(seed)
        # The resolved settings as plain values: snapshots pickle them, so they outlive model renames.
        self.settings = settings
        self.x0 = self._validated_point(problem.x0, "x0")
        if problem.choice is not None:
            self.choice = problem.choice
        self._next_trial_id = 0
        self._pending: dict[int, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self.lower.size

    @property
    def block_size(self) -> int:
        """Asks whose results are told together (a CMA-ES generation); 1 for an asynchronous optimizer."""
        return 1

    @property
    def next_trial_id(self) -> int:
        """The id the next successful `ask` returns."""
        return self._next_trial_id

    @property
    def pending(self) -> set[int]:
        """Trial ids that were asked but not yet told."""
        return set(self._pending)

    def start_trial_ids_at(self, first: int) -> None:
        """Number this optimizer's asks from `first` (a second optimizer in one run, before its first ask)."""
        if self._next_trial_id or self._pending:
            raise ValueError(f"{self.name}: trial ids can only be moved before the first ask")
        self._next_trial_id = first

    def ask(self) -> Ask | None:
        trial_id = self._next_trial_id
        x = self._propose(trial_id)
        if x is None:
            return None
        # Guards against floating-point drift from unit-box rescaling; a no-op for exact points.
        x = np.clip(np.asarray(x, dtype=np.float64), self.lower, self.upper)
        self._next_trial_id += 1
        self._pending[trial_id] = x
        return Ask(trial_id=trial_id, x=x.copy())

    def tell(self, trial_id: int, score) -> None:
        """Record a trial's score; ``None``/NaN/inf mark a failed trial and never raise."""
        if trial_id not in self._pending:
            state = "was already told" if 0 <= trial_id < self._next_trial_id else "was never asked"
            raise ValueError(f"{self.name}: tell for trial {trial_id}, which {state}")
        x = self._pending.pop(trial_id)
        self._observe(trial_id, x, normalized_score(score))

    def enqueue(self, x: np.ndarray) -> None:
        """Queue a known point (e.g. a seed recipe) ahead of the optimizer's own proposals."""
        self._enqueue_point(self._validated_point(x, "enqueued point"))

    def snapshot(self) -> bytes:
        return pickle.dumps({"format": SNAPSHOT_FORMAT, "optimizer": self}, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, blob: bytes) -> Optimizer:
        # Snapshots are written by this process's own run directory, never fetched from others.
        payload = pickle.loads(blob)
        if not isinstance(payload, dict) or payload.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"optimizer snapshot has unsupported format (expected {SNAPSHOT_FORMAT})")
        optimizer = payload["optimizer"]
        if not isinstance(optimizer, cls):
            raise ValueError(f"snapshot holds a {type(optimizer).__name__}, not a {cls.__name__}")
        optimizer._reattach()
        return optimizer

    def _reattach(self) -> None:  # noqa: B027 - optional hook, most optimizers hold nothing external
        """Reopen external resources left out of the snapshot (files, connections)."""

    @abstractmethod
    def _propose(self, trial_id: int) -> np.ndarray | None:
        """The next point for ``trial_id``, or None to wait for outstanding tells."""

    @abstractmethod
    def _observe(self, trial_id: int, x: np.ndarray, score: float | None) -> None:
        """Learn from a finished trial; ``score`` is None for a failed trial."""

    @abstractmethod
    def _enqueue_point(self, x: np.ndarray) -> None:
        """Arrange for the validated point ``x`` to be asked before own proposals."""

    def _validated_point(self, x: np.ndarray, what: str) -> np.ndarray:
        point = np.array(x, dtype=np.float64).reshape(-1)
        if point.shape != self.lower.shape:
            raise ValueError(f"{what} has {point.size} values, the genome has {self.dim}")
        outside = np.flatnonzero((point < self.lower) | (point > self.upper) | ~np.isfinite(point))
        if outside.size:
            i = int(outside[0])
            raise ValueError(
                f"{what}[{i}]={point[i]} lies outside the box [{self.lower[i]}, {self.upper[i]}]"
                f" ({outside.size} coordinate(s) out of bounds)"
            )
        return point


def _validated_box(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lower = np.array(lower, dtype=np.float64).reshape(-1)
    upper = np.array(upper, dtype=np.float64).reshape(-1)
    if lower.shape != upper.shape or lower.size == 0:
        raise ValueError(f"lower and upper must be non-empty and equally long, got {lower.size} and {upper.size}")
    if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))):
        raise ValueError("lower and upper must be finite")
    # A zero-width coordinate is a constant, not a search dimension; the search space
    # should drop it rather than make every optimizer special-case it.
    flat = np.flatnonzero(upper <= lower)
    if flat.size:
        i = int(flat[0])
        raise ValueError(f"box coordinate {i} has upper={upper[i]} <= lower={lower[i]}")
    return lower, upper


def _validated_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)
