"""Score a search worker's resident model on a fixed, seeded set of lm-eval docs.

A worker builds one `Evaluator` per eval set and calls `evaluate()` after each in-place weight
update; the score is always that of the weights the model holds right now. Three backends
(`evaluation.backend`):

* `native` (default): lm-eval's requests are built and tokenized once, here; per call only the
  forward passes run (`evaluation/native.py`), and lm-eval's filters, `process_results` and
  aggregation turn the answers into metrics (`evaluation/requests.py`).
* `vllm`: the same prepared requests, scored by a vLLM engine that receives the model's weights
  before each call (`evaluation/vllm_backend.py`).
* `lm_eval`: lm-eval's own `evaluate` with its HFLM, which rebuilds every request and runs every
  forward pass again on each call. The reference the native backend is tested against.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import torch

from evomerge.evaluation.backend import BackendName, ScoringBackend
from evomerge.evaluation.config import Carve, EvalSet, EvaluationSpec
from evomerge.evaluation.native import TorchBackend
from evomerge.evaluation.requests import PreparedRequests, PromptOptions, TaskMetrics
from evomerge.evaluation.scores import EvalResult, combined_score, subtask_scores, task_weights, weighted_score
from evomerge.evaluation.seeding import FEWSHOT_SEED, seeded_global_rngs
from evomerge.evaluation.task_index import TaskKind
from evomerge.evaluation.tasks import (
    ResolvedTask,
    ResolvedTasks,
    build_groups,
    build_tasks,
    quiet_lm_eval,
    resolve_tasks,
)

__all__ = ["EvalResult", "EvalSet", "Evaluator", "doc_subset", "resolve_tasks", "seeded_subset", "weighted_score"]


def seeded_subset(
    n_docs: int, limit: int | None, seed: int, task_name: str, share: tuple[float, float] | None = None
) -> list[int]:
    """Sorted doc indices to score: the same for every process given the same arguments.

    `share` = (start, end) keeps one slice of the subset's seeded order: slices with adjacent
    shares are disjoint, each is a seeded random draw, and together they are the whole subset.
    """
    kept = n_docs if limit is None else min(limit, n_docs)
    if share is None and kept == n_docs:
        return list(range(n_docs))
    # Seeding with a string hashes it with SHA-512, so PYTHONHASHSEED cannot change the draw.
    order = random.Random(f"{seed}:{task_name}").sample(range(n_docs), kept)
    if share is None:
        return sorted(order)
    start, end = (math.ceil(fraction * kept - 1e-9) for fraction in share)
    return sorted(order[start:end])


def carved_part(n_docs: int, carve: Carve, seed: int, task_name: str) -> list[int]:
    """The sorted doc indices of one part of a carved task: held-out (a `fraction` of them) or search (the rest).

    A seeded permutation of all the docs, split once: the two parts are disjoint, cover every doc,
    and depend only on the seed, the task's name and its doc count, so a resumed run gets them again.
    """
    order = random.Random(f"{seed}:heldout:{task_name}").sample(range(n_docs), n_docs)
    held = math.floor(carve.fraction * n_docs + 0.5)
    return sorted(order[:held] if carve.heldout else order[held:])


def doc_subset(n_docs: int, eval_set: EvalSet, entry: str, task_name: str) -> list[int]:
    """The doc indices of leaf task `task_name` (of the spec entry `entry`) that `eval_set` scores.

    Without carving this is `seeded_subset` itself; with it, the seeded subset is drawn from the
    set's part of the docs (positions in that part mapped back to doc indices).
    """
    seed = eval_set.evaluation.seed
    carve = eval_set.carved(entry)
    if carve is None:
        return seeded_subset(n_docs, eval_set.limit, seed, task_name, eval_set.share)
    part = carved_part(n_docs, carve, seed, task_name)
    return [part[i] for i in seeded_subset(len(part), eval_set.limit, seed, task_name, eval_set.share)]


class Evaluator:
    """Scores the weights `model` holds at each `evaluate()` call on the configured tasks."""

    def __init__(self, model, tokenizer, eval_set: EvalSet, device: str | None = None, backend: str | None = None):
        """`backend` overrides the eval set's `evaluation.backend` (benchmarks, `evomerge eval --backend`)."""
        from lm_eval.models.huggingface import HFLM

        _check_device(model, device)
        self.eval_set = eval_set
        settings = eval_set.evaluation
        self.backend = BackendName(backend or settings.backend)
        self._resolved: ResolvedTasks = resolve_tasks(eval_set)
        self._prompts = PromptOptions(
            apply_chat_template=settings.apply_chat_template,
            system_instruction=settings.system_instruction,
            fewshot_as_multiturn=settings.multiturn_fewshot,
        )
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
        self._groups = build_groups(self._resolved, self._tasks)
        for task in self._tasks.values():
            _process_docs_once(task)
        entry_of = {leaf.name: entry.name for entry in self._resolved.tasks for leaf in entry.leaves}
        self._subsets = {
            name: doc_subset(len(task.eval_docs), eval_set, entry_of[name], name) for name, task in self._tasks.items()
        }
        # lm-eval scores every doc of a task that `samples` leaves out.
        self._samples = {
            name: indices for name, indices in self._subsets.items() if len(indices) < len(self._tasks[name].eval_docs)
        }
        self.requests: PreparedRequests | None = None
        self._scorer: ScoringBackend | None = None
        if self.backend is not BackendName.LM_EVAL:
            with quiet_lm_eval():
                self.requests = PreparedRequests(self._tasks, self._lm, self._samples, self._prompts)
            self._scorer = _scorer(self.backend, model, self._lm, settings)

    def subset_indices(self) -> dict[str, list[int]]:
        """The exact doc indices (into each task's eval split) that `evaluate()` scores."""
        return {name: list(indices) for name, indices in self._subsets.items()}

    def evaluate(self, weights_changed: bool = True) -> EvalResult:
        """Score the model's current weights; the same weights always give the same result.

        `weights_changed` False: the weights are those an evaluator of this model scored last (a
        raced candidate's next slice), so a backend with its own copy of them need not sync it."""
        start = time.perf_counter()
        if self.requests is not None and self._scorer is not None:
            self._scorer.prepare_candidate(weights_changed)
            found = self.requests.score(self._scorer, self._lm.device)
        else:
            found = self._lm_eval_metrics()
        return self._to_result(found, time.perf_counter() - start)

    def responses(self) -> dict[str, list[list[Any]]]:
        """The last call's answers per task, per doc, per request (lm-eval's `Instance.resps[0]`)."""
        answers = {}
        for name, task in self._tasks.items():
            by_doc: dict[int, list] = {}
            for instance in sorted(task.instances, key=lambda instance: (instance.doc_id, instance.idx)):
                by_doc.setdefault(instance.doc_id, []).append(instance.resps[0])
            answers[name] = [by_doc[doc_id] for doc_id in sorted(by_doc)]
        return answers

    def _lm_eval_metrics(self) -> dict[str, TaskMetrics]:
        from lm_eval.evaluator import evaluate

        # Not simple_evaluate: on every call it also collects torch's environment report
        # (several subprocesses) and the git hash.  Its seeding is repeated here instead.
        with quiet_lm_eval(), seeded_global_rngs(self._lm.device):
            for task in self._tasks.values():
                task.set_fewshot_seed(FEWSHOT_SEED)
            group_map = {name: group.child_names for name, group in self._groups.items()}
            results = evaluate(
                lm=self._lm,
                task_dict={"tasks": self._tasks, "groups": self._groups, "group_map": group_map},
                samples=self._samples or None,
                bootstrap_iters=0,
                log_samples=False,
                apply_chat_template=self._prompts.apply_chat_template,
                system_instruction=self._prompts.system_instruction,
                fewshot_as_multiturn=self._prompts.fewshot_as_multiturn,
            )
        found = {
            name: TaskMetrics(
                values={key: value for key, value in results["results"][name].items() if "," in key},
                n_docs=int(results["n-samples"][name]["effective"]),
            )
            for name in self._tasks
        }
        # lm-eval's own group aggregates: the reference the native backend's are tested against.
        for name in self._groups:
            values = results["results"][name]
            found[name] = TaskMetrics({key: value for key, value in values.items() if "," in key}, 0)
        return found

    def _to_result(self, found: dict[str, TaskMetrics], seconds: float) -> EvalResult:
        metrics, n_docs, subtasks = {}, {}, {}
        for task in self._resolved.tasks:
            leaves = {leaf.name: _metric(found[leaf.name].values, leaf.result_key, leaf.name) for leaf in task.leaves}
            leaf_docs = {leaf.name: found[leaf.name].n_docs for leaf in task.leaves}
            n_docs[task.name] = sum(leaf_docs.values())
            if not task.combined:
                metrics[task.name] = leaves[task.name]
                continue
            metrics[task.name] = self._combined(task, found, leaves, leaf_docs)
            subtasks[task.name] = subtask_scores(task.weighting or "", leaves, leaf_docs)
        score = weighted_score(metrics, task_weights(self._resolved.tasks))
        return EvalResult(score, metrics, n_docs, seconds, subtasks)

    def _combined(
        self, task: ResolvedTask, found: dict[str, TaskMetrics], leaves: dict[str, float], leaf_docs: dict[str, int]
    ) -> float:
        """A group's score as lm-eval aggregates it (its Group object), or a tag's mean."""
        if task.kind is not TaskKind.GROUP or task.name not in self._groups:
            return combined_score(task.weighting or "", leaves, leaf_docs)
        if task.name in found:  # the lm_eval backend: lm-eval aggregated it itself
            return _metric(found[task.name].values, task.result_key, task.name)
        with quiet_lm_eval():
            aggregated = self._groups[task.name].aggregate(
                {leaf: {**found[leaf].values, "sample_len": found[leaf].n_docs} for leaf in leaves}
            )
        return _metric(aggregated, task.result_key, task.name)


def _metric(values: dict[str, Any], key: str, name: str) -> float:
    if key not in values:
        raise RuntimeError(
            f"lm-eval reported no '{key}' for task '{name}'; it reported: {', '.join(sorted(map(str, values)))}"
        )
    return float(values[key])


def _scorer(backend: BackendName, model, lm, settings: EvaluationSpec) -> ScoringBackend:
    if backend is BackendName.VLLM:
        from evomerge.evaluation.vllm_backend import VllmBackend

        vllm = settings.vllm
        return VllmBackend(model, lm.tokenizer, lm.max_length, vllm.gpu_memory_utilization if vllm else None)
    return TorchBackend(model, lm.tokenizer, lm.max_length, settings.token_budget)


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
