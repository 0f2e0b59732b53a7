"""What a vLLM engine adds to a worker's memory: for `evomerge validate`'s plan and for the engine's start.

The engine runs in the worker's process, on its first device, beside the resident sources and
model, and holds:

* its own copy of the weights, as many bytes as the resident model (vLLM's fused `qkv_proj` and
  `gate_up_proj` layouts hold the same elements in the same dtype). Where the resident model's
  tensors become views of it (`vllm_views.py`) the model's own copy is freed, but the fused merge
  path and the `reload_weights` path keep both, and which one a worker takes is known only once
  its engine runs: the plan counts both;
* one engine step's activations and float32 logits (prompt log probabilities take every
  position's), and the CUDA context;
* its KV cache. With `evaluation.vllm.gpu_memory_utilization` unset, `KV_CACHE_BYTES` or one
  request of the longest length, whichever is larger; set, whatever that share of the GPU leaves
  after the weights and activations (vLLM's own rule).

vLLM refuses to start unless its share of the GPU is free, and it starts after the sources and the
model are resident: its share must fit beside them. The plan counts these bytes as the scorer's
workspace; `gpu_memory_utilization` is the share both the plan and the engine use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from evomerge.errors import UserError
from evomerge.merge.memory_plan import MemoryPlan, PlanRequest, plan_memory, scorer_workspace_bytes

# Scoring short lm-eval prompts needs little cache; vLLM's default (most of the free memory) would
# take what the worker's sources need.
KV_CACHE_BYTES = 1 << 30
# vLLM's largest default tokens per engine step for offline use (the LLM class on a GPU).
ENGINE_STEP_TOKENS = 16384
# lm-eval's context length when neither evaluation.max_length nor the config gives one.
DEFAULT_MAX_LENGTH = 2048
# Config keys lm-eval reads the model's context length from, in its order.
CONTEXT_LENGTH_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")
# The engine's context is the scorer's max_length plus lm-eval's one-token overhang, plus one.
CONTEXT_MARGIN = 2
UTILIZATION_FIELD = "evaluation.vllm.gpu_memory_utilization"


@dataclass(frozen=True)
class EngineBytes:
    weights: int
    activations: int  # one step's activations and logits, and the CUDA context
    kv_cache: int  # negative when the share leaves nothing for it
    kv_needed: int  # one request of the engine's longest length
    utilization: float | None  # the spec's share of the GPU, else None

    @property
    def total(self) -> int:
        return self.weights + self.activations + max(0, self.kv_cache)

    def least_utilization(self, gpu_bytes: int) -> float:
        """The smallest share (in hundredths) that holds the weights, activations and one longest request."""
        return math.ceil((self.weights + self.activations + self.kv_needed) / gpu_bytes * 100) / 100

    def shortfall(self, gpu_bytes: int) -> str | None:
        """One line naming the field and its fix when the spec's share leaves too little KV cache."""
        if self.utilization is None or self.kv_cache >= self.kv_needed:
            return None
        least = self.least_utilization(gpu_bytes)
        fix = f"raise it to at least {least:g} or unset it" if least <= 1 else "use evaluation.backend: native"
        return (
            f"{UTILIZATION_FIELD}: {self.utilization:g} of the GPU leaves the engine "
            f"{max(0, self.kv_cache) / 1e9:.2f} GB of KV cache after its copy of the weights "
            f"({self.weights / 1e9:.1f} GB) and activations ({self.activations / 1e9:.1f} GB), less than one request "
            f"of {_gb(self.kv_needed)}; {fix}"
        )

    def describe(self) -> str:
        kv = f"KV cache {max(0, self.kv_cache) / 1e9:.1f} GB"
        share = f", {UTILIZATION_FIELD}: {self.utilization:g}" if self.utilization is not None else ""
        return (
            f"the vLLM engine is the scorer: its copy of the weights {_gb(self.weights)}, "
            f"activations {_gb(self.activations)}, {kv}{share}"
        )


