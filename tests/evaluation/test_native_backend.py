"""The native backend's model work against lm-eval's HFLM on the same token ids, request by request.

Promises: loglikelihoods within 1e-5 and identical greedy flags (shared contexts, multi-token
continuations, left truncation); rolling totals within 1e-5; greedy generations identical strings
(stop strings, max_gen_toks, an EOS from the generation config); token-budget batches sorted and
within budget; results a function of the weights alone.
"""

from __future__ import annotations

import random

import pytest
import torch
from scoring_fixtures import char_model, char_tokenizer, single_torch_thread  # noqa: F401 - single_torch_thread is an autouse fixture

from evomerge.evaluation.backend import GenerationRequest, TokenPair
from evomerge.evaluation.batching import token_budget_batches
from evomerge.evaluation.generation import GreedyGenerator, RowStopStrings, StopTest
from evomerge.evaluation.native import TorchBackend
from evomerge.evaluation.requests import _generation_request, _rolling_windows, _tokenize_pair

MAX_LENGTH = 24


@pytest.fixture(scope="module")
def model():
    return char_model(seed=0)


@pytest.fixture(scope="module")
def lm(model):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=4, max_length=MAX_LENGTH)


def random_text(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice("0123456789+= abcdefghij") for _ in range(rng.randint(low, high)))


class FakeInstance:
    """What HFLM reads of an lm-eval Instance: its args."""

    def __init__(self, *args, task_name: str = "fixture"):
        self.args = args
        self.task_name = task_name


# ---------------------------------------------------------------- batching


def test_batches_are_longest_first_and_within_the_token_budget():
    lengths = [5, 17, 3, 17, 9, 40, 1, 9]

    batches = token_budget_batches(lengths, token_budget=36)

    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert flat.index(1) < flat.index(3)  # equal lengths keep index order
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 36
    assert batches[0] == [5]  # longer than the budget: a batch of its own
    assert token_budget_batches(lengths, token_budget=1000, max_rows=3)[0] == [5, 1, 3]


# ---------------------------------------------------------------- loglikelihood


def loglikelihood_cases(model, lm) -> list[tuple[str, str]]:
    rng = random.Random(0)
    cases = [(random_text(rng, 1, 30), random_text(rng, 1, 6)) for _ in range(40)]
    # Several continuations of one context: one-token ones share a forward, as in lm-eval.
    shared = random_text(rng, 5, 12)
    cases += [(shared, choice) for choice in ("1", "2", "a", "12", "abc")]
    cases += [("", "5+2=7"), ("trailing space ", "x")]
    # The greedy continuation itself, so that is_greedy is true somewhere.
    for context in ("5+2=", "abc", "7+7"):
        tokens = lm.tok_encode(context)
        with torch.no_grad():
            for _ in range(3):
                tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        cases.append((context, lm.tok_decode(tokens[len(lm.tok_encode(context)) :])))
    return cases


def test_loglikelihood_equals_hflm(model, lm):
    cases = loglikelihood_cases(model, lm)
    pairs = [_tokenize_pair(lm, context, continuation) for context, continuation in cases]
    # Longer than max_length + 1 somewhere: left truncation must match.
    assert max(len(p.context) + len(p.continuation) for p in pairs) > MAX_LENGTH + 1

    expected = lm._loglikelihood_tokens(
        [(case, list(p.context), list(p.continuation)) for case, p in zip(cases, pairs, strict=True)]
    )
    found = TorchBackend(model, char_tokenizer(), MAX_LENGTH, token_budget=64).loglikelihood(pairs)

    assert [answer.is_greedy for answer in found] == [greedy for _, greedy in expected]
    assert any(answer.is_greedy for answer in found)
    assert max(abs(answer.logprob - logprob) for answer, (logprob, _) in zip(found, expected, strict=True)) < 1e-5


def test_rolling_equals_hflm(model, lm):
    rng = random.Random(1)
    texts = [random_text(rng, 3, 70) for _ in range(12)]

    expected = lm.loglikelihood_rolling([FakeInstance(text) for text in texts], disable_tqdm=True)
    windows = [_rolling_windows(lm, text) for text in texts]
    found = TorchBackend(model, char_tokenizer(), MAX_LENGTH).loglikelihood_rolling(windows)

    assert max(len(document) for document in windows) > 2
    assert max(abs(a - b) for a, b in zip(found, expected, strict=True)) < 1e-5


