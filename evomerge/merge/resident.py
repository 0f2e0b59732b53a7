"""A merge applied in place into a resident model, from sources loaded once: what a worker runs per candidate.

`ResidentSources` loads every input once onto the worker's device and caches what depends only on
the sources (task vectors and the magnitude ranks a trim sorts by), so a candidate costs only the
parameter-dependent arithmetic. `write_merge` calls `engine.merge_tensor` for every output tensor,
as a merge to disk does, so both give identical tensors.
"""

from __future__ import annotations

import torch

from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import base_index_of, merge_tensor, named_tensors
from evomerge.merge.io import LazyTensorReader
from evomerge.merge.methods import MethodInfo, TieOrder, device_tie_order, magnitude_rank
from evomerge.merge.plan import TensorPlan
from evomerge.merge.validate import ValidatedMerge, validate_merge_config

TensorRef = tuple[str, str]  # (model path, tensor name)
DeltaKey = tuple[TensorRef, TensorRef]  # (base tensor, fine-tuned tensor): one task vector


class ResidentSources:
    """Every input tensor of a merge, loaded once onto one device, with source-only work cached.

    `tie_order` is the TIES trim's (default: the device's); with "sort" each trimmed delta's
    descending rank is cached, as breadcrumbs' ascending one is, unless `cache_ranks` is off.
    """

    def __init__(
        self,
        validated: ValidatedMerge,
        device: str = "cpu",
        cache_ranks: bool = True,
        tie_order: TieOrder | None = None,
    ):
        self.validated = validated
        self.device = torch.device(device)
        self.cache_ranks = cache_ranks
        self.tie_order: TieOrder = tie_order or device_tie_order(self.device)
        self.tensors: dict[TensorRef, torch.Tensor] = {}
        self.deltas: dict[DeltaKey, torch.Tensor] = {}
        self.ranks: dict[tuple[DeltaKey, bool], torch.Tensor] = {}  # keyed by (delta, descending)

    @classmethod
    def load(
        cls, config: MergeConfig, device: str = "cpu", cache_ranks: bool = True, tie_order: TieOrder | None = None
    ) -> ResidentSources:
        sources = cls(validate_merge_config(config), device, cache_ranks, tie_order)
        readers = {path: LazyTensorReader(folder) for path, folder in sources.validated.folders.items()}
        for plan in sources.validated.plan.tensors:
            working = sources.validated.working_dtype[plan.output]
            for model, name in plan.inputs:
                if (model, name) not in sources.tensors:
                    sources.tensors[(model, name)] = readers[model].read(name, str(sources.device)).to(working)
        return sources

    def plan_for(self, config: MergeConfig) -> ValidatedMerge:
        """Validate and plan a candidate against the already inspected folders (no disk reads)."""
        return validate_merge_config(config, "candidate", folders=self.validated.folders)

    def cached_inputs(self, plan: TensorPlan, method: MethodInfo):
        # Fused sources keep only the base and the deltas (candidate.reference_view): a task-vector
        # merge needs no other input tensor.
        inputs = [self.tensors.get(ref) for ref in plan.inputs]
        if not method.task_vectors:
            missing = [ref for ref, tensor in zip(plan.inputs, inputs, strict=False) if tensor is None]
            if missing:
                raise KeyError(f"{missing[0]} is not resident: these sources were prepared for task-vector merges")
            return inputs, None, None
        base_index = base_index_of(plan)
        base_ref = plan.inputs[base_index]
        deltas, ranks = {}, {}
        for index, ref in enumerate(plan.inputs):
            if index == base_index:
                continue
            key = (base_ref, ref)
            if key not in self.deltas:
                if inputs[index] is None or inputs[base_index] is None:
                    raise KeyError(
                        f"{ref} minus {base_ref} is not resident: these sources were prepared for another base model"
                    )
                self.deltas[key] = self.tensors[ref] - self.tensors[base_ref]
            deltas[index] = self.deltas[key]
            descending = self._ranked_descending(method)
            if descending is not None:
                if (key, descending) not in self.ranks:
                    self.ranks[(key, descending)] = magnitude_rank(self.deltas[key], descending=descending)
                ranks[index] = self.ranks[(key, descending)]
        return inputs, deltas, ranks

    def _ranked_descending(self, method: MethodInfo) -> bool | None:
        """Which magnitude rank `method` sorts by (None: none worth caching)."""
        if not self.cache_ranks or method.magnitude_rank is None:
            return None
        if method.magnitude_rank == "ascending":
            return False
        # A flat tie order needs no rank (methods.magnitude_mask counts the tied elements instead).
        return True if self.tie_order == "sort" else None


def merge_into_model(
    model: torch.nn.Module, sources: ResidentSources, config: MergeConfig, seed: int = 0
) -> ValidatedMerge:
    """Overwrite a resident model's weights with the merge `config` describes; no disk access."""
    return write_merge(model, sources, sources.plan_for(config), seed)


@torch.no_grad()
def write_merge(
    model: torch.nn.Module, sources: ResidentSources, validated: ValidatedMerge, seed: int = 0
) -> ValidatedMerge:
    """Overwrite a resident model's weights with an already planned merge."""
    targets = named_tensors(model)
    for plan in validated.plan.tensors:
        if plan.output not in targets:
            raise KeyError(f"the resident model has no tensor named {plan.output}")
        inputs, deltas, ranks = sources.cached_inputs(plan, validated.plan.method)
        merged = merge_tensor(plan, validated.plan.method, inputs, seed, deltas, ranks, sources.tie_order)
        targets[plan.output].copy_(merged.to(validated.out_dtype[plan.output]))
    return validated
