"""How much memory one search worker needs, and where its sources will live, from headers alone.

`evomerge validate` prints this plan before any weight is read; the worker places its sources by
the same rules (`sources_fit_device`, `placement.split_layers`), so the plan says what will happen.
Per device a worker holds:

* sources: for the fused path (task arithmetic, TIES, DARE) the base plus one delta per expert in
  the working dtype: 2 + 2E bytes per parameter in bf16, nothing per element beyond that; the
  reference path (other methods, CPU workers) also keeps every fine-tune and its cached delta;
* the model it scores, in the merge dtype;
* tables: the kernel's block and parameter tables (8 bytes per 1,024 elements, and per tensor;
  TIES adds 8 per expert and 16 per 1,024 elements while it counts the ties at its cuts);
* the scorer's workspace: one token budget of activations, the KV cache of generation, float32
  logits and log-probabilities, and the CUDA context; with `evaluation.backend: vllm`, the
  engine's bytes on the first device instead (`evaluation/vllm_memory.py`).

Placement: "device" when all of that fits one GPU; otherwise "host", where the sources stay in
host memory, one shared copy per node, and stream through two staging chunks on the GPU; "split"
when `workers.gpus_per_worker` is k > 1: layers (and their sources) are cut over k GPUs. Files
whose data is sparse (`truncate -s`) plan like real ones: only headers and config.json are read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

import torch

from evomerge.merge.fused.layout import BLOCK
from evomerge.merge.io import ModelFolder
from evomerge.merge.placement import split_layers
from evomerge.merge.registry import FusedTrim, MethodInfo

DEFAULT_WORKSPACE_BYTES = 2 * 1024**3  # when the scorer's shape is unknown
SCORER_TOKEN_BUDGET = 16384  # the GPU scorer's tokens per batch when evaluation.token_budget is unset
CUDA_CONTEXT_BYTES = 1024**3
DEFAULT_CHUNK_BYTES = 512 * 1024**2  # one host-placement staging chunk
TABLE_BYTES_PER_BLOCK = 8  # the kernel's block -> tensor and block -> its tensor's first block tables
TIE_BYTES_PER_BLOCK = 8  # per expert and block: tied elements counted, and those before the block
TIE_SCAN_BYTES_PER_BLOCK = 16  # one expert's int64 running count of ties, and its per-tensor start
TABLE_BYTES_PER_TENSOR = 256  # starts, sizes, ratios, norms and the candidate's parameter row
GIB = 1024**3
MEMORY_SIZE_LIMITS = (1024**2, 1024**5)  # what a --gpu-memory may be: 1 MiB to 1 PiB


class Placement(str, Enum):
    DEVICE = "device"
    SPLIT = "split"
    HOST = "host"


@dataclass(frozen=True)
class DeviceBytes:
    """One device's share of a worker."""

    device: str
    sources: int
    model: int
    tables: int
    workspace: int

    @property
    def resident(self) -> int:
        """What stays allocated between candidates: sources, model and tables."""
        return self.sources + self.model + self.tables

    @property
    def total(self) -> int:
        return self.resident + self.workspace


@dataclass(frozen=True)
class MemoryPlan:
    placement: Placement
    gpus_per_worker: int
    workers_per_node: int
    capacity: int  # bytes per device
    devices: tuple[DeviceBytes, ...]
    host_bytes_per_node: int  # the shared host copy (host placement)
    merge_path: str  # "fused" or "reference"
    fix: str | None = None  # what to change when it does not fit
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def bytes_per_device(self) -> int:
        return max(device.total for device in self.devices)

    @property
    def fits(self) -> bool:
        return self.fix is None

    def as_json(self) -> dict:
        return {
            "placement": self.placement.value,
            "gpus_per_worker": self.gpus_per_worker,
            "bytes_per_device": self.bytes_per_device,
            "fits": self.fits,
            "capacity_per_device": self.capacity,
            "workers_per_node": self.workers_per_node,
            "merge_path": self.merge_path,
            "host_bytes_per_node": self.host_bytes_per_node,
            "sources_on": "host" if self.host_bytes_per_node else "device",
            "devices": [
                {**asdict(device), "resident": device.resident, "total": device.total} for device in self.devices
            ],
            "fix": self.fix,
        }

    def lines(self) -> list[str]:
        where = {
            Placement.DEVICE: "sources on the device",
            Placement.SPLIT: f"layers and sources split over {self.gpus_per_worker} devices",
            Placement.HOST: "sources in host memory (one shared copy per node), streamed",
        }[self.placement]
        found = [
            f"memory plan: {self.placement.value} ({where}), {self.merge_path} merge, "
            f"{self.workers_per_node} worker(s) per node, {_gb(self.bytes_per_device)} of {_gb(self.capacity)} per device: "
            + ("fits" if self.fits else "does not fit")
        ]
        for device in self.devices:
            found.append(
                f"  {device.device}: sources {_gb(device.sources)}, model {_gb(device.model)}, "
                f"tables {_gb(device.tables)}, scorer workspace {_gb(device.workspace)}, total {_gb(device.total)}"
            )
        if self.host_bytes_per_node:
            found.append(f"  host: one shared copy of the sources per node, {_gb(self.host_bytes_per_node)}")
        return found + [f"  note: {note}" for note in self.notes]