def test_same_weights_same_scores_and_new_weights_new_scores(model):
    pairs = [TokenPair((5, 6, 7), (8, 9)), TokenPair((5, 6, 7, 8), (9,)), TokenPair((10,), (11, 12, 13))]
    backend = TorchBackend(model, char_tokenizer(), MAX_LENGTH)
    first = backend.loglikelihood(pairs)

    assert backend.loglikelihood(pairs) == first
    other = char_model(seed=1)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    try:
        with torch.no_grad():
            for parameter, replacement in zip(model.parameters(), other.parameters(), strict=True):
                parameter.copy_(replacement)
        changed = backend.loglikelihood(pairs)
        fresh = TorchBackend(other, char_tokenizer(), MAX_LENGTH).loglikelihood(pairs)
    finally:
        model.load_state_dict(original)
    assert changed == fresh
    assert changed != first


# ---------------------------------------------------------------- generation


def generation_cases() -> list[tuple[str, dict]]:
    rng = random.Random(2)
    prompts = [random_text(rng, 2, 14) for _ in range(14)]
    settings = [
        {"until": ["1"], "max_gen_toks": 8},
        {"until": ["ab", "+"], "max_gen_toks": 6, "do_sample": False},
        {"until": [], "max_gen_toks": 5, "temperature": 0.0},
    ]
    return [(prompt, settings[index % len(settings)]) for index, prompt in enumerate(prompts)]


@pytest.mark.parametrize("loop", ["compact", "generate"])
def test_generate_until_equals_hflm(model, lm, loop):
    cases = generation_cases()
    generator = GreedyGenerator(model, char_tokenizer(), token_budget=40, loop=loop)

    expected = lm.generate_until([FakeInstance(prompt, dict(kwargs)) for prompt, kwargs in cases], disable_tqdm=True)
    requests = [_generation_request(lm, FakeInstance(prompt, dict(kwargs))) for prompt, kwargs in cases]
    found = generator.generate(requests)

    assert found == expected
    # The cases exercise both ends: some stop early, some run to max_gen_toks.
    assert {len(text) for text in found} & {0, 1, 2, 3} and 8 in {len(text) for text in found}


@pytest.mark.parametrize("loop", ["compact", "generate"])
def test_generation_config_eos_ends_rows_as_in_hflm(model, lm, loop):
    prompts = [prompt for prompt, _ in generation_cases()]
    settings = {"until": ["zz"], "max_gen_toks": 9}
    backend = GreedyGenerator(model, char_tokenizer(), token_budget=64, loop=loop)
    requests = [_generation_request(lm, FakeInstance(prompt, dict(settings))) for prompt in prompts]
    without_extra_eos = backend.generate(requests)
    previous = model.generation_config.eos_token_id
    # "v" ends generation too, as a model's second end-of-turn token would; HF generate stops there.
    model.generation_config.eos_token_id = [previous, char_tokenizer().convert_tokens_to_ids("v")]
    try:
        expected = lm.generate_until([FakeInstance(prompt, dict(settings)) for prompt in prompts], disable_tqdm=True)
        found = backend.generate(requests)
    finally:
        model.generation_config.eos_token_id = previous
    assert found == expected
    assert found != without_extra_eos


def test_sampling_request_is_refused(lm):
    from evomerge.errors import UserError

    with pytest.raises(UserError, match=r"task 'fixture': generation_kwargs.do_sample is true"):
        _generation_request(lm, FakeInstance("5+2=", {"until": ["\n"], "do_sample": True, "temperature": 0.7}))


def test_row_stops_once_its_own_text_holds_a_stop_string():
    tokenizer = char_tokenizer()
    stops = RowStopStrings(StopTest(tokenizer, ["ab"]), prompt_width=1, rows=3)
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(list(text)) for text in ("xqab", "xaaa", "xbab")])

    assert stops(ids, scores=None).tolist() == [True, False, True]
    assert stops(ids[:, :3], scores=None).tolist() == [True, False, True]  # a finished row stays finished
    assert StopTest(tokenizer, []).finished([[5, 6]]) == [False]


def test_a_repetition_penalty_leaves_the_compact_loop_for_generate(model, lm):
    prompts = [prompt for prompt, _ in generation_cases()]
    settings = {"until": ["zz"], "max_gen_toks": 8, "repetition_penalty": 1.5}
    requests = [_generation_request(lm, FakeInstance(prompt, dict(settings))) for prompt in prompts]
    generator = GreedyGenerator(model, char_tokenizer(), token_budget=64, loop="compact")

    assert not generator._plain_greedy(dict(requests[0].generate_kwargs))
    expected = lm.generate_until([FakeInstance(prompt, dict(settings)) for prompt in prompts], disable_tqdm=True)
    assert generator.generate(requests) == expected


def test_generation_request_carries_lm_eval_settings(lm):
    request = _generation_request(lm, FakeInstance("5+2=", {"until": "x", "max_new_tokens": 7, "temperature": 0.0}))

    assert request == GenerationRequest(
        context=tuple(lm.tok_encode("5+2=")),
        until=("x", lm.tokenizer.eos_token),
        max_gen_toks=7,
        generate_kwargs=(("do_sample", False),),
    )
