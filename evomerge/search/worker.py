"""A search worker: sources resident on one device (or split by layers over several), one resident model, one evaluator.

`MergeWorker` is a plain class (a GPU benchmark can drive it directly); `ray_worker_class` wraps it
as a Ray actor. Per candidate it merges in place, checks the weights are finite, and scores with
lm-eval. Anything that goes wrong inside one candidate (a merge that raises, NaN weights, an
evaluation that raises, CUDA out of memory) comes back as a failed result, never as a dead worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from evomerge.evaluation.evaluate import Evaluator
from evomerge.evaluation.fidelity import RaceOutcome, RaceTarget, race
from evomerge.evaluation.scores import task_weights
from evomerge.evaluation.vllm_memory import worker_engine_bytes
from evomerge.merge.config import MergeConfig, rename_models
from evomerge.merge.fused.candidate import CandidateMerger
from evomerge.merge.layer_paths import LayerPathMerger
from evomerge.merge.memory_plan import SCORER_TOKEN_BUDGET, scorer_workspace_bytes
from evomerge.merge.placement import place_model
from evomerge.merge.validate import validate_merge_config
from evomerge.rundir.events import TrialResult


@dataclass(frozen=True)
class WorkerSettings:
    base_model: str  # its folder
    union_config: dict  # a merge that touches every tensor of every model: what to keep resident
    eval_sets: dict  # name ("search", "heldout") -> EvalSet
    device: str = "cpu"
    dtype: str = "float32"
    cpu_threads: int = 1
    trust_remote_code: bool = False
    merge_seed: int = 0
    # The search's method, or its list (a method gene): one set of fused sources serves the list's
    # methods that have a fused kernel; candidates of the others take the reference path.
    merge_method: str | tuple[str, ...] | None = None
    source_placement: str = "auto"  # fused path: "device", "host" (pinned, streamed) or "auto"
    # Several devices: one worker's layers and sources split over them (workers.gpus_per_worker: k).
    # Tests pass "cpu" k times to stand in for k GPUs.
    devices: tuple[str, ...] = ()
    # Model name (as merge configs write it: a hub ID or a path) -> its local folder.
    model_folders: dict[str, str] = field(default_factory=dict)
    # search.space: layers: candidates are layer paths rewired from resident sources (layer_paths.py).
    layer_paths: bool = False


class MergeWorker:
    """Holds the sources and a resident model; merges and scores one candidate per call."""

    def __init__(self, settings: WorkerSettings, worker_id: str = "w0"):
        if settings.device == "cpu":
            torch.set_num_threads(max(1, settings.cpu_threads))
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        self.worker_id = f"{worker_id}@{socket.gethostname()}:{os.getpid()}"
        dtype = getattr(torch, settings.dtype)
        self.devices = settings.devices or (settings.device,)
        model = AutoModelForCausalLM.from_pretrained(
            settings.base_model, dtype=dtype, trust_remote_code=settings.trust_remote_code
        )
        union = MergeConfig.model_validate(rename_models(settings.union_config, settings.model_folders))
        if settings.layer_paths:
            self.model = model.to(self.devices[0]).eval()
            self.merger = LayerPathMerger(self.model, union, self.devices[0], dtype, settings.trust_remote_code)
        else:
            self.model, self.merger = self._resident_merger(model, union, dtype)
        self._model_lock = threading.Lock()
        self.tokenizer = AutoTokenizer.from_pretrained(
            settings.base_model, trust_remote_code=settings.trust_remote_code
        )
        # One evaluator per eval set, or one per rung's slice for a raced search set (fidelity.py).
        self.evaluators = {
            name: [Evaluator(self.model, self.tokenizer, part, device=self.devices[0]) for part in eval_set.slices()]
            for name, eval_set in settings.eval_sets.items()
        }
        # Journaled with every result, so a run proves all its candidates saw the same documents.
        self.subset_digests = {name: subset_digest(self.subset_indices(name)) for name in self.evaluators}

    def _resident_merger(self, model, union: MergeConfig, dtype: torch.dtype):
        """The model placed on the worker's devices and the merger that writes candidates into it."""
        settings = self.settings
        model, split = place_model(model, validate_merge_config(union), self.devices)
        model.eval()
        budgets = [s.evaluation.token_budget or SCORER_TOKEN_BUDGET for s in settings.eval_sets.values()]
        budget = max(budgets, default=SCORER_TOKEN_BUDGET)
        workspace = scorer_workspace_bytes(model.config.to_dict(), budget, dtype.itemsize, 1 / len(self.devices))
        engines = [worker_engine_bytes(model, s.evaluation, self.devices[0]) for s in settings.eval_sets.values()]
        workspace = max((found for found in engines if found is not None), default=workspace)
        merger = CandidateMerger.create(
            model, union, settings.merge_method, self.devices, settings.source_placement, split, True, workspace
        )
        return model, merger

    def ping(self) -> str:
        return self.worker_id

    def subset_indices(self, eval_set: str = "search") -> dict[str, list[int]]:
        """Every doc the eval set can score; a raced set's slices together."""
        parts = [evaluator.subset_indices() for evaluator in self.evaluators[eval_set]]
        return {name: sorted(i for part in parts for i in part[name]) for name in parts[0]}

    def evaluate(
        self, trial_id: int, merge_config: dict, eval_set: str = "search", race: RaceTarget | None = None
    ) -> TrialResult:
        """Merge `merge_config` into the resident model and score it; never raises for the candidate.

        `race`: what a raced candidate must keep up with to get its next slice (evaluation/fidelity.py).
        """
        started = time.perf_counter()
        try:
            config = MergeConfig.model_validate(rename_models(merge_config, self.settings.model_folders))
            prepared = self.merger.prepare(config, seed=self.settings.merge_seed)
            planned = time.perf_counter()
            # A GPU actor runs two calls at once (ray_worker_class): the next candidate is planned
            # here while this lock holds it back from the weights the current one is evaluating.
            with self._model_lock:
                locked = time.perf_counter()
                self.merger.apply(prepared)
                _synchronize(self.devices)
                bad = self.merger.first_non_finite()
                if bad:
                    return self._failure(trial_id, f"merged weights are not finite ({bad})", started)
                merged = time.perf_counter()
                outcome = self._score(eval_set, race)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return self._failure(trial_id, "CUDA out of memory in this candidate", started)
        except Exception as error:  # noqa: BLE001 - one bad candidate must not kill the worker
            detail = traceback.format_exception_only(type(error), error)[-1].strip()
            return self._failure(trial_id, detail, started)
        result = outcome.result
        raced = len(self.evaluators[eval_set]) > 1
        return TrialResult(
            trial=trial_id,
            ok=True,
            score=result.score,
            metrics=result.metrics,
            n_docs=result.n_docs,
            subtasks=result.subtasks or None,
            worker=self.worker_id,
            merge_s=round(merged - locked, 4),
            prepare_s=round(planned - started, 4),
            merge_path=self.merger.path,
            eval_s=round(result.seconds, 4),
            subset=self.subset_digests[eval_set],
            rungs=outcome.rungs_scored if raced else None,
            stopped_early=outcome.stopped_early or None,
            rung_scores=list(outcome.rung_scores) if raced else None,
        )

    def _score(self, eval_set: str, target: RaceTarget | None) -> RaceOutcome:
        """Score the weights the model holds: whole, or raced slice by slice against `target`."""
        evaluators = self.evaluators[eval_set]
        if len(evaluators) == 1:
            return RaceOutcome(evaluators[0].evaluate(), rungs_scored=1, stopped_early=False)
        settings = self.settings.eval_sets[eval_set]
        weights, z = task_weights(settings.tasks), settings.fidelity.z
        # One candidate's weights: synced into a vLLM engine for the first slice only.
        return race(lambda rung: evaluators[rung].evaluate(rung == 0), len(evaluators), weights, target, z)

    def _failure(self, trial_id: int, reason: str, started: float) -> TrialResult:
        return TrialResult.failure(
            trial_id, reason, worker=self.worker_id, seconds=round(time.perf_counter() - started, 4)
        )


def subset_digest(indices: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(indices, sort_keys=True).encode()).hexdigest()[:16]


def _synchronize(devices: tuple[str, ...]) -> None:
    for device in devices:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)


def ray_worker_class(num_cpus: float, num_gpus: float):
    """MergeWorker as a Ray actor class with the given resources."""
    import ray

    # On a GPU, two concurrent calls let the next candidate's host-side planning overlap the
    # current evaluation (MergeWorker.evaluate serializes everything that touches the model).
    concurrency = 2 if num_gpus > 0 else 1
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_concurrency=concurrency)(MergeWorker)