@dataclass(frozen=True)
class PlanRequest:
    """What the plan depends on, taken from the spec and the command line."""

    base: ModelFolder
    experts: int
    method: MethodInfo
    work_dtype: torch.dtype
    model_dtype: torch.dtype
    gpus_per_worker: float = 1.0
    gpu_bytes: int | None = None  # None: CPU workers
    gpus: int | None = None  # GPUs per node
    token_budget: int = SCORER_TOKEN_BUDGET
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    cpu_workers: int = 2
    gpu_workers: int | None = None  # workers.count: at most this many per node, whatever the GPUs hold
    scorer_bytes: int | None = None  # a scorer other than the native one (a vLLM engine): its bytes on the first device


def is_fused(method: MethodInfo, on_gpu: bool) -> bool:
    return on_gpu and method.fused


def source_bytes_per_element(request: PlanRequest, fused: bool) -> int:
    width = request.work_dtype.itemsize
    if fused:
        return (1 + request.experts) * width
    # Reference path (engine.ResidentSources): every input, plus each expert's cached delta.
    cached = request.experts * width if request.method.task_vectors else 0
    # Cached magnitude ranks: breadcrumbs', and on CPU the TIES trim's (methods.device_tie_order).
    rank = request.method.magnitude_rank
    ranked = rank == "ascending" or (rank == "descending" and request.gpu_bytes is None)
    ranks = request.experts * 8 if ranked else 0
    return (1 + request.experts) * width + cached + ranks


def table_bytes(elements: int, tensors: int, tie_experts: int = 0) -> int:
    """The fused kernel's tables; `tie_experts` the experts a TIES trim counts ties of (0 for other methods)."""
    per_block = (
        TABLE_BYTES_PER_BLOCK + tie_experts * TIE_BYTES_PER_BLOCK + (TIE_SCAN_BYTES_PER_BLOCK if tie_experts else 0)
    )
    return elements // BLOCK * per_block + tensors * TABLE_BYTES_PER_TENSOR


def sources_fit_device(
    source_bytes: int, elements: int, free_bytes: int, workspace_bytes: int, tie_experts: int = 0
) -> bool:
    """The worker's rule for "device" placement: the records, their tables and the scorer's workspace fit."""
    return source_bytes + table_bytes(elements, 0, tie_experts) + workspace_bytes <= free_bytes


def scorer_workspace_bytes(config: dict, token_budget: int, itemsize: int, layer_share: float = 1.0) -> int:
    """Scoring memory for one token budget: activations, generation's KV cache, float32 logits, CUDA context."""
    hidden = int(config.get("hidden_size") or 0)
    if not hidden:
        return DEFAULT_WORKSPACE_BYTES
    intermediate = int(config.get("intermediate_size") or 4 * hidden)
    layers = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv_dim = int(config.get("num_key_value_heads") or heads) * head_dim
    vocab = int(config.get("vocab_size") or 0)
    activations = token_budget * (4 * hidden + 3 * intermediate) * itemsize
    kv_cache = int(token_budget * layers * layer_share * 2 * kv_dim * itemsize)
    logits = 2 * token_budget * vocab * 4
    return activations + kv_cache + logits + CUDA_CONTEXT_BYTES


def plan_memory(request: PlanRequest) -> MemoryPlan:
    """The placement a worker will use and its bytes per device; `fix` says what to change if nothing fits."""
    if request.gpu_bytes is None:
        return _cpu_plan(request)
    k = max(1, round(request.gpus_per_worker)) if request.gpus_per_worker >= 1 else 1
    share = min(1.0, request.gpus_per_worker)  # a fraction of a GPU: that share of its memory
    capacity = int(request.gpu_bytes * share)
    gpus = request.gpus or k
    workers = max(0, int(gpus / request.gpus_per_worker))
    if request.gpu_workers is not None:
        workers = min(workers, request.gpu_workers)
    if k > gpus:
        return _refused(
            request,
            capacity,
            k,
            workers,
            f"workers.gpus_per_worker: {k} is more than the {gpus} GPUs per node; use at most {gpus}",
        )
    plan = _gpu_plan(request, k, capacity, workers)
    if plan.fits:
        return plan
    return _with_fix(plan, _fix_for(request, capacity, gpus))


def _gpu_plan(request: PlanRequest, k: int, capacity: int, workers: int) -> MemoryPlan:
    """Sources on the k devices if they fit, else (fused path only) streamed from host memory."""
    fused = is_fused(request.method, on_gpu=True)
    path = "fused" if fused else "reference"
    devices = _device_shares(request, k, fused)
    placement = Placement.SPLIT if k > 1 else Placement.DEVICE
    on_device = MemoryPlan(placement, k, workers, capacity, tuple(devices), 0, path)
    if on_device.bytes_per_device <= capacity:
        return on_device
    staged = tuple(replace(d, sources=min(d.sources, 2 * request.chunk_bytes)) for d in devices)
    notes = (
        ("the sources do not fit the k devices; each streams its layers' sources from host memory",) if k > 1 else ()
    )
    host_copy = sum(device.sources for device in devices)
    streamed = MemoryPlan(
        Placement.HOST if k == 1 else placement, k, workers, capacity, staged, host_copy, path, None, notes
    )
    if fused and streamed.bytes_per_device <= capacity:
        return streamed
    return _with_fix(on_device, "")


