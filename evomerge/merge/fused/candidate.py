"""A worker's per-candidate merge into its resident model: fused where it can, reference otherwise.

`CandidateMerger.create` picks the path once per worker:

* the fused kernel (`fused.FusedSources`) for task arithmetic, TIES and DARE on CUDA with Triton;
  the model's parameters become views of one flat output buffer per device, which the kernel
  writes. A worker split over several devices (`placement.LayerSplit`) holds one part per device:
  the sources of that device's layers, merged there;
* the reference path (`resident.ResidentSources` + `resident.write_merge`) for everything else,
  and on CPU; split workers read each tensor's inputs onto the device of its layer.

The model is adopted into its flat buffers before the sources are read, so the one-off second copy
of the model that adoption makes never coexists with the sources: the peak is the steady state.

The fused path proves itself on its first deterministic candidate: every tensor is compared with
the reference path's result, and any difference switches the worker to the reference path for
good, with a warning. A candidate the fused sources cannot express (another base, other inputs)
takes the reference path, which reads the same flat buffers, so nothing is loaded twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import merge_tensor, named_tensors
from evomerge.merge.fused.sources import FusedSources, NotFusable, fused_methods, fused_unavailable_reason
from evomerge.merge.io import LazyTensorReader
from evomerge.merge.memory_plan import DEFAULT_WORKSPACE_BYTES
from evomerge.merge.placement import LayerSplit
from evomerge.merge.resident import ResidentSources, write_merge
from evomerge.merge.validate import ValidatedMerge, validate_merge_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusedPart:
    """One device's fused sources and the flat output buffer its share of the model's parameters view."""

    sources: FusedSources
    out: torch.Tensor


def adopt_model(model: torch.nn.Module, sources: FusedSources) -> torch.Tensor:
    """Make the model's merged parameters (those `sources` covers) views of one flat buffer laid out as the sources are."""
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


def reference_view(sources: FusedSources | Sequence[FusedSources]) -> ResidentSources:
    """ResidentSources over the fused sources' buffers (views, no copies) for the reference path.

    It breaks TIES ties in the kernel's flat-index order on any device, so a candidate gets the
    same weights whichever path merges it.
    """
    parts = [sources] if isinstance(sources, FusedSources) else list(sources)
    resident = ResidentSources(parts[0].validated, str(parts[0].device), tie_order="flat")
    for part in parts:
        for segment, (base_ref, expert_refs) in enumerate(part.refs):
            resident.tensors[base_ref] = part.base_view(segment)
            for expert, ref in enumerate(expert_refs):
                if ref is not None:
                    resident.deltas[(base_ref, ref)] = part.delta_view(expert, segment)
    return resident


def split_reference_sources(union: MergeConfig, split: LayerSplit) -> ResidentSources:
    """ResidentSources with every input tensor on the device of the layer it feeds."""
    validated = validate_merge_config(union)
    resident = ResidentSources(validated, split.devices[0])
    readers = {path: LazyTensorReader(folder) for path, folder in validated.folders.items()}
    for plan in validated.plan.tensors:
        device, working = split.device_of(plan.output), validated.working_dtype[plan.output]
        for model, name in plan.inputs:
            if (model, name) not in resident.tensors:
                resident.tensors[(model, name)] = readers[model].read(name, device).to(working)
    return resident


@dataclass(frozen=True)
class PreparedCandidate:
    validated: ValidatedMerge
    seed: int
    fused: tuple | None  # per part, FusedSources.prepare's result; None for the reference path