def plan_for_backend(request: PlanRequest, evaluation) -> MemoryPlan:
    """`plan_memory` with the spec's scorer: the native scorer's workspace, or the vLLM engine's bytes."""
    if evaluation.backend.value != "vllm":
        return plan_memory(request)
    utilization = evaluation.vllm.gpu_memory_utilization if evaluation.vllm else None
    engine = planned_engine(request, evaluation.max_length, utilization)
    shortfall = engine.shortfall(request.gpu_bytes) if request.gpu_bytes else None
    if shortfall:
        raise UserError(shortfall)
    plan = plan_memory(replace(request, scorer_bytes=engine.total))
    plan = replace(plan, notes=(*plan.notes, engine.describe()))
    if plan.fits or utilization is None or not request.gpu_bytes:
        return plan
    # The spec's share is what does not fit: the largest smaller one that fits and holds one request.
    least = round(engine.least_utilization(request.gpu_bytes) * 100)
    for hundredths in range(math.ceil(utilization * 100) - 1, least - 1, -1):
        smaller = planned_engine(request, evaluation.max_length, hundredths / 100)
        if plan_memory(replace(request, scorer_bytes=smaller.total)).fits:
            fix = (
                f"{UTILIZATION_FIELD}: {utilization:g} asks for {_gb(engine.total)} of each GPU, more than the "
                f"worker's sources and model leave; lower it to at most {hundredths / 100:g}"
            )
            return replace(plan, fix=fix)
    return plan


def planned_engine(request: PlanRequest, max_length: int | None, utilization: float | None) -> EngineBytes:
    """The engine's bytes for the plan's model, from its headers."""
    itemsize = request.model_dtype.itemsize
    weights = sum(math.prod(info.shape) for info in request.base.tensors.values()) * itemsize
    context = context_tokens(request.base.config, max_length)
    return engine_bytes(request.base.config, weights, itemsize, context, request.gpu_bytes, utilization)


def context_tokens(config: dict, max_length: int | None) -> int:
    """The engine's longest request, from evaluation.max_length or the config as lm-eval reads it."""
    if max_length is None:
        found = [int(config[key]) for key in CONTEXT_LENGTH_KEYS if config.get(key)]
        max_length = found[0] if found else DEFAULT_MAX_LENGTH
    return max_length + CONTEXT_MARGIN


def kv_bytes_per_token(config: dict, itemsize: int) -> int:
    layers = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size") or 0) // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return 2 * layers * kv_heads * head_dim * itemsize


def engine_bytes(
    config: dict,
    weight_bytes: int,
    itemsize: int,
    context: int,
    gpu_bytes: int | None,
    utilization: float | None = None,
) -> EngineBytes:
    """The engine's bytes on its device; `gpu_bytes` None for a CPU engine (no share applies)."""
    # layer_share 0: the native scorer's own KV cache term; the engine's is counted apart.
    activations = scorer_workspace_bytes(config, ENGINE_STEP_TOKENS, itemsize, layer_share=0.0)
    needed = context * kv_bytes_per_token(config, itemsize)
    if utilization is None or gpu_bytes is None:
        return EngineBytes(weight_bytes, activations, max(KV_CACHE_BYTES, needed), needed, None)
    kv_cache = int(utilization * gpu_bytes) - weight_bytes - activations
    return EngineBytes(weight_bytes, activations, kv_cache, needed, utilization)


def model_engine_bytes(model, context: int, gpu_bytes: int | None, utilization: float | None) -> EngineBytes:
    """`engine_bytes` for a loaded Hugging Face model (tied weights counted once)."""
    tensors = {tensor.data_ptr(): tensor for tensor in model.state_dict().values()}
    weights = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    return engine_bytes(model.config.to_dict(), weights, model.dtype.itemsize, context, gpu_bytes, utilization)


def worker_engine_bytes(model, evaluation, device: str) -> int | None:
    """What a search worker sets aside for the engine on its first device; None unless the backend is vllm."""
    if evaluation.backend.value != "vllm":
        return None
    import torch

    gpu_bytes = torch.cuda.get_device_properties(device).total_memory if device.startswith("cuda") else None
    utilization = evaluation.vllm.gpu_memory_utilization if evaluation.vllm else None
    context = context_tokens(model.config.to_dict(), evaluation.max_length)
    return model_engine_bytes(model, context, gpu_bytes, utilization).total


def engine_memory_arguments(engine: EngineBytes, gpu_bytes: int) -> dict:
    """vLLM's `gpu_memory_utilization` and `kv_cache_memory_bytes` for an engine on a GPU."""
    if engine.utilization is not None:
        return {"gpu_memory_utilization": engine.utilization}  # vLLM sizes the KV cache from its profile
    # With a fixed KV cache vLLM only checks that this share of the GPU is free when it starts.
    share = min(1.0, math.ceil(engine.total / gpu_bytes * 1000) / 1000)
    return {"gpu_memory_utilization": share, "kv_cache_memory_bytes": engine.kv_cache}


def _gb(value: int) -> str:
    return f"{value / 1e9:.1f} GB"