def _device_shares(request: PlanRequest, k: int, fused: bool) -> list[DeviceBytes]:
    """Each device's bytes with the model's units cut over k devices as the worker cuts them."""
    names = list(request.base.tensors)
    split = split_layers(request.base, [f"cuda:{i}" for i in range(k)], names)
    per_element = source_bytes_per_element(request, fused)
    width = request.model_dtype.itemsize
    workspace = scorer_workspace_bytes(request.base.config, request.token_budget, width, 1 / k)
    shares = []
    for part in range(k):
        if request.scorer_bytes is not None:
            workspace = request.scorer_bytes if part == 0 else 0
        mine = split.tensors_on(part, names)
        numels = [_numel(request.base.tensors[name].shape) for name in mine]
        # The fused layout pads every tensor to whole kernel blocks (fused/layout.py).
        elements = sum(_padded(n) for n in numels) if fused else sum(numels)
        ties = request.experts if request.method.fused_trim is FusedTrim.MAGNITUDE else 0
        tables = table_bytes(elements, len(mine), ties) if fused else 0
        shares.append(DeviceBytes(f"cuda:{part}", elements * per_element, elements * width, tables, workspace))
    return shares


def _fix_for(request: PlanRequest, capacity: int, gpus: int) -> str:
    """The smallest change that fits: more GPUs per worker (sources on them if possible), else fewer experts."""
    splits = [
        (k, _gpu_plan(request, k, capacity, gpus // k))
        for k in range(max(1, round(request.gpus_per_worker)) + 1, gpus + 1)
    ]
    fitting = [(plan.host_bytes_per_node > 0, k, plan) for k, plan in splits if plan.fits]
    if fitting:  # sources on the GPUs beat fewer GPUs streaming from host memory
        streamed, k, plan = min(fitting, key=lambda found: found[:2])
        where = "sources streamed from host memory" if streamed else "sources on the GPUs"
        return f"set workers.gpus_per_worker: {k} (layers split over {k} GPUs, {where}, {gpus // k} worker(s) per node)"
    for experts in range(request.experts - 1, 0, -1):
        fewer = replace(request, experts=experts)
        if _gpu_plan(fewer, max(1, round(request.gpus_per_worker)), capacity, 1).fits:
            return f"merge at most {experts} expert(s) per search (models.experts)"
    return "use GPUs with more memory (--gpu-memory) or a smaller model"


def _with_fix(plan: MemoryPlan, fix: str) -> MemoryPlan:
    return replace(plan, fix=fix or "does not fit")


def _refused(request: PlanRequest, capacity: int, k: int, workers: int, fix: str) -> MemoryPlan:
    return MemoryPlan(Placement.SPLIT, k, workers, capacity, (DeviceBytes("cuda:0", 0, 0, 0, 0),), 0, "fused", fix)


def _cpu_plan(request: PlanRequest) -> MemoryPlan:
    """CPU workers take the reference path with everything resident in host memory."""
    elements = sum(_numel(info.shape) for info in request.base.tensors.values())
    per_element = source_bytes_per_element(request, fused=False)
    workspace = scorer_workspace_bytes(request.base.config, request.token_budget, request.model_dtype.itemsize)
    if request.scorer_bytes is not None:
        workspace = request.scorer_bytes
    device = DeviceBytes("cpu", elements * per_element, elements * request.model_dtype.itemsize, 0, workspace)
    capacity = host_memory() // max(1, request.cpu_workers)
    plan = MemoryPlan(Placement.DEVICE, 1, request.cpu_workers, capacity, (device,), 0, "reference")
    if device.total <= capacity:
        return plan
    fix = "this machine's memory cannot hold a CPU worker; plan for GPU nodes with --gpu-memory (and --gpus)"
    return _with_fix(plan, fix)


def parse_bytes(text: str, field_name: str) -> int:
    """'80GiB', '80GB', '141 GB', '81920MiB' -> bytes; ValueError naming the field otherwise."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    units |= {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("kmgtib")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    # A unit is required (a bare 80 would be 80 bytes); inf, nan and absurd sizes are no GPU's memory.
    if unit in ("", "b") or unit not in units or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field_name}: '{text}' is not a memory size; write it like 80GiB or 141GB (with a unit)")
    size = value * units[unit]
    if not MEMORY_SIZE_LIMITS[0] <= size <= MEMORY_SIZE_LIMITS[1]:
        raise ValueError(f"{field_name}: '{text}' is not a GPU's memory size; write it like 80GiB or 141GB")
    return int(size)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for extent in shape:
        total *= extent
    return total


def _padded(numel: int) -> int:
    return -(-numel // BLOCK) * BLOCK


def host_memory() -> int:
    """This machine's physical memory, in bytes."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gb(value: int) -> str:
    return f"{value / 1e9:.1f} GB"
