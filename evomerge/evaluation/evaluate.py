"""Score a search worker's resident model on a fixed, seeded set of lm-eval docs.

A worker builds one `Evaluator` (wraps the model in lm-eval's HFLM, loads and
processes every dataset, picks the doc subset) and calls `evaluate()` after each
in-place weight update.  Nothing model-dependent is kept between calls: lm-eval
rebuilds its requests and runs every forward pass again, so the score is always
that of the weights the model holds right now.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evomerge.evaluation.config import EvalSet
from evomerge.evaluation.tasks import ResolvedTasks, build_tasks, quiet_lm_eval, resolve_tasks

__all__ = ["EvalResult", "EvalSet", "Evaluator", "resolve_tasks", "seeded_subset", "weighted_score"]

# The seeds lm-eval's simple_evaluate uses by default, so scores match a plain lm-eval run.
PYTHON_SEED = 0
NUMPY_SEED = 1234
TORCH_SEED = 1234
FEWSHOT_SEED = 1234


@dataclass(frozen=True)
class EvalResult:
    """One candidate's score and where it came from."""

    score: float  # sum(weight * metric) / sum(weight)
    metrics: dict[str, float]  # task name -> metric value
    n_docs: dict[str, int]  # task name -> docs scored
    seconds: float


def seeded_subset(n_docs: int, limit: int | None, seed: int, task_name: str) -> list[int]:
    """Sorted doc indices to score: the same for every process given the same arguments."""
    if limit is None or limit >= n_docs:
        return list(range(n_docs))
    # Seeding with a string hashes it with SHA-512, so PYTHONHASHSEED cannot change the draw.
    return sorted(random.Random(f"{seed}:{task_name}").sample(range(n_docs), limit))


def weighted_score(metrics: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """sum(weight * metric) / sum(weight) over the tasks in `weights`."""
    total_weight = sum(weights.values())
    return sum(weights[name] * metrics[name] for name in weights) / total_weight


class Evaluator:
    """Scores the weights `model` holds at each `evaluate()` call on the configured tasks."""

    def __init__(self, model, tokenizer, eval_set: EvalSet, device: str | None = None):
        from lm_eval.models.huggingface import HFLM

        _check_device(model, device)
        self.eval_set = eval_set
        settings = eval_set.evaluation
        self._resolved: ResolvedTasks = resolve_tasks(eval_set)
        with quiet_lm_eval():
            # batch_size and max_length belong here: lm-eval ignores them once it gets an
            # LM object.  No use_cache: that cache is keyed by prompt, blind to the weights.
            self._lm = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=settings.batch_size,
                max_length=settings.max_length,
                device=device,
            )
        self._tasks = build_tasks(self._resolved)
        for task in self._tasks.values():
            _process_docs_once(task)
        self._subsets = {
            name: seeded_subset(len(task.eval_docs), eval_set.limit, settings.seed, name)
            for name, task in self._tasks.items()
        }
        # lm-eval scores every doc of a task that `samples` leaves out.
        self._samples = {
            name: indices for name, indices in self._subsets.items() if len(indices) < len(self._tasks[name].eval_docs)
        }

    def subset_indices(self) -> dict[str, list[int]]:
        """The exact doc indices (into each task's eval split) that `evaluate()` scores."""
        return {name: list(indices) for name, indices in self._subsets.items()}

    def evaluate(self) -> EvalResult:
        """Score the model's current weights; the same weights always give the same result."""
        from lm_eval.evaluator import evaluate

        start = time.perf_counter()
        # Not simple_evaluate: on every call it also collects torch's environment report
        # (several subprocesses) and the git hash.  Its seeding is repeated here instead.
        with quiet_lm_eval(), _seeded_global_rngs(self._lm.device):
            for task in self._tasks.values():
                task.set_fewshot_seed(FEWSHOT_SEED)
            results = evaluate(
                lm=self._lm,
                task_dict={"tasks": self._tasks, "groups": {}, "group_map": {}},
                samples=self._samples or None,
                bootstrap_iters=0,
                log_samples=False,
            )
        return self._to_result(results, time.perf_counter() - start)

    def _to_result(self, results: dict[str, Any], seconds: float) -> EvalResult:
        metrics = {}
        for task in self._resolved.tasks:
            task_results = results["results"][task.name]
            if task.result_key not in task_results:
                raise RuntimeError(
                    f"lm-eval reported no '{task.result_key}' for task '{task.name}'; "
                    f"it reported: {', '.join(sorted(task_results))}"
                )
            metrics[task.name] = float(task_results[task.result_key])
        weights = {task.name: task.weight for task in self._resolved.tasks}
        n_docs = {name: int(counts["effective"]) for name, counts in results["n-samples"].items()}
        return EvalResult(weighted_score(metrics, weights), metrics, n_docs, seconds)


def _check_device(model, device: str | None) -> None:
    # HFLM keeps a ready model where it is and silently ignores `device`; say so loudly.
    if device is not None and torch.device(device).type != model.device.type:
        raise ValueError(f"model is on {model.device} but device={device!r}; move the model first")


def _process_docs_once(task) -> None:
    """Apply the task's process_docs now, once, instead of on every read of its docs.

    lm-eval re-runs process_docs each time it reads eval_docs, several times per
    evaluate(); on a large dataset that costs more than scoring a small subset.
    """
    process_docs = getattr(task.config, "process_docs", None)
    if process_docs is None:
        return
    task.dataset = {split: process_docs(docs) for split, docs in task.dataset.items()}
    task.config.process_docs = None


@contextmanager
def _seeded_global_rngs(device: torch.device) -> Iterator[None]:
    """Seed Python, NumPy and torch as simple_evaluate does, then restore their states.

    Restoring matters when an optimizer shares the process: cma draws from NumPy's
    global RNG, and reseeding it every call would repeat its samples.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            random.seed(PYTHON_SEED)
            np.random.seed(NUMPY_SEED)
            torch.manual_seed(TORCH_SEED)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
