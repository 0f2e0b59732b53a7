"""The memory plan of a layer-path worker (`search.space: layers`), from headers alone.

Such a worker (merge/layer_paths.py) holds on its one device every source model whole, in the
merge dtype: the base, which is also the model it scores, and each expert. A candidate's path
references those layers, so a repeated layer costs nothing; only a scaled step gets its own
o_proj and down_proj (at most one pair per slot). The scorer's workspace is that of the deepest
path, `max_steps` layers: its KV cache grows with the depth.
"""

from __future__ import annotations

import math

import torch

from evomerge.merge.io import ModelFolder, inspect_model_folder, parse_dtype
from evomerge.merge.layer_paths import RESIDUAL_WRITERS
from evomerge.merge.memory_plan import (
    SCORER_TOKEN_BUDGET,
    DeviceBytes,
    MemoryPlan,
    Placement,
    host_memory,
    scorer_workspace_bytes,
)
from evomerge.merge.plan import split_layer_name

LAYER_PATH = "layers"  # the merge path the plan names


def plan_layer_memory(
    base: ModelFolder,
    experts: int,
    dtype: torch.dtype,
    steps: int,
    scales: bool,
    token_budget: int,
    gpu_bytes: int | None = None,
    gpus: int | None = None,
    cpu_workers: int = 2,
    gpu_workers: int | None = None,
) -> MemoryPlan:
    """Bytes per worker and whether they fit: one GPU each (`gpu_bytes`), or CPU workers in host memory."""
    width = dtype.itemsize
    elements = sum(math.prod(info.shape) for info in base.tensors.values())
    scaled = steps * _residual_writer_elements(base) * width if scales else 0
    workspace = scorer_workspace_bytes({**base.config, "num_hidden_layers": steps}, token_budget, width)
    device = DeviceBytes(
        "cpu" if gpu_bytes is None else "cuda:0", experts * elements * width, elements * width + scaled, 0, workspace
    )
    if gpu_bytes is None:
        capacity, workers = host_memory() // max(1, cpu_workers), cpu_workers
        fix = "this machine's memory cannot hold a CPU worker; plan for GPU nodes with --gpu-memory (and --gpus)"
    else:
        capacity, workers = gpu_bytes, gpus or 1
        workers = workers if gpu_workers is None else min(workers, gpu_workers)
        fix = "merge fewer experts (models.experts), or use GPUs with more memory (--gpu-memory)"
    note = f"layer paths of up to {steps} steps reference the sources' layers; only scaled steps copy tensors"
    plan = MemoryPlan(Placement.DEVICE, 1, workers, capacity, (device,), 0, LAYER_PATH, None, (note,))
    return plan if device.total <= capacity else MemoryPlan(**{**plan.__dict__, "fix": fix})


def _residual_writer_elements(base: ModelFolder) -> int:
    """Elements of one layer's o_proj and down_proj: what a scaled step copies."""
    found = 0
    for name, info in base.tensors.items():
        parts = split_layer_name(name)
        if parts and parts[1] == 0 and any(writer in name for writer in RESIDUAL_WRITERS):
            found += math.prod(info.shape)
    return found


def plan_for_spec(spec, base_folder: str, gpu_bytes: int | None, gpus: int | None) -> MemoryPlan:
    """`plan_layer_memory` for a layer-search spec whose base model lives in `base_folder`."""
    base = inspect_model_folder(base_folder, "models.base")
    return plan_layer_memory(
        base,
        len(spec.models.experts),
        parse_dtype(spec.merge.dtype, "merge.dtype") or torch.float32,
        spec.search.steps_for(base.num_layers),
        spec.search.scales,
        spec.evaluation.token_budget or SCORER_TOKEN_BUDGET,
        gpu_bytes,
        gpus,
        cpu_workers=spec.workers.count or 2,
        gpu_workers=spec.workers.count,
    )
