"""Shared setup for the scoring-backend tests: a tiny random Llama, a one-token-per-character
tokenizer whose decode joins characters back into the text, a chat template, and eval sets over the
fixture tasks in tests/fixtures/evals/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import SPECIAL_TOKENS, build_base, tiny_llama_config
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from evomerge.evaluation.config import EvalSet, EvaluationSpec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "evals"
CHARACTERS = "0123456789+= abcdefghijklmnopqrstuvwxyz"
# Role initial, content, a space; the generation prompt is "a ".
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}a {% endif %}"
)


def char_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """One token per character (a BPE without merges never joins two), decoded without separators."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def char_model(seed: int = 0):
    """A tiny random Llama over `char_tokenizer`'s vocabulary, in float32, in eval mode."""
    return build_base(tiny_llama_config(vocab_size=len(SPECIAL_TOKENS) + len(CHARACTERS)), seed=seed)


def eval_set(tasks: list[dict | str], **evaluation) -> EvalSet:
    """The search set of an `evaluation:` section over the fixture tasks."""
    section = {"tasks": tasks, "include": [str(FIXTURES)], "batch_size": 8} | evaluation
    return EvaluationSpec.model_validate(section).eval_sets()["search"]


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """One torch thread for a scoring module: on 2 cores tiny matmuls run far slower on 2 OpenMP threads.

    Autouse in each module that imports it by name.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
