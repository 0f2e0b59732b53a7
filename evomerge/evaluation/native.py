"""The native scoring backend: a Hugging Face causal LM run in this process, in big sorted batches.

Loglikelihood requests are scored the way lm-eval's HFLM scores them (same truncation, right
padding without an attention mask, log-softmax over the vocabulary, greedy check per token), with
three differences that change speed, not results:

* requests whose model input is the same token sequence share one forward, as lm-eval groups
  them, and the rest are length-sorted into batches sized by a token budget, not a row count;
* the logits are computed only at the continuation positions (`logits_to_keep`), not over the
  whole vocabulary at every position;
* the batches and their tensors are planned once per request list and reused for every candidate.

The log-softmax runs in float32 whatever the model's dtype (lm-eval runs it in the logits' dtype),
so bfloat16 scores are more precise than lm-eval's; in float32 the two agree to rounding.
Generation is in `generation.py`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import transformers.modeling_utils

from evomerge.evaluation.backend import BackendName, GenerationRequest, Loglikelihood, ScoringBackend, TokenPair
from evomerge.evaluation.batching import token_budget_batches
from evomerge.evaluation.generation import GreedyGenerator

# Tokens per forward batch when evaluation.token_budget is not set. A GPU needs big batches to be
# busy; on CPU, batches that stay in cache are faster (the demo's 360 docs: 0.24 s at 512 tokens,
# 0.65 s at 16384, one thread).
GPU_TOKEN_BUDGET = 16384
CPU_TOKEN_BUDGET = 512
# Generation batches are bounded by their KV cache (prompt + new tokens per row), on any device:
# decoding costs a forward per step whatever the batch, so on CPU too the biggest batch wins.
GENERATION_TOKEN_BUDGET = 16384
# lm-eval right-pads loglikelihood batches with zeros; causal attention keeps them out of every
# real position, so any id would do, and this one matches lm-eval's tensors.
RIGHT_PAD_ID = 0


@dataclass(frozen=True)
class ForwardBatch:
    """One forward's tensors, and where its answers go."""

    input_ids: torch.Tensor  # [rows, width], right-padded
    positions: torch.Tensor  # [rows, span]: the logit positions to keep, per row
    request_rows: torch.Tensor  # [requests]: each request's row
    targets: torch.Tensor  # [requests, span]: continuation tokens, right-aligned, 0 where masked
    mask: torch.Tensor  # [requests, span]: True where targets holds a continuation token
    request_index: tuple[int, ...]  # each request's position in the caller's list


def default_token_budget(device: torch.device) -> int:
    return GPU_TOKEN_BUDGET if device.type == "cuda" else CPU_TOKEN_BUDGET


