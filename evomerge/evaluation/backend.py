"""What a scoring backend does: model work on lm-eval's requests once they are token ids.

`requests.py` builds lm-eval's requests and tokenizes them once per worker; per candidate a
backend only runs the model and hands back what lm-eval's `LM` methods would return (a log
probability and greedy flag per loglikelihood request, a total per rolling request, a string per
generation). Everything after that (filters, `process_results`, aggregation) stays lm-eval's.

`native.TorchBackend` runs a Hugging Face model in this process; `vllm_backend.VllmBackend` runs a
vLLM engine that receives the same token ids and stop strings, and the resident model's weights
before each candidate (`prepare_candidate`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

# The output types whose requests a ScoringBackend answers (multiple_choice asks loglikelihood).
SCORED_OUTPUT_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling", "generate_until")


class BackendName(str, Enum):
    """`evaluation.backend`: who does the model work."""

    NATIVE = "native"  # evomerge's batched scorer behind lm-eval's tasks (evaluation/native.py)
    LM_EVAL = "lm_eval"  # lm-eval's own HFLM, every request rebuilt per candidate: the reference
    VLLM = "vllm"  # one vLLM engine per worker, each candidate's weights written in place (evaluation/vllm_backend.py)


@dataclass(frozen=True)
class TokenPair:
    """One loglikelihood request (or rolling window): score `continuation` after `context`."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Loglikelihood:
    """lm-eval's answer to a loglikelihood request."""

    logprob: float
    is_greedy: bool  # every continuation token is the argmax at its position


@dataclass(frozen=True)
class GenerationRequest:
    """One greedy generation: lm-eval's `until` and `max_gen_toks` already resolved."""

    context: tuple[int, ...]  # left-truncated as lm-eval truncates it
    until: tuple[str, ...]  # stop strings, the EOS text included, as lm-eval passes them
    max_gen_toks: int
    # The rest of the task's generation_kwargs, passed to the model's generate as lm-eval passes
    # them (sorted pairs, so that requests with equal settings share batches).
    generate_kwargs: tuple[tuple[str, Any], ...] = ()


class ScoringBackend(ABC):
    """Model work for one candidate's weights; results in request order, deterministic per weights."""

    name: BackendName

    def prepare_candidate(self, weights_changed: bool = True) -> None:
        """Called before each scoring; a backend that keeps its own copy of the weights syncs it when
        `weights_changed` (False: the same candidate's next slice, its weights already synced)."""
        return None  # the native backend scores the resident model itself

    @abstractmethod
    def loglikelihood(self, requests: Sequence[TokenPair]) -> list[Loglikelihood]:
        """Sum of the continuation's log probabilities, and whether greedy decoding would produce it."""

    @abstractmethod
    def generate_until(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Greedy continuation text, cut at the first stop string as lm-eval cuts it."""

    def loglikelihood_rolling(self, windows: Sequence[Sequence[TokenPair]]) -> list[float]:
        """Total log probability of each document, given as lm-eval's disjoint rolling windows."""
        flat = [window for document in windows for window in document]
        scored = iter(self.loglikelihood(flat))
        # A Python sum over floats, as lm-eval adds up a document's windows.
        return [sum(next(scored).logprob for _ in document) for document in windows]
