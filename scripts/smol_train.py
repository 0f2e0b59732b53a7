"""Training and checking for the SmolLM2 zoo (scripts/build_smol_zoo.py): batches, a full fine-tune
loop that reports progress, a greedy-accuracy scorer and the held-out table of parents and merges
(the table and the merges it scores are the zoos' shared ones, scripts/zoo_common.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import smol_data
import torch
import zoo_common
from zoo_common import OWN_BLOCKS

PROGRESS_SECONDS = 30


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def tokenize(tokenizer, doc: dict) -> tuple[list[int], int]:
    """Prompt + target as lm-eval encodes the pair (the whole, split at the prompt's length)."""
    whole = tokenizer(doc["prompt"] + doc["target"], add_special_tokens=False)["input_ids"]
    return whole, len(tokenizer(doc["prompt"], add_special_tokens=False)["input_ids"])


def encode(tokenizer, docs: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels on the target tokens only."""
    rows = [tokenize(tokenizer, doc) for doc in docs]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train_only(model, layers: list[int]) -> list[torch.nn.Parameter]:
    """Freeze everything but the decoder layers in `layers`; their parameters."""
    trained = []
    for name, param in model.named_parameters():
        parts = name.split(".")
        keep = "layers" in parts and int(parts[parts.index("layers") + 1]) in layers
        param.requires_grad_(keep)
        if keep:
            trained.append(param)
    return trained


def train(model, tokenizer, docs: Iterator[dict], params: list, settings: dict, batch_size: int, label: str) -> None:
    """AdamW with a one-cycle schedule and clipped gradients; a progress line at least every 30 s."""
    steps = settings["steps"]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings["lr"], total_steps=steps, pct_start=0.1)
    model.train()
    started = last = time.time()
    for step in range(1, steps + 1):
        loss = model(**encode(tokenizer, [next(docs) for _ in range(batch_size)])).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if time.time() - last >= PROGRESS_SECONDS or step in (1, steps):
            last = time.time()
            print(f"  {label}: step {step}/{steps}, loss {loss.item():.4f}, {last - started:.0f} s", flush=True)
    model.eval()


@torch.no_grad()
def greedy_accuracy(model, tokenizer, docs: list[dict], batch: int = 32) -> float:
    """Share of docs whose whole target is the greedy continuation: lm-eval's loglikelihood acc."""
    hits = 0
    for start in range(0, len(docs), batch):
        chunk = docs[start : start + batch]
        encoded = encode(tokenizer, chunk)
        predicted = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits.argmax(-1)
        labels = encoded["labels"]
        for row in range(len(chunk)):
            positions = (labels[row] != -100).nonzero().flatten()
            hits += bool(torch.equal(predicted[row, positions - 1], labels[row, positions]))
    return hits / len(docs)


def merge_configs(out: Path, recipe: dict, skills: tuple[str, ...]) -> dict:
    """The search's default merges (linear at equal weights; task arithmetic, TIES and DARE-TIES at
    weight 1, density 0.5) and the per-layer recipe the zoo is built for: each expert's own block."""
    configs = {"linear": zoo_common.equal_linear_config(out, skills)}
    configs["task_arithmetic"] = zoo_common.merge_config(
        out, skills, "task_arithmetic", [{"weight": 1.0}] * len(skills)
    )
    for method in ("ties", "dare_ties"):
        configs[method] = zoo_common.merge_config(out, skills, method, [{"weight": 1.0, "density": 0.5}] * len(skills))
    layers = sum(len(block) for block in recipe["expert_layers"].values())
    configs[OWN_BLOCKS] = zoo_common.own_blocks_config(out, skills, recipe["expert_layers"], layers)
    return configs


def heldout_table(out: Path, recipe: dict, tokenizer, limit: int) -> dict[str, dict[str, float]]:
    """Held-out accuracy (first `limit` docs per skill) of the parents and of every merge above."""
    skills = tuple(smol_data.SKILLS)
    splits = {skill: smol_data.eval_splits(skill)["heldout"][:limit] for skill in skills}

    def score(model) -> dict[str, float]:
        row = {skill: greedy_accuracy(model, tokenizer, docs) for skill, docs in splits.items()}
        return row | {"mean": sum(row.values()) / len(row)}

    names = ["base"] + [f"expert_{skill}" for skill in skills]
    return zoo_common.heldout_table(out, names, merge_configs(out, recipe, skills), score, verbose=True)


def print_table(table: dict[str, dict[str, float]], docs: int) -> None:
    zoo_common.print_heldout_table(table, docs, label_width=26)