class TorchBackend(ScoringBackend):
    """Scores lm-eval's tokenized requests with `model`, whose weights may change between calls."""

    name = BackendName.NATIVE

    def __init__(self, model, tokenizer, max_length: int, token_budget: int | None = None):
        self.model = model
        self.max_length = max_length
        self.device = next(model.parameters()).device
        self.token_budget = token_budget or default_token_budget(self.device)
        # Per-row positions (a 2-D logits_to_keep) need transformers' slice_logits_to_keep; older
        # releases (the one vLLM pins, say) take only an int or 1-D tensor and get the full logits.
        self._keeps_positions = "logits_to_keep" in inspect.signature(model.forward).parameters and hasattr(
            transformers.modeling_utils, "slice_logits_to_keep"
        )
        self._generator = GreedyGenerator(model, tokenizer, token_budget or GENERATION_TOKEN_BUDGET)
        # The caller passes the same request list for every candidate: its plan is kept with it.
        self._planned: tuple[Sequence[TokenPair], list[ForwardBatch]] | None = None

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[TokenPair]) -> list[Loglikelihood]:
        if self._planned is None or self._planned[0] is not requests:
            self._planned = (requests, self._plan(requests))
        batches = self._planned[1]
        # Results stay on the device until every batch is queued: one transfer, no stall per batch.
        scored = [self._score(batch) for batch in batches]
        logprobs = torch.cat([summed for summed, _ in scored]).tolist()
        greedy = torch.cat([all_greedy for _, all_greedy in scored]).tolist()
        order = [index for batch in batches for index in batch.request_index]
        results: list[Loglikelihood | None] = [None] * len(requests)
        for index, logprob, is_greedy in zip(order, logprobs, greedy, strict=True):
            results[index] = Loglikelihood(logprob, is_greedy)
        return results  # type: ignore[return-value]  # every index is filled by exactly one batch

    def generate_until(self, requests: Sequence[GenerationRequest]) -> list[str]:
        return self._generator.generate(requests)

    def _plan(self, requests: Sequence[TokenPair]) -> list[ForwardBatch]:
        """Group requests by model input (lm-eval's one forward per shared context), then batch."""
        inputs: dict[tuple[int, ...], list[int]] = {}
        for index, request in enumerate(requests):
            if not request.context or not request.continuation:
                raise ValueError(f"request {index} has an empty context or continuation; lm-eval never builds one")
            # lm-eval's left truncation: keep the last max_length + 1 tokens, feed all but the last.
            whole = (request.context + request.continuation)[-(self.max_length + 1) :]
            inputs.setdefault(whole[:-1], []).append(index)
        sequences = list(inputs)
        batches = token_budget_batches([len(sequence) for sequence in sequences], self.token_budget)
        return [self._forward_batch([sequences[i] for i in batch], inputs, requests) for batch in batches]

    def _forward_batch(
        self, sequences: list[tuple[int, ...]], inputs: dict[tuple[int, ...], list[int]], requests: Sequence[TokenPair]
    ) -> ForwardBatch:
        width = max(len(sequence) for sequence in sequences)
        members = [(row, index) for row, sequence in enumerate(sequences) for index in inputs[sequence]]
        span = max(len(requests[index].continuation) for _, index in members)
        input_ids = torch.full((len(sequences), width), RIGHT_PAD_ID, dtype=torch.long)
        positions = torch.empty((len(sequences), span), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            # The last `span` positions of the row; a row shorter than the span repeats position 0
            # in columns that no continuation of that row reaches.
            positions[row] = torch.arange(len(sequence) - span, len(sequence)).clamp(min=0)
        targets = torch.zeros((len(members), span), dtype=torch.long)
        mask = torch.zeros((len(members), span), dtype=torch.bool)
        for slot, (_, index) in enumerate(members):
            continuation = requests[index].continuation
            targets[slot, span - len(continuation) :] = torch.tensor(continuation)
            mask[slot, span - len(continuation) :] = True
        return ForwardBatch(
            input_ids=input_ids.to(self.device),
            positions=positions.to(self.device),
            request_rows=torch.tensor([row for row, _ in members], device=self.device),
            targets=targets.to(self.device),
            mask=mask.to(self.device),
            request_index=tuple(index for _, index in members),
        )

    def _score(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per request: the continuation's summed log probability and whether it is all-greedy."""
        logprobs = torch.log_softmax(self._continuation_logits(batch).float(), dim=-1)  # [rows, span, vocab]
        rows = batch.request_rows.unsqueeze(-1)
        columns = torch.arange(batch.targets.shape[1], device=self.device).unsqueeze(0)
        # Indexed per request, never expanded to [requests, span, vocab]: several choices share a row.
        token_logprobs = logprobs[rows, columns, batch.targets]
        summed = torch.where(batch.mask, token_logprobs, torch.zeros_like(token_logprobs)).sum(-1)
        greedy = ((logprobs.argmax(-1)[batch.request_rows] == batch.targets) | ~batch.mask).all(-1)
        return summed, greedy

    def _continuation_logits(self, batch: ForwardBatch) -> torch.Tensor:
        if self._keeps_positions:
            return self.model(input_ids=batch.input_ids, logits_to_keep=batch.positions, use_cache=False).logits
        logits = self.model(input_ids=batch.input_ids, use_cache=False).logits
        return logits.gather(1, batch.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
