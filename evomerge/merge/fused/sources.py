"""The fused per-candidate merge: task arithmetic, TIES and DARE as one kernel over flat buffers.

A search worker merges the same sources thousands of times with different parameters. Everything
that depends only on the sources is done once, when `FusedSources.fill` reads them:

* the base tensors and one task vector (delta) per expert, in the records of `layout.py`: 2 + 2E
  bytes per parameter for bf16 sources, nothing more per element;
* for magnitude trims (TIES) a host-side table of each delta's distinct magnitudes with their
  counts, so a density's threshold, and how many elements equal to it the trim keeps, is a
  host-side binary search;
* for DARE's rescale, each delta's L1 norm.

A candidate then costs a small parameter table upload and one kernel launch over the whole model
(two for DARE: the kept L1 norms first; two for TIES when a tie straddles a cut: the tied elements
per block first, one int32 per block and expert), writing straight into the resident model, whose
parameters are views of one flat output buffer (`candidate.adopt_model`).

Sources live on the device when they fit beside the model and the scorer's workspace. Otherwise
they stay in host memory ("host" placement), one copy per node shared by its workers
(`shared_host.py`), and are streamed chunk by chunk, each chunk one contiguous copy, the next
chunk's copy overlapping the current chunk's kernel. A worker split over several devices holds
one `FusedSources` per device, each with the tensors of that device's layers (`only`).

Results equal `engine.merge_tensor` with the "flat" tie order bit for bit for deterministic methods
(tests run the kernels under Triton's CPU interpreter against it). DARE draws its masks from Triton's Philox stream, keyed
by (seed, tensor, input), so its masks differ from the CPU path's, as they differ between torch's
CPU and CUDA generators.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import tensor_seed
from evomerge.merge.fused.availability import NotFusable, fused_methods, fused_unavailable_reason
from evomerge.merge.fused.layout import BLOCK, Chunk, FlatLayout, Record, expert_models, records, segment_refs
from evomerge.merge.fused.shared_host import SharedHostCopy, content_key, has_room_for, shared_directory
from evomerge.merge.fused.streaming import Stager
from evomerge.merge.fused.tables import MagnitudeTables, ParameterTable
from evomerge.merge.io import LazyTensorReader
from evomerge.merge.memory_plan import DEFAULT_CHUNK_BYTES, DEFAULT_WORKSPACE_BYTES, sources_fit_device
from evomerge.merge.registry import FusedTrim, MethodInfo
from evomerge.merge.validate import ValidatedMerge, validate_merge_config

__all__ = ["BLOCK", "FlatLayout", "FusedSources", "NotFusable", "fused_unavailable_reason"]

ROUND_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
log = logging.getLogger(__name__)


# segment -> (its base tensor, each expert's tensor or None): what `fill` reads the sources from.
SegmentInputs = Callable[[int], tuple[torch.Tensor, list[torch.Tensor | None]]]
# A candidate made ready on the host: its parameters (naming its method) and their packed kernel table.
Prepared = tuple[ParameterTable, np.ndarray]


def _kernel_trim(method: MethodInfo) -> FusedTrim:
    if method.fused_trim is None:
        raise NotFusable(f"method {method.name} has no fused kernel")
    return method.fused_trim


class FusedSources:
    """The sources of a task-vector search as flat records, merged by the fused kernel.

    One set of sources serves every fused method of a search's list (`methods`): they hold what the
    most demanding needs (magnitude tables when any trims by magnitude), and each candidate's launch
    takes its own method's trim, sign consensus and rescale.
    """

    def __init__(
        self,
        validated: ValidatedMerge,
        methods: MethodInfo | Sequence[MethodInfo],
        device: str,
        placement: str,
        only: frozenset[str] | None = None,
    ):
        self.validated = validated
        listed = [methods] if isinstance(methods, MethodInfo) else list(methods)
        self.methods = {method.name: method for method in listed}
        self.trims_by_magnitude = any(m.fused_trim is FusedTrim.MAGNITUDE for m in listed)
        self.device = torch.device(device)
        self.placement = placement
        plans = [plan for plan in validated.plan.tensors if only is None or plan.output in only]
        self.experts = expert_models(validated)
        self.layout = FlatLayout.of([p.output for p in plans], [_shape(validated, p) for p in plans])
        self.segment_of = {name: index for index, name in enumerate(self.layout.names)}
        self.refs = [segment_refs(plan, self.experts) for plan in plans]
        self.work_dtype = _uniform(validated.working_dtype.values(), "working dtype")
        self.out_dtype = _uniform(validated.out_dtype.values(), "output dtype")
        self.before_l1 = torch.ones((len(plans), len(self.experts)), dtype=self.work_dtype, device=self.device)
        self.magnitudes = MagnitudeTables(len(plans), len(self.experts))
        # Empty until `fill`: `estimate_bytes` and the memory plan build sources without holding them.
        self.storage = torch.empty(0, dtype=self.work_dtype)
        self.records: list[Record] = []
        self.shared: SharedHostCopy | None = None
        self._stager: Stager | None = None

    @classmethod
    def plan(
        cls,
        config: MergeConfig,
        method_name: str | Sequence[str],
        device: str,
        placement: str = "auto",
        only: frozenset[str] | None = None,
    ) -> FusedSources:
        """Check that the merge can take the fused path (for the fused methods of a list); nothing read yet."""
        methods = fused_methods(method_name)
        reason = fused_unavailable_reason(device, methods[0], interpreter_ok=True)
        if reason:
            raise NotFusable(reason)
        validated = validate_merge_config(config)
        if any(plan.base_index is None for plan in validated.plan.tensors):
            raise NotFusable("every tensor needs a base model")
        return cls(validated, methods, device, placement, only)

    @classmethod
    def load(
        cls,
        config: MergeConfig,
        method_name: str | Sequence[str],
        device: str,
        placement: str = "auto",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        only: frozenset[str] | None = None,
        shared: bool = False,
    ) -> FusedSources:
        """`plan` and `fill` in one call (a worker adopts its model in between: candidate.py)."""
        sources = cls.plan(config, method_name, device, placement, only)
        sources.fill(chunk_bytes, shared=shared)
        return sources

    def fill(
        self,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        shared: bool = False,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        inputs: SegmentInputs | None = None,
    ) -> None:
        """Read every source once, tensor by tensor, into the records; then the tables.

        "auto" placement keeps the records on the device when they fit beside what the device
        already holds (the model) and `workspace_bytes` for scoring, else in host memory. `shared`
        puts a host copy in node-wide shared memory, filled by the first worker that gets there.
        `inputs` replaces reading the model folders (a benchmark builds its sources on the GPU).
        """
        self._inputs = inputs or self._read_inputs()
        if self.placement == "auto":
            self.placement = self.fitting_placement(workspace_bytes)
        runs = [(0, len(self.layout.names))]
        if self.placement == "host":
            runs = self.layout.chunks(max(BLOCK, chunk_bytes // self.bytes_per_element()))
        self.records = records(self.layout, runs, len(self.experts))
        size = (1 + len(self.experts)) * self.layout.total
        if self.placement == "host" and shared and not has_room_for(size * self.work_dtype.itemsize):
            log.warning(
                "shared memory (%s) has no room for the sources: this worker keeps its own copy", shared_directory()
            )
            shared = False
        if self.placement == "host" and shared:
            pin = self.device.type == "cuda"
            self.shared = SharedHostCopy.open(self._shared_key(), size, self.work_dtype, self._read_into, pin)
            self.storage = self.shared.tensor
        else:
            storage = self.device if self.placement == "device" else torch.device("cpu")
            pin = self.placement == "host" and torch.cuda.is_available()
            self.storage = torch.zeros(size, dtype=self.work_dtype, device=storage, pin_memory=pin)
            self._read_into(self.storage)
        self._index()
        self._prepare_launches()

    @classmethod
    def estimate_bytes(cls, config: MergeConfig, method_name: str | Sequence[str]) -> int:
        """Bytes `load` will hold for these sources (headers only, nothing read)."""
        return cls(validate_merge_config(config), fused_methods(method_name), "cpu", "device").planned_bytes()

    def bytes_per_element(self) -> int:
        """Record bytes per element: the base and one delta per expert, nothing else."""
        return (1 + len(self.experts)) * self.work_dtype.itemsize

    def _tie_experts(self) -> int:
        """Experts whose ties a TIES trim counts per block (memory_plan.table_bytes)."""
        return len(self.experts) if self.trims_by_magnitude else 0

    def planned_bytes(self) -> int:
        return self.layout.total * self.bytes_per_element()

    def fitting_placement(self, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> str:
        """ "device" when the records fit in the device's free memory beside the scorer's workspace, else "host"."""
        if self.device.type != "cuda":
            return "device"
        free, _ = torch.cuda.mem_get_info(self.device)
        return (
            "device"
            if sources_fit_device(self.planned_bytes(), self.layout.total, free, workspace_bytes, self._tie_experts())
            else "host"
        )

    def base_view(self, segment: int) -> torch.Tensor:
        return self._segment_view(segment, 0)

    def delta_view(self, expert: int, segment: int) -> torch.Tensor:
        return self._segment_view(segment, 1 + expert)

    def _segment_view(self, segment: int, part: int) -> torch.Tensor:
        record = next(r for r in self.records if r.first <= segment < r.last)
        start = record.part(part) + int(self.layout.starts[segment]) - record.origin
        return self.storage[start : start + int(self.layout.numels[segment])].view(self.layout.shapes[segment])

    def _read_inputs(self) -> SegmentInputs:
        """Each segment's base and expert tensors, read from the model folders onto the device."""
        readers = {path: LazyTensorReader(folder) for path, folder in self.validated.folders.items()}
        work = str(self.device)

        def read(segment: int) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
            base_ref, expert_refs = self.refs[segment]
            experts = [readers[ref[0]].read(ref[1], work) if ref else None for ref in expert_refs]
            return readers[base_ref[0]].read(base_ref[1], work), experts

        return read

    def _read_into(self, storage: torch.Tensor) -> None:
        """Each segment's base and deltas, computed on the device, written into `storage`'s records."""
        for record in self.records:
            for segment in range(record.first, record.last):
                start = int(self.layout.starts[segment]) - record.origin
                numel = int(self.layout.numels[segment])
                base, experts = self._inputs(segment)
                base = base.to(self.device, self.work_dtype).reshape(-1)
                storage[record.part(0) + start :][:numel].copy_(base)
                for expert, tensor in enumerate(experts):
                    if tensor is not None:
                        delta = tensor.to(self.device, self.work_dtype).reshape(-1) - base
                        storage[record.part(1 + expert) + start :][:numel].copy_(delta)

    def _index(self) -> None:
        """What depends on the deltas only: L1 norms (DARE) and magnitude tables (TIES), from the records."""
        for segment, (_, expert_refs) in enumerate(self.refs):
            for expert, ref in enumerate(expert_refs):
                if ref is None:
                    continue
                delta = self.delta_view(expert, segment).to(self.device)
                self.before_l1[segment, expert] = delta.abs().sum()
                if self.trims_by_magnitude:
                    self.magnitudes.add(segment, expert, delta)
        self.magnitudes.build_index()

    def _shared_key(self) -> str:
        """Names the shared copy by everything its bytes depend on, so it is reused only when identical."""
        models = sorted({ref[0] for base_ref, expert_refs in self.refs for ref in (base_ref, *expert_refs) if ref})
        layout = {"refs": self.refs, "shapes": self.layout.shapes, "dtype": str(self.work_dtype)}
        return content_key(models, layout | {"records": [(r.first, r.last, r.elements) for r in self.records]})

    def _prepare_launches(self) -> None:
        """Per-chunk block tables, and the stager (two device staging buffers for host placement)."""
        layout, device = self.layout, self.device
        self._segment_start = torch.from_numpy(layout.starts).to(device)
        self._segment_numel = torch.from_numpy(layout.numels).to(device)
        self._chunks = [Chunk.of(layout, record, device) for record in self.records]
        # Rows stay 1 where nothing is rescaled; DARE overwrites every row of each chunk it runs.
        self._ratios = torch.ones((len(layout.names), len(self.experts)), dtype=torch.float32, device=device)
        self._no_ties = torch.zeros(1, dtype=torch.int32, device=device)  # the kernel's tie counts when none straddle
        streamed = self.placement == "host"
        self._stager = Stager(self.storage, self.records, len(self.experts), device, streamed)

    def byte_size(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def close(self) -> None:
        """Let go of a shared host copy (the node's last user removes it)."""
        if self.shared is not None:
            self.shared.close()

    # ---- per candidate -------------------------------------------------------------------------

    def parameters(self, validated: ValidatedMerge, seed: int) -> ParameterTable:
        """The candidate's parameters per (tensor, expert); NotFusable if its plan differs in shape."""
        if validated.plan.method.name not in self.methods:
            raise NotFusable(f"sources were prepared for {', '.join(self.methods)}, not {validated.plan.method.name}")
        plans = [plan for plan in validated.plan.tensors if plan.output in self.segment_of]
        if len(plans) != len(self.layout.names):
            raise NotFusable("the candidate writes a different set of tensors")
        table = ParameterTable(len(plans), len(self.experts), validated.plan.method.name)
        expert_index = {model: index for index, model in enumerate(self.experts)}
        for plan in plans:
            segment = self.segment_of[plan.output]
            base_ref, expert_refs = self.refs[segment]
            if plan.base_index is None or plan.inputs[plan.base_index] != base_ref:
                raise NotFusable(f"{plan.output}: a different base tensor")
            for index, (ref, params) in enumerate(zip(plan.inputs, plan.per_input, strict=False)):
                if index == plan.base_index:
                    continue
                expert = expert_index.get(ref[0])
                if expert is None or expert_refs[expert] != ref:
                    raise NotFusable(f"{plan.output}: input {ref} is not resident")
                table.set_input(
                    segment,
                    expert,
                    params["weight"],
                    params.get("density", 1.0),
                    tensor_seed(seed, plan.output, index) & 0x7FFFFFFF,
                )
            table.lambdas[segment] = plan.shared["lambda"]
            table.normalize[segment] = plan.shared["normalize"]
            table.rescale[segment] = plan.shared["rescale"]
        return table

    def prepare(self, validated: ValidatedMerge, seed: int = 0) -> Prepared:
        """Host-side work for one candidate (no device access, so it can overlap another's evaluation)."""
        table = self.parameters(validated, seed)
        method = self.methods[table.method]
        cuts: tuple[np.ndarray, np.ndarray] | None = None
        if method.fused_trim is FusedTrim.MAGNITUDE:
            cuts = self.magnitudes.thresholds(table.keep_counts(self.layout.numels))
        return table, table.pack(self.work_dtype, cuts)

    def launch(self, prepared: Prepared, out: torch.Tensor) -> None:
        """Run a prepared candidate's kernels (with its method's settings), writing into the flat buffer `out`."""
        from evomerge.merge.fused import kernels, prepasses

        table, host_table = prepared
        method = self.methods[table.method]
        packed = torch.from_numpy(host_table).to(self.device)
        ratios, stager = self._ratios, self._stager
        if stager is None:
            raise RuntimeError("launch before fill: the sources hold nothing yet")
        rescale = method.fused_trim is FusedTrim.RANDOM and bool(table.rescale.any())
        exact = method.fused_trim is FusedTrim.MAGNITUDE and table.split_ties
        # Uploaded once, not per chunk: a pageable upload waits for the queued kernels.
        unscaled = torch.from_numpy((table.densities >= 1) | ~table.rescale[:, None]).to(self.device)
        for chunk, stage in zip(self._chunks, stager.stages(), strict=True):
            if rescale:
                after = prepasses.kept_l1(chunk, stage, packed, self._segment_start, self._segment_numel)
                rows = slice(chunk.record.first, chunk.record.last)
                ratios[rows] = prepasses.rescale_ratios(self.before_l1[rows], after.to(self.work_dtype), unscaled[rows])
            tied_before = self._no_ties
            if exact:
                tied_before = prepasses.tied_before(chunk, stage, packed, self._segment_start, self._segment_numel)
            grid = (chunk.block_segment.numel(),)
            kernels.task_vector_merge_kernel[grid](
                stage.base,
                stage.deltas,
                packed,
                ratios,
                tied_before,
                out[chunk.record.origin :],
                chunk.block_segment,
                self._segment_start,
                self._segment_numel,
                chunk.record.origin,
                stage.elements,
                M=len(self.experts),
                P=packed.shape[1],
                SPARSIFY=int(_kernel_trim(method)),
                CONSENSUS=method.sign_consensus,
                RESCALE=rescale,
                WORK=ROUND_CODES[self.work_dtype],
                OUT=ROUND_CODES[self.out_dtype],
                BLOCK=BLOCK,
                EXACT=exact,
                enable_fp_fusion=False,
            )
            stager.release(stage)


def _shape(validated: ValidatedMerge, plan) -> tuple[int, ...]:
    model, name = plan.inputs[plan.base_index]
    return tuple(validated.folders[model].tensors[name].shape)


def _uniform(dtypes, what: str) -> torch.dtype:
    found = set(dtypes)
    if len(found) != 1 or next(iter(found)) not in ROUND_CODES:
        raise NotFusable(f"the fused kernel needs one float32/bfloat16/float16 {what}, found {sorted(map(str, found))}")
    return found.pop()
