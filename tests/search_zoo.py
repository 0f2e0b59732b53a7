"""A tiny *trained* zoo for the search tests: scores that differ between merges.

A char-level Llama base is trained briefly on one-digit additions, then two experts are
fine-tuned on disjoint halves (first operand even / odd). Merges of them score differently on the
`tiny_add` fixture task, so the search tests check real numbers, not zeros. ~10 s on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

FIXTURE_EVALS = Path(__file__).parent / "fixtures" / "evals"
CHARS = list("0123456789+=")


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _examples() -> list[tuple[str, str]]:
    rows = [
        json.loads(line) for line in (FIXTURE_EVALS / "data" / "tiny.jsonl").read_text().splitlines() if line.strip()
    ]
    return [(row["prompt"], row["target"]) for row in rows]


def _train(model, tokenizer, examples, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    texts = [tokenizer(p + t)["input_ids"] for p, t in examples]
    width = max(len(t) for t in texts)
    batch = torch.tensor([t + [tokenizer.pad_token_id] * (width - len(t)) for t in texts])
    labels = batch.masked_fill(batch == tokenizer.pad_token_id, -100)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def build_trained_zoo(root: Path) -> dict[str, str]:
    torch.set_num_threads(1)
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(CHARS) + 4,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    examples = _examples()
    _train(base, tokenizer, examples, steps=15, seed=0)
    paths = {}
    for name, model in (("base", base),):
        paths[name] = _save(model, tokenizer, root / name)
    for name, keep in (("even", 0), ("odd", 1)):
        expert = LlamaForCausalLM(config)
        expert.load_state_dict(base.state_dict())
        subset = [e for e in examples if int(e[0][0]) % 2 == keep]
        _train(expert, tokenizer, subset, steps=60, seed=1 + keep)
        paths[name] = _save(expert, tokenizer, root / name)
    return paths


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
