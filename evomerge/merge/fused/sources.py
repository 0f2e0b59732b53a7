"""The fused per-candidate merge: task arithmetic, TIES and DARE as one kernel over flat buffers.

A search worker merges the same sources thousands of times with different parameters. Everything
that depends only on the sources is done once, when `FusedSources.load` reads them:

* one flat buffer holds the base tensors, one row per expert holds its task vector (delta);
* for magnitude trims (TIES) each delta's int32 magnitude rank, and a table of its distinct
  magnitudes with their counts, so a density's threshold is a host-side binary search;
* for DARE's rescale, each delta's L1 norm.

A candidate then costs a small parameter table upload and one kernel launch over the whole model
(two for DARE: the kept L1 norms first), writing straight into the resident model, whose
parameters are views of one flat output buffer (`adopt_model`).

Sources live on the GPU when they fit with the model and evaluation headroom. Otherwise they stay
in pinned host memory and are streamed in chunks of whole tensors, the next chunk's copy
overlapping the current chunk's kernel ("host" placement).

Results equal `engine.merge_tensor` bit for bit for deterministic methods (tests run the kernels
under Triton's CPU interpreter against it). DARE draws its masks from Triton's Philox stream, keyed
by (seed, tensor, input), so its masks differ from the CPU path's, as they differ between torch's
CPU and CUDA generators.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import tensor_seed
from evomerge.merge.fused.tables import MagnitudeTables, ParameterTable
from evomerge.merge.io import LazyTensorReader
from evomerge.merge.methods import METHODS, MethodInfo, magnitude_rank
from evomerge.merge.validate import ValidatedMerge, validate_merge_config

BLOCK = 1024
SPARSIFY_CODES = {None: 0, "magnitude": 1, "random": 2}
ROUND_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DEFAULT_CHUNK_BYTES = 512 * 1024**2


class NotFusable(Exception):
    """This merge or candidate cannot take the fused path; the caller uses the reference path."""


def fused_unavailable_reason(device: str, method: MethodInfo, interpreter_ok: bool = False) -> str | None:
    """None when the fused kernel can run `method` on `device`, else why not.

    `interpreter_ok` lets tests run it on CPU under TRITON_INTERPRET=1 (set before triton is
    imported); a worker never picks that path, it is far slower than the reference path.
    """
    if method.family != "task_vector" or method.sparsification not in SPARSIFY_CODES:
        return f"method {method.name} has no fused kernel"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.startswith("cuda"):
        return None if torch.cuda.is_available() else "CUDA is not available"
    if interpreter_ok and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "the fused kernel needs CUDA (or TRITON_INTERPRET=1, Triton's CPU interpreter)"


@dataclass(frozen=True)
class FlatLayout:
    """Where each output tensor lives in the flat buffers: segments padded to whole blocks."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    starts: np.ndarray
    numels: np.ndarray
    total: int

    @classmethod
    def of(cls, names: list[str], shapes: list[tuple[int, ...]]) -> FlatLayout:
        numels = np.array([int(np.prod(shape, dtype=np.int64)) for shape in shapes], dtype=np.int64)
        padded = -(-numels // BLOCK) * BLOCK
        starts = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
        return cls(tuple(names), tuple(tuple(s) for s in shapes), starts, numels, int(padded.sum()))

    def view(self, flat: torch.Tensor, segment: int) -> torch.Tensor:
        start = int(self.starts[segment])
        return flat[..., start : start + int(self.numels[segment])].view(*flat.shape[:-1], *self.shapes[segment])

    def block_segments(self, first: int, last: int) -> np.ndarray:
        """Segment index of every block of segments first..last-1."""
        blocks = -(-self.numels[first:last] // BLOCK)
        return np.repeat(np.arange(first, last, dtype=np.int32), blocks)

    def chunks(self, max_elements: int) -> list[tuple[int, int]]:
        """Runs of whole segments of at most max_elements each (or one segment, if bigger)."""
        runs, first = [], 0
        ends = self.starts + -(-self.numels // BLOCK) * BLOCK
        for segment in range(1, len(self.names) + 1):
            if segment == len(self.names) or ends[segment] - self.starts[first] > max_elements:
                runs.append((first, segment))
                first = segment
        return runs


@dataclass
class Chunk:
    """One launch's worth of segments, with its buffers where the kernel can read them."""

    first: int
    last: int
    origin: int  # flat offset of the chunk's first element
    elements: int
    block_segment: torch.Tensor
    block_begins: torch.Tensor  # per segment of the chunk, its first and one-past-last block
    block_ends: torch.Tensor


@dataclass
class Stage:
    """The buffers a launch reads: the flat sources themselves, or a device copy of one chunk of them."""

    base: torch.Tensor
    deltas: torch.Tensor
    ranks: torch.Tensor  # the deltas again when nothing is ranked: the kernel then never reads it
    ready: torch.cuda.Event | None = None  # the chunk's copy has landed (host placement on CUDA)
    free: torch.cuda.Event | None = None  # the last launch reading this stage has finished


class FusedSources:
    """The sources of a task-vector search as flat buffers, merged by the fused kernel."""

    def __init__(self, validated: ValidatedMerge, method: MethodInfo, device: str, placement: str):
        self.validated = validated
        self.method = method
        self.device = torch.device(device)
        self.placement = placement
        plans = validated.plan.tensors
        self.experts = _expert_models(validated)
        self.layout = FlatLayout.of([p.output for p in plans], [_shape(validated, p) for p in plans])
        self.segment_of = {name: index for index, name in enumerate(self.layout.names)}
        self.refs = [_segment_refs(plan, self.experts) for plan in plans]
        self.work_dtype = _uniform(validated.working_dtype.values(), "working dtype")
        self.out_dtype = _uniform(validated.out_dtype.values(), "output dtype")
        self.before_l1 = torch.ones((len(plans), len(self.experts)), dtype=self.work_dtype, device=self.device)
        self.magnitudes = MagnitudeTables(len(plans), len(self.experts))
        # Empty until `_allocate`: `estimate_bytes` builds sources without ever holding them.
        self.base = torch.empty(0, dtype=self.work_dtype)
        self.deltas = torch.empty(0, dtype=self.work_dtype)
        self.ranks: torch.Tensor | None = None
        self._stages: list[Stage] = []

    def _allocate(self) -> None:
        """The flat buffers: on the device, or pinned in host memory for streaming."""
        storage = self.device if self.placement == "device" else torch.device("cpu")
        pin = self.placement == "host" and torch.cuda.is_available()
        experts, total = len(self.experts), self.layout.total
        self.base = _zeros((total,), self.work_dtype, storage, pin)
        self.deltas = _zeros((experts, total), self.work_dtype, storage, pin)
        if self.method.sparsification == "magnitude":
            self.ranks = _zeros((experts, total), torch.int32, storage, pin)

    @classmethod
    def load(
        cls,
        config: MergeConfig,
        method_name: str,
        device: str,
        placement: str = "auto",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> FusedSources:
        """Read every source once, tensor by tensor, computing deltas, ranks and tables on `device`.

        `placement` "auto" keeps the buffers on the device when they fit beside the (already
        resident) model, else in host memory (`fitting_placement`).
        """
        method = METHODS[method_name]
        reason = fused_unavailable_reason(device, method, interpreter_ok=True)
        if reason:
            raise NotFusable(reason)
        validated = validate_merge_config(config)
        if any(plan.base_index is None for plan in validated.plan.tensors):
            raise NotFusable("every tensor needs a base model")
        sources = cls(validated, method, device, placement)
        if placement == "auto":
            sources.placement = sources.fitting_placement()
        sources._allocate()
        readers = {path: LazyTensorReader(folder) for path, folder in validated.folders.items()}
        for segment in range(len(sources.layout.names)):
            sources._load_segment(segment, readers)
        sources._prepare_launches(chunk_bytes)
        sources.magnitudes.build_index()
        return sources

    @classmethod
    def estimate_bytes(cls, config: MergeConfig, method_name: str) -> int:
        """Bytes `load` will hold for these sources (headers only, nothing read)."""
        return cls(validate_merge_config(config), METHODS[method_name], "cpu", "device").planned_bytes()

    def planned_bytes(self) -> int:
        return self.layout.total * self._bytes_per_element()

    def fitting_placement(self, headroom_fraction: float = 0.15) -> str:
        """ "device" when the buffers fit in free GPU memory with headroom, else "host".

        Keeps `headroom_fraction` of the GPU (at least 2 GiB) for evaluation activations and the
        flat output buffer's one-off copy of the model.
        """
        if self.device.type != "cuda":
            return "device"
        free, total = torch.cuda.mem_get_info(self.device)
        return "device" if self.planned_bytes() + max(2 * 1024**3, headroom_fraction * total) <= free else "host"

    def _load_segment(self, segment: int, readers: dict) -> None:
        base_ref, expert_refs = self.refs[segment]
        base = readers[base_ref[0]].read(base_ref[1], str(self.device)).to(self.work_dtype)
        self.layout.view(self.base, segment).copy_(base)
        for expert, ref in enumerate(expert_refs):
            if ref is None:
                continue
            delta = readers[ref[0]].read(ref[1], str(self.device)).to(self.work_dtype) - base
            self.layout.view(self.deltas[expert], segment).copy_(delta)
            self.before_l1[segment, expert] = delta.abs().sum()
            if self.ranks is not None:
                rank = magnitude_rank(delta)
                self.layout.view(self.ranks[expert], segment).copy_(rank)
                self.magnitudes.add(segment, expert, delta, rank)

    def _prepare_launches(self, chunk_bytes: int) -> None:
        """Per-chunk block tables, and for host placement two device staging buffers."""
        layout, device = self.layout, self.device
        self._segment_start = torch.from_numpy(layout.starts).to(device)
        self._segment_numel = torch.from_numpy(layout.numels).to(device)
        if self.placement == "device":
            runs = [(0, len(layout.names))]
        else:
            runs = layout.chunks(max(BLOCK, chunk_bytes // self._bytes_per_element()))
        self._chunks = []
        for first, last in runs:
            blocks = layout.block_segments(first, last)
            origin = int(layout.starts[first]) if self.placement == "host" else 0
            ends = np.cumsum(-(-layout.numels[first:last] // BLOCK))
            begins = np.concatenate([[0], ends[:-1]])
            self._chunks.append(
                Chunk(
                    first,
                    last,
                    origin,
                    len(blocks) * BLOCK,
                    torch.from_numpy(blocks).to(device),
                    torch.from_numpy(begins).to(device),
                    torch.from_numpy(ends).to(device),
                )
            )
        # Rows stay 1 where nothing is rescaled; DARE overwrites every row of each chunk it runs.
        self._ratios = torch.ones((len(layout.names), len(self.experts)), dtype=torch.float32, device=device)
        if self.placement == "host":
            widest = max(chunk.elements for chunk in self._chunks)
            self._stages = [self._stage_buffers(widest) for _ in range(2)]

    def _bytes_per_element(self) -> int:
        """Flat-buffer bytes per element: the base, and per expert its delta and (TIES) its int32 rank."""
        per_expert = self.work_dtype.itemsize + (4 if self.method.sparsification == "magnitude" else 0)
        return self.work_dtype.itemsize + len(self.experts) * per_expert

    def _stage_buffers(self, elements: int) -> Stage:
        experts, device = len(self.experts), self.device
        deltas = torch.empty((experts, elements), dtype=self.work_dtype, device=device)
        stage = Stage(
            base=torch.empty(elements, dtype=self.work_dtype, device=device),
            deltas=deltas,
            ranks=torch.empty((experts, elements), dtype=torch.int32, device=device)
            if self.ranks is not None
            else deltas,
        )
        if device.type == "cuda":
            stage.ready, stage.free = torch.cuda.Event(), torch.cuda.Event()
        return stage

    def _staged_chunks(self) -> Iterator[tuple[Chunk, Stage]]:
        """(chunk, buffers) per launch; host placement copies each chunk in, overlapping the last launch."""
        if self.placement == "device":
            ranks = self.ranks if self.ranks is not None else self.deltas
            yield self._chunks[0], Stage(self.base, self.deltas, ranks)
            return
        copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        for index, chunk in enumerate(self._chunks):
            stage = self._stages[index % 2]
            self._copy_in(stage, chunk, copy_stream)
            yield chunk, stage

    def _copy_in(self, stage: Stage, chunk: Chunk, copy_stream: torch.cuda.Stream | None) -> None:
        window = slice(chunk.origin, chunk.origin + chunk.elements)
        pairs = [
            (stage.base[: chunk.elements], self.base[window]),
            (stage.deltas[:, : chunk.elements], self.deltas[:, window]),
        ]
        if self.ranks is not None:
            pairs.append((stage.ranks[:, : chunk.elements], self.ranks[:, window]))
        if copy_stream is None or stage.ready is None or stage.free is None:
            for target, source in pairs:
                target.copy_(source)
            return
        copy_stream.wait_event(stage.free)
        with torch.cuda.stream(copy_stream):
            for target, source in pairs:
                target.copy_(source, non_blocking=True)
            stage.ready.record(copy_stream)
        torch.cuda.current_stream(self.device).wait_event(stage.ready)

    def _release_stage(self, stage: Stage) -> None:
        if stage.free is not None:
            stage.free.record(torch.cuda.current_stream(self.device))

    def byte_size(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.base, self.deltas, self.ranks) if t is not None)

    # ---- per candidate -------------------------------------------------------------------------

    def parameters(self, validated: ValidatedMerge, seed: int) -> ParameterTable:
        """The candidate's parameters per (tensor, expert); NotFusable if its plan differs in shape."""
        plans = validated.plan.tensors
        if validated.plan.method.name != self.method.name:
            raise NotFusable(f"sources were prepared for {self.method.name}, not {validated.plan.method.name}")
        if len(plans) != len(self.layout.names) or any(p.output not in self.segment_of for p in plans):
            raise NotFusable("the candidate writes a different set of tensors")
        table = ParameterTable(len(plans), len(self.experts))
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

    def prepare(self, validated: ValidatedMerge, seed: int = 0) -> tuple[ParameterTable, np.ndarray]:
        """Host-side work for one candidate (no device access, so it can overlap another's evaluation)."""
        table = self.parameters(validated, seed)
        thresholds: np.ndarray | None = None
        counts: np.ndarray | None = None
        if self.ranks is not None:
            counts = table.keep_counts(self.layout.numels)
            thresholds = self.magnitudes.thresholds(counts)
        return table, table.pack(self.work_dtype, thresholds, counts)

    def launch(self, prepared: tuple[ParameterTable, np.ndarray], out: torch.Tensor) -> None:
        """Run a prepared candidate's kernels, writing into the flat output buffer `out`."""
        from evomerge.merge.fused import kernels

        table, host_table = prepared
        packed = torch.from_numpy(host_table).to(self.device)
        ratios = self._ratios
        rescale = self.method.sparsification == "random" and bool(table.rescale.any())
        for chunk, stage in self._staged_chunks():
            if rescale:
                self._fill_ratios(ratios, chunk, stage, packed, table, kernels)
            grid = (chunk.block_segment.numel(),)
            kernels.task_vector_merge_kernel[grid](
                stage.base,
                stage.deltas,
                stage.ranks,
                packed,
                ratios,
                out[chunk.origin :],
                chunk.block_segment,
                self._segment_start,
                self._segment_numel,
                chunk.origin,
                stage.deltas.stride(0),
                M=len(self.experts),
                P=packed.shape[1],
                SPARSIFY=SPARSIFY_CODES[self.method.sparsification],
                CONSENSUS=self.method.sign_consensus,
                RESCALE=rescale,
                WORK=ROUND_CODES[self.work_dtype],
                OUT=ROUND_CODES[self.out_dtype],
                BLOCK=BLOCK,
                enable_fp_fusion=False,
            )
            self._release_stage(stage)

    def _fill_ratios(self, ratios, chunk: Chunk, stage: Stage, packed, table: ParameterTable, kernels) -> None:
        """DARE's L1 rescale factors for the chunk's tensors, computed as `l1_rescaled` does."""
        blocks = chunk.block_segment.numel()
        partial = torch.empty((len(self.experts), blocks), dtype=torch.float32, device=self.device)
        kernels.kept_magnitude_kernel[(blocks,)](
            stage.deltas,
            packed,
            partial,
            chunk.block_segment,
            self._segment_start,
            self._segment_numel,
            chunk.origin,
            stage.deltas.stride(0),
            M=len(self.experts),
            P=packed.shape[1],
            BLOCK=BLOCK,
            enable_fp_fusion=False,
        )
        running = torch.nn.functional.pad(partial.double().cumsum(dim=1), (1, 0))
        after = (running[:, chunk.block_ends] - running[:, chunk.block_begins]).T.to(self.work_dtype)
        before = self.before_l1[chunk.first : chunk.last]
        rows = slice(chunk.first, chunk.last)
        unscaled = torch.from_numpy((table.densities[rows] >= 1) | ~table.rescale[rows, None]).to(self.device)
        unscaled = unscaled | (before < 1e-7) | (after < 1e-7)
        ratios[rows] = torch.where(unscaled, torch.ones_like(before), before / after).float()


def _expert_models(validated: ValidatedMerge) -> list[str]:
    experts: list[str] = []
    for plan in validated.plan.tensors:
        for index, (model, _) in enumerate(plan.inputs):
            if index != plan.base_index and model not in experts:
                experts.append(model)
    return experts


def _segment_refs(plan, experts: list[str]):
    """(base ref, one ref or None per expert) for one output tensor."""
    by_model = {ref[0]: ref for index, ref in enumerate(plan.inputs) if index != plan.base_index}
    return plan.inputs[plan.base_index], [by_model.get(model) for model in experts]


def _shape(validated: ValidatedMerge, plan) -> tuple[int, ...]:
    model, name = plan.inputs[plan.base_index]
    return tuple(validated.folders[model].tensors[name].shape)


def _uniform(dtypes, what: str) -> torch.dtype:
    found = set(dtypes)
    if len(found) != 1 or next(iter(found)) not in ROUND_CODES:
        raise NotFusable(f"the fused kernel needs one float32/bfloat16/float16 {what}, found {sorted(map(str, found))}")
    return found.pop()


def _zeros(shape, dtype: torch.dtype, device: torch.device, pin: bool) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
