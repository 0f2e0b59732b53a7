"""Greedy `generate_until` for the native backend: large length-sorted batches, two decoding loops.

lm-eval's HFLM runs `generate` in batches of `batch_size` prompts, and a batch runs until every
row has met a stop string (its stop test is batch-wide), so rows that finished early keep
computing. Here prompts are length-sorted into batches sized by a token budget (prompt + new
tokens per row: the KV cache), and each row stops on its own once its text holds a stop string or it emits an
end-of-sequence id. The text is decoded and cut exactly as lm-eval does it
(`skip_special_tokens=True`, then `postprocess_generated_text`), so the extra text lm-eval
generates past a stop is cut off anyway: the strings are the same.

Two loops, chosen per batch:

* `compact` (CPU): a plain greedy loop over the model's forward with a dynamic KV cache that
  drops finished rows from the batch, so each row costs only its own tokens. It is used only when
  the model's generation config and the task's kwargs add nothing to greedy argmax decoding (no
  repetition penalty, no suppressed tokens, ...), which is when it equals `generate`.
* `generate` (GPU, and any config with logits processors): the model's own `generate` with the
  arguments lm-eval passes and a static KV cache, so the library applies every processor and, on a
  GPU, compiles the decoding step and replays it as a CUDA graph. Prompt widths are rounded up to
  a multiple of `WIDTH_STEP` so that few shapes occur; the batches are the same for every
  candidate of a worker, so only the first one pays for compiling.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from itertools import groupby

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from evomerge.evaluation.backend import GenerationRequest
from evomerge.evaluation.batching import token_budget_batches

# More rows than this gain little even on a large GPU, and a static cache is sized by rows.
MAX_GENERATION_ROWS = 256
# Prompt widths are padded up to a multiple of this, so that a compiled decoding step (sized by the
# static cache: rows x (width + new tokens)) serves several batches instead of one.
WIDTH_STEP = 16
# Generation settings that make `generate` differ from plain argmax decoding, with their neutral values.
NEUTRAL_SETTINGS = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "guidance_scale": (None, 1.0),
    "num_beams": (None, 1),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "sequence_bias": (None,),
    "bad_words_ids": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "prompt_lookup_num_tokens": (None,),
}
# Task kwargs that greedy decoding ignores (sampling settings; do_sample itself is false by now).
GREEDY_IGNORED_KWARGS = {"do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p"}


class StopTest:
    """lm-eval's stop test for one row's generated tokens, confirmed on the row's whole text."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        # lm-eval looks back over the stop's own tokens plus two, since a model may spell the stop
        # in more tokens than the tokenizer would; a hit there is confirmed on the whole text.
        stop_lengths = [len(tokenizer.encode(stop, add_special_tokens=False)) for stop in self.stops]
        self.lookback = max(stop_lengths, default=0) + 2

    def finished(self, rows: Sequence[Sequence[int]]) -> list[bool]:
        """For each row of generated tokens: does its text hold a stop string?"""
        if not self.stops or not rows:
            return [False] * len(rows)
        windows = self.tokenizer.batch_decode([list(row[-self.lookback :]) for row in rows])
        return [
            self._holds_stop(window) and self._holds_stop(self.tokenizer.decode(list(row)))
            for row, window in zip(rows, windows, strict=True)
        ]

    def _holds_stop(self, text: str) -> bool:
        return any(stop in text for stop in self.stops)


