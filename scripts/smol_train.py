"""Training and checking for the SmolLM2 zoo (scripts/build_smol_zoo.py): batches, a full fine-tune
loop that reports progress, a greedy-accuracy scorer and the held-out table of parents and merges."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import build_demo_zoo
import smol_data
import torch

deterministic_torch = build_demo_zoo.deterministic_torch
PROGRESS_SECONDS = 30
OWN_BLOCKS = "own blocks (per-layer)"


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def save_model(model, tokenizer, path: Path) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model.to(torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)


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
    from evomerge.merge.config import MergeConfig

    experts = [str(out / f"expert_{skill}") for skill in skills]

    def config(method: str, per_model: list[dict], base: bool = True) -> MergeConfig:
        entries = [{"model": path, "parameters": params} for path, params in zip(experts, per_model, strict=True)]
        fields = {"merge_method": method, "models": entries, "dtype": "float32"}
        return MergeConfig.model_validate(fields | ({"base_model": str(out / "base")} if base else {}))

    configs = {"linear": config("linear", [{"weight": 1 / len(experts)}] * len(experts), base=False)}
    configs["task_arithmetic"] = config("task_arithmetic", [{"weight": 1.0}] * len(experts))
    for method in ("ties", "dare_ties"):
        configs[method] = config(method, [{"weight": 1.0, "density": 0.5}] * len(experts))
    layers = range(sum(len(block) for block in recipe["expert_layers"].values()))
    blocks = [[1.0 if layer in recipe["expert_layers"][skill] else 0.0 for layer in layers] for skill in skills]
    configs[OWN_BLOCKS] = config("task_arithmetic", [{"weight": block} for block in blocks])
    return configs


def heldout_table(out: Path, recipe: dict, tokenizer, limit: int) -> dict[str, dict[str, float]]:
    """Held-out accuracy (first `limit` docs per skill) of the parents and of every merge above."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.engine import ResidentSources, merge_into_model

    skills = tuple(smol_data.SKILLS)
    splits = {skill: smol_data.eval_splits(skill)["heldout"][:limit] for skill in skills}

    def score(model) -> dict[str, float]:
        row = {skill: greedy_accuracy(model, tokenizer, docs) for skill, docs in splits.items()}
        return row | {"mean": sum(row.values()) / len(row)}

    names = ["base"] + [f"expert_{skill}" for skill in skills]
    table = {name: score(AutoModelForCausalLM.from_pretrained(out / name).eval()) for name in names}
    configs = merge_configs(out, recipe, skills)
    model = AutoModelForCausalLM.from_pretrained(out / "base").eval()
    task_vectors = ResidentSources.load(configs["task_arithmetic"])  # shared by every task-vector merge
    for label, config in configs.items():
        sources = task_vectors if config.base_model else ResidentSources.load(config)
        merge_into_model(model, sources, config, seed=0)
        table[label] = score(model)
        print(f"  checked {label}: {table[label]}", file=sys.stderr, flush=True)
    return table


def standard_error(row: dict[str, float], docs: int) -> float:
    """SE of the mean of the per-skill accuracies, each a binomial share of `docs` documents."""
    skills = [value for name, value in row.items() if name != "mean"]
    return sum(p * (1 - p) / docs for p in skills) ** 0.5 / len(skills)


def print_table(table: dict[str, dict[str, float]], docs: int) -> None:
    skills = [name for name in next(iter(table.values())) if name != "mean"]
    print(f"{'held-out accuracy':26s}" + "".join(f"{skill:>11s}" for skill in skills) + f"{'mean':>9s}{'SE':>8s}")
    for label, row in table.items():
        cells = "".join(f"{row[skill]:11.3f}" for skill in skills)
        print(f"{label:26s}{cells}{row['mean']:9.3f}{standard_error(row, docs):8.3f}")
