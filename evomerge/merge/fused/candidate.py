"""A worker's per-candidate merge into its resident model: fused where it can, reference otherwise.

`CandidateMerger.create` picks the path once per worker:

* the fused kernel (`fused.FusedSources`) for task arithmetic, TIES and DARE on CUDA with Triton;
  the model's parameters become views of one flat output buffer the kernel writes;
* the reference path (`engine.ResidentSources` + `engine.write_merge`) for everything else,
  and on CPU.

The fused path proves itself on its first deterministic candidate: every tensor is compared with
the reference path's result, and any difference switches the worker to the reference path for
good, with a warning. A candidate the fused sources cannot express (another base, other inputs)
takes the reference path, which reads the same flat buffers, so nothing is loaded twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import ResidentSources, merge_tensor, named_tensors, write_merge
from evomerge.merge.fused.sources import FusedSources, NotFusable, fused_unavailable_reason
from evomerge.merge.methods import METHODS
from evomerge.merge.validate import ValidatedMerge

log = logging.getLogger(__name__)


def adopt_model(model: torch.nn.Module, sources: FusedSources) -> torch.Tensor:
    """Make the model's merged parameters views of one flat buffer laid out as the sources are."""
    layout = sources.layout
    targets = named_tensors(model)
    chosen: list[torch.Tensor] = []
    for segment, name in enumerate(layout.names):
        tensor = targets.get(name)
        if tensor is None or tensor.dtype != sources.out_dtype or tuple(tensor.shape) != layout.shapes[segment]:
            raise NotFusable(f"the resident model's {name} does not match the merge output")
        if any(tensor is other for other in chosen):
            raise NotFusable(f"{name} shares its storage with another output (tied weights)")
        chosen.append(tensor)
    flat = torch.zeros(layout.total, dtype=sources.out_dtype, device=chosen[0].device if chosen else sources.device)
    with torch.no_grad():
        for segment, tensor in enumerate(chosen):
            view = layout.view(flat, segment)
            view.copy_(tensor)
            tensor.data = view
    return flat


def reference_view(sources: FusedSources) -> ResidentSources:
    """ResidentSources over the fused sources' buffers (views, no copies) for the reference path."""
    resident = ResidentSources(sources.validated, str(sources.base.device))
    for segment, (base_ref, expert_refs) in enumerate(sources.refs):
        resident.tensors[base_ref] = sources.layout.view(sources.base, segment)
        for expert, ref in enumerate(expert_refs):
            if ref is None:
                continue
            resident.deltas[(base_ref, ref)] = sources.layout.view(sources.deltas[expert], segment)
            if sources.ranks is not None:
                resident.ranks[((base_ref, ref), True)] = sources.layout.view(sources.ranks[expert], segment)
    return resident


@dataclass(frozen=True)
class PreparedCandidate:
    validated: ValidatedMerge
    seed: int
    fused: tuple | None  # FusedSources.prepare's result, or None for the reference path


class CandidateMerger:
    """Merges candidates into one resident model by the fastest path that is known to be right."""

    def __init__(self, model: torch.nn.Module, reference: ResidentSources, fused: FusedSources | None = None):
        self.model = model
        self.reference = reference
        self.fused = fused
        self.out = adopt_model(model, fused) if fused is not None else None
        self.verified = False
        self.path = "fused" if fused is not None else "reference"

    @classmethod
    def create(
        cls, model: torch.nn.Module, union: MergeConfig, method: str | None, device: str, placement: str = "auto"
    ) -> CandidateMerger:
        """Load the sources for `method` on `device`: fused when it can run, else the reference path."""
        reason = fused_unavailable_reason(device, METHODS[method]) if method else "no search method given"
        if method is not None and reason is None:
            try:
                fused = FusedSources.load(union, method, device, placement)
                return cls(model, reference_view(fused), fused)
            except NotFusable as why:
                reason = str(why)
        log.info("reference merge path: %s", reason)
        return cls(model, ResidentSources.load(union, device=device))

    def first_non_finite(self) -> str | None:
        """Name of the first merged tensor holding a NaN or inf, if any (one check when fused)."""
        sources, out = self.fused, self.out
        if sources is not None and out is not None:
            if bool(torch.isfinite(out).all()):
                return None
            layout = sources.layout
            return next(
                name for segment, name in enumerate(layout.names) if not torch.isfinite(layout.view(out, segment)).all()
            )
        return next(
            (name for name, parameter in self.model.named_parameters() if not torch.isfinite(parameter).all()), None
        )

    def prepare(self, config: MergeConfig, seed: int = 0) -> PreparedCandidate:
        """Plan the candidate and pack its parameters; touches no weights (may overlap an evaluation)."""
        validated = self.reference.plan_for(config)
        sources, fused = self.fused, None  # read once: apply() may drop it from another thread
        if sources is not None:
            try:
                fused = sources.prepare(validated, seed)
            except NotFusable as why:
                log.info("candidate takes the reference path: %s", why)
        return PreparedCandidate(validated, seed, fused)

    @torch.no_grad()
    def apply(self, candidate: PreparedCandidate) -> ValidatedMerge:
        """Write a prepared candidate's weights into the resident model."""
        validated, seed = candidate.validated, candidate.seed
        sources, out = self.fused, self.out
        if sources is not None and out is not None and candidate.fused is not None:
            try:
                sources.launch(candidate.fused, out)
                if not self.verified:
                    # Random trims draw other masks than the reference's: nothing to compare.
                    self.verified = validated.plan.method.is_random or self._verify(validated, seed, sources, out)
                return validated
            except Exception as error:  # noqa: BLE001 - e.g. a kernel that does not compile here
                if self.verified:
                    raise
                log.warning(
                    "fused merge failed on its first candidate (%s); using the reference path from now on", error
                )
                self.fused, self.path = None, "reference"
        return write_merge(self.model, self.reference, validated, seed)

    def merge(self, config: MergeConfig, seed: int = 0) -> ValidatedMerge:
        return self.apply(self.prepare(config, seed))

    def _verify(self, validated: ValidatedMerge, seed: int, sources: FusedSources, out: torch.Tensor) -> bool:
        """Compare every fused tensor with the reference path's; switch to it on any difference."""
        method, layout = validated.plan.method, sources.layout
        for plan in validated.plan.tensors:
            inputs, deltas, ranks = self.reference.cached_inputs(plan, method)
            expected = merge_tensor(plan, method, inputs, seed, deltas, ranks).to(validated.out_dtype[plan.output])
            got = layout.view(out, sources.segment_of[plan.output])
            if not torch.equal(expected.to(got.device), got):
                log.warning(
                    "fused merge differs from the reference on %s; using the reference path from now on", plan.output
                )
                self.fused = None
                self.path = "reference"
                write_merge(self.model, self.reference, validated, seed)
                return False
        return True