class CandidateMerger:
    """Merges candidates into one resident model by the fastest path that is known to be right."""

    def __init__(self, model: torch.nn.Module, reference: ResidentSources, parts: Sequence[FusedPart] = ()):
        self.model = model
        self.reference = reference
        self.parts: list[FusedPart] = list(parts)
        self.verified = False
        self.path = "fused" if self.parts else "reference"

    @classmethod
    def adopting(cls, model: torch.nn.Module, sources: FusedSources | Sequence[FusedSources]) -> CandidateMerger:
        """A merger over sources already filled (tests, benchmarks): adopts the model into their layout."""
        parts = [sources] if isinstance(sources, FusedSources) else list(sources)
        return cls(model, reference_view(parts), [FusedPart(part, adopt_model(model, part)) for part in parts])

    @classmethod
    def create(
        cls,
        model: torch.nn.Module,
        union: MergeConfig,
        method: str | Sequence[str] | None,
        devices: str | Sequence[str],
        placement: str = "auto",
        split: LayerSplit | None = None,
        shared_host: bool = True,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        interpreter_ok: bool = False,
    ) -> CandidateMerger:
        """Load the sources for `method` on `devices` (one part per device of `split`): fused when it can run.

        `method` may be a search's list: one set of fused sources serves its fused methods, and a
        candidate of any other method takes the reference path.

        `interpreter_ok` lets tests take the fused path on CPU under Triton's interpreter.
        """
        devices = [devices] if isinstance(devices, str) else list(devices)
        reason = "no search method given"
        if method:
            try:
                reason = fused_unavailable_reason(devices[0], fused_methods(method)[0], interpreter_ok) or ""
            except NotFusable as why:
                reason = str(why)
        if method and not reason:
            try:
                return cls._fused(model, union, method, devices, placement, split, shared_host, workspace_bytes)
            except NotFusable as why:
                reason = str(why)
        log.info("reference merge path: %s", reason)
        reference = split_reference_sources(union, split) if split else ResidentSources.load(union, device=devices[0])
        return cls(model, reference)

    @classmethod
    def _fused(cls, model, union, method, devices, placement, split, shared_host, workspace_bytes) -> CandidateMerger:
        sources = [FusedSources.plan(union, method, devices[0], placement)]
        if split is not None:
            names = sources[0].layout.names
            only = [split.tensors_on(part, names) for part in range(len(split.devices))]
            sources = [
                FusedSources.plan(union, method, device, placement, mine)
                for device, mine in zip(split.devices, only, strict=True)
            ]
        outs = [adopt_model(model, part) for part in sources]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the model's old parameter blocks: the sources need them as one piece
        for part in sources:
            part.fill(shared=shared_host, workspace_bytes=workspace_bytes)
        return cls(
            model, reference_view(sources), [FusedPart(part, out) for part, out in zip(sources, outs, strict=True)]
        )

    @property
    def fused(self) -> FusedSources | None:
        """The first device's fused sources (the only ones unless split), None on the reference path."""
        return self.parts[0].sources if self.parts else None

    @property
    def out(self) -> torch.Tensor | None:
        return self.parts[0].out if self.parts else None

    def first_non_finite(self) -> str | None:
        """Name of the first merged tensor holding a NaN or inf, if any (one check per device when fused)."""
        for sources, out in [(part.sources, part.out) for part in self.parts]:
            if bool(torch.isfinite(out).all()):
                continue
            layout = sources.layout
            return next(
                name for segment, name in enumerate(layout.names) if not torch.isfinite(layout.view(out, segment)).all()
            )
        if self.parts:
            return None
        return next(
            (name for name, parameter in self.model.named_parameters() if not torch.isfinite(parameter).all()), None
        )

    def prepare(self, config: MergeConfig, seed: int = 0) -> PreparedCandidate:
        """Plan the candidate and pack its parameters; touches no weights (may overlap an evaluation)."""
        validated = self.reference.plan_for(config)
        parts, fused = list(self.parts), None  # read once: apply() may drop them from another thread
        if parts:
            try:
                fused = tuple(part.sources.prepare(validated, seed) for part in parts)
                if sum(len(part.sources.layout.names) for part in parts) != len(validated.plan.tensors):
                    raise NotFusable("the candidate writes a different set of tensors")
            except NotFusable as why:
                log.info("candidate takes the reference path: %s", why)
                fused = None
        return PreparedCandidate(validated, seed, fused)

    @torch.no_grad()
    def apply(self, candidate: PreparedCandidate) -> ValidatedMerge:
        """Write a prepared candidate's weights into the resident model."""
        validated, seed = candidate.validated, candidate.seed
        parts = list(self.parts)
        if parts and candidate.fused is not None:
            try:
                for part, prepared in zip(parts, candidate.fused, strict=True):
                    part.sources.launch(prepared, part.out)
                if not self.verified:
                    # Random trims draw other masks than the reference's: nothing to compare.
                    self.verified = validated.plan.method.is_random or self._verify(validated, seed, parts)
                return validated
            except Exception as error:  # noqa: BLE001 - e.g. a kernel that does not compile here
                if self.verified:
                    raise
                log.warning(
                    "fused merge failed on its first candidate (%s); using the reference path from now on", error
                )
                self.parts, self.path = [], "reference"
        return write_merge(self.model, self.reference, validated, seed)

    def merge(self, config: MergeConfig, seed: int = 0) -> ValidatedMerge:
        return self.apply(self.prepare(config, seed))

    def _verify(self, validated: ValidatedMerge, seed: int, parts: list[FusedPart]) -> bool:
        """Compare every fused tensor with the reference path's; switch to it on any difference."""
        method = validated.plan.method
        holder = {name: part for part in parts for name in part.sources.layout.names}
        for plan in validated.plan.tensors:
            part = holder[plan.output]
            inputs, deltas, ranks = self.reference.cached_inputs(plan, method)
            # Host-placed sources are views of host memory: check on the device, tensor by tensor.
            device = part.sources.device
            inputs = [None if tensor is None else tensor.to(device) for tensor in inputs]
            deltas = {index: delta.to(device) for index, delta in (deltas or {}).items()}
            expected = merge_tensor(plan, method, inputs, seed, deltas, ranks, self.reference.tie_order)
            expected = expected.to(validated.out_dtype[plan.output])
            got = part.sources.layout.view(part.out, part.sources.segment_of[plan.output])
            if not torch.equal(expected.to(got.device), got):
                log.warning(
                    "fused merge differs from the reference on %s; using the reference path from now on", plan.output
                )
                self.parts, self.path = [], "reference"
                write_merge(self.model, self.reference, validated, seed)
                return False
        return True
