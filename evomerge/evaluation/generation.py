"""Greedy `generate_until` for the native backend: large length-sorted batches, a static KV cache.

Each batch goes through the model's own `generate` with the arguments lm-eval's HFLM passes
(`do_sample=False`, `max_length` = padded prompt + `max_gen_toks`, the tokenizer's pad id, the
task's other generation kwargs, the model's generation config), so logits processors and EOS
handling are the library's. What differs is the batching and the stop test:

* prompts are length-sorted into batches sized by a token budget (prompt + new tokens per row);
* every row stops as soon as its own text holds a stop string. lm-eval's stop criterion is
  batch-wide: a row that has met its stop keeps generating until every row has, and the extra
  text is then cut off at the first stop string. The cut text is the same; only the wasted steps
  go.
* the KV cache is static, so on a GPU `generate` can compile the decoding step once per batch
  shape and replay it as a CUDA graph. The batches are the same for every candidate of a worker,
  so only the first candidate pays for compiling.

The text is decoded and cut exactly as lm-eval does it (`skip_special_tokens=True`, then
`postprocess_generated_text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from evomerge.evaluation.backend import GenerationRequest
from evomerge.evaluation.batching import token_budget_batches

# More rows than this gain little even on a large GPU, and a static cache is sized by rows.
MAX_GENERATION_ROWS = 256


class RowStopStrings(StoppingCriteria):
    """Finishes each row once its generated text holds one of its stop strings."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int, rows: int):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.prompt_width = prompt_width
        # lm-eval looks back over the stop's own tokens plus two, since a model may spell the stop
        # in more tokens than the tokenizer would; a hit there is confirmed on the whole text.
        stop_lengths = [len(tokenizer.encode(stop, add_special_tokens=False)) for stop in self.stops]
        self.lookback = max(stop_lengths, default=0) + 2
        self.done = torch.zeros(rows, dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if not self.stops:
            return self.done.to(input_ids.device)
        generated = input_ids[:, self.prompt_width :]
        pending = (~self.done).nonzero().flatten().tolist()
        windows = self.tokenizer.batch_decode(generated[pending, -self.lookback :].tolist())
        for row, window in zip(pending, windows, strict=True):
            if self._holds_stop(window) and self._holds_stop(self.tokenizer.decode(generated[row].tolist())):
                self.done[row] = True
        return self.done.to(input_ids.device)

    def _holds_stop(self, text: str) -> bool:
        return any(stop in text for stop in self.stops)


class GreedyGenerator:
    """Greedy generation for lm-eval's `generate_until` requests with `model`'s current weights."""

    def __init__(self, model, tokenizer, token_budget: int, max_rows: int = MAX_GENERATION_ROWS):
        self.model = model
        self.tokenizer = tokenizer
        self.token_budget = token_budget
        self.max_rows = max_rows
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        from lm_eval.models.utils import postprocess_generated_text

        texts: list[str] = [""] * len(requests)

        def settings(index: int):
            request = requests[index]
            return request.max_gen_toks, request.until, repr(request.generate_kwargs)

        # Only requests with the same settings share a `generate` call, as lm-eval groups them.
        for _, group in groupby(sorted(range(len(requests)), key=settings), key=settings):
            members = list(group)
            lengths = [len(requests[index].context) + requests[index].max_gen_toks for index in members]
            for batch in token_budget_batches(lengths, self.token_budget, self.max_rows):
                chosen = [members[position] for position in batch]
                for index, tokens in zip(chosen, self._generate_batch([requests[i] for i in chosen]), strict=True):
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    texts[index] = postprocess_generated_text(text, list(requests[index].until), None)
        return texts

    def _generate_batch(self, batch: list[GenerationRequest]) -> list[list[int]]:
        """Each row's generated tokens (pads after its end included, as lm-eval decodes them)."""
        width = max(len(request.context) for request in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, width - len(request.context) :] = torch.tensor(request.context)
            attention_mask[row, width - len(request.context) :] = 1
        first = batch[0]
        stops = RowStopStrings(self.tokenizer, first.until, width, len(batch))
        kwargs = dict(first.generate_kwargs)
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            max_length=width + first.max_gen_toks,
            stopping_criteria=StoppingCriteriaList([stops]),
            pad_token_id=self.pad_id,
            use_cache=True,
            cache_implementation="static",
            **kwargs,
        )
        return output[:, width:].tolist()