class RowStopStrings(StoppingCriteria):
    """`generate`'s stopping criterion: finishes each row once its generated text holds a stop string."""

    def __init__(self, test: StopTest, prompt_width: int, rows: int):
        self.test = test
        self.prompt_width = prompt_width
        self.done = torch.zeros(rows, dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        pending = (~self.done).nonzero().flatten().tolist()
        generated = input_ids[pending, self.prompt_width :].tolist()
        for row, finished in zip(pending, self.test.finished(generated), strict=True):
            self.done[row] = finished
        return self.done.to(input_ids.device)


class GreedyGenerator:
    """Greedy generation for lm-eval's `generate_until` requests with `model`'s current weights."""

    def __init__(self, model, tokenizer, token_budget: int, loop: str | None = None):
        """`loop`: "compact" or "generate"; default compact on CPU where it equals generate (see module doc)."""
        self.model = model
        self.tokenizer = tokenizer
        self.token_budget = token_budget
        self.device = next(model.parameters()).device
        self.loop = loop or ("generate" if self.device.type == "cuda" else "compact")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        # Only compiled decoding (CUDA) gains from fewer distinct widths; elsewhere padding is waste.
        self._width_step = WIDTH_STEP if self.device.type == "cuda" else 1

    @torch.no_grad()  # as `generate` itself runs: its compiled, CUDA-graphed step is tested that way
    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        from lm_eval.models.utils import postprocess_generated_text

        texts: list[str] = [""] * len(requests)

        def settings(index: int):
            request = requests[index]
            return request.max_gen_toks, request.until, repr(request.generate_kwargs)

        # Only requests with the same settings share a batch, as lm-eval groups them.
        for _, group in groupby(sorted(range(len(requests)), key=settings), key=settings):
            members = list(group)
            # A row holds its prompt and its new tokens in the KV cache: that is what the budget bounds.
            lengths = [len(requests[index].context) + requests[index].max_gen_toks for index in members]
            for batch in token_budget_batches(lengths, self.token_budget, MAX_GENERATION_ROWS):
                chosen = [members[position] for position in batch]
                for index, tokens in zip(chosen, self._generate_batch([requests[i] for i in chosen]), strict=True):
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    texts[index] = postprocess_generated_text(text, list(requests[index].until), None)
        return texts

    def _generate_batch(self, batch: list[GenerationRequest]) -> list[list[int]]:
        """Each row's generated tokens (pads after its end included, as lm-eval decodes them)."""
        longest = max(len(request.context) for request in batch)
        width = -(-longest // self._width_step) * self._width_step
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, width - len(request.context) :] = torch.tensor(request.context)
            attention_mask[row, width - len(request.context) :] = 1
        first = batch[0]
        test = StopTest(self.tokenizer, first.until)
        if self.loop == "compact" and self._plain_greedy(dict(first.generate_kwargs)):
            return self._compact_loop(
                input_ids.to(self.device), attention_mask.to(self.device), first.max_gen_toks, test
            )
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            max_length=width + first.max_gen_toks,
            stopping_criteria=StoppingCriteriaList([RowStopStrings(test, width, len(batch))]),
            pad_token_id=self.pad_id,
            use_cache=True,
            cache_implementation="static",
            **dict(first.generate_kwargs),
        )
        return output[:, width:].tolist()

    def _plain_greedy(self, kwargs: dict) -> bool:
        """Whether `generate` with these kwargs is plain argmax decoding that stops at EOS ids."""
        if set(kwargs) - GREEDY_IGNORED_KWARGS:
            return False
        config = copy.deepcopy(self.model.generation_config)
        config.update(**kwargs)
        return all(getattr(config, name, None) in neutral for name, neutral in NEUTRAL_SETTINGS.items())

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    def _compact_loop(self, input_ids, attention_mask, max_new: int, test: StopTest) -> list[list[int]]:
        """Greedy decoding that drops finished rows; positions and masks as `generate` builds them."""
        eos_ids = self._eos_ids()
        generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        active = list(range(input_ids.shape[0]))
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, attention_mask, positions, cache, **self._last_logits_only)
        for step in range(max_new):
            tokens = logits[:, -1].argmax(-1)
            for row, token in zip(active, tokens.tolist(), strict=True):
                generated[row].append(token)
            ended = [token in eos_ids for token in tokens.tolist()]
            stopped = test.finished([generated[row] for row in active])
            keep = [slot for slot in range(len(active)) if not (ended[slot] or stopped[slot])]
            if not keep or step == max_new - 1:
                break
            if len(keep) < len(active):
                kept = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(kept)
                attention_mask, positions, tokens = attention_mask[kept], positions[kept], tokens[kept]
                active = [active[slot] for slot in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            logits = self._forward(tokens.unsqueeze(-1), attention_mask, positions, cache)
        return generated

    def _forward(self, input_ids, attention_mask, positions, cache, **extra) -> torch.Tensor:
        arguments = {self._cache_argument: cache}
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            **arguments,
            **extra,
        )
        return output.logits
