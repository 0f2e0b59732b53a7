"""Training and scoring on the demo's character tasks (scripts/demo_data.py), for the demo and forgetting zoos.

Batches with labels on the answer only, a one-cycle AdamW loop that reports progress, the parameter
groups of an expert (its own block at full learning rate, a drift elsewhere) and the greedy accuracy
that matches lm-eval's loglikelihood acc. torch must be imported after the builder pinned its numerics.
"""

from __future__ import annotations

import time

import torch
from zoo_common import layer_index

PROGRESS_SECONDS = 20  # a progress line at least this often while a model trains


def encode_batch(tokenizer, docs: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels only on the answer and the '.' that ends it."""
    rows = []
    for doc in docs:
        prompt = tokenizer(doc["prompt"])["input_ids"]
        answer = tokenizer(doc["target"] + ".", add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(targets)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train(model, tokenizer, stream, steps: int, param_groups: list[dict], batch_size: int, label: str = "") -> None:
    """AdamW with a one-cycle schedule; each group keeps its own peak learning rate. With a `label`
    it says how far it is, at the start and every PROGRESS_SECONDS (the weights do not depend on it)."""
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in param_groups], total_steps=steps, pct_start=0.1
    )
    model.train()
    started = said = time.monotonic()
    if label:
        print(f"zoo: training {label}: {steps} steps", flush=True)
    for step in range(steps):
        if label and time.monotonic() - said >= PROGRESS_SECONDS:
            said = time.monotonic()
            print(f"zoo: training {label}: step {step}/{steps} ({said - started:.0f} s)", flush=True)
        batch = encode_batch(tokenizer, [next(stream) for _ in range(batch_size)])
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def expert_param_groups(model, own_layers: list[int], lr: float, drift_lr_scale: float) -> list[dict]:
    """Full learning rate in the expert's own block, a small drift in every other decoder layer.

    Embeddings, the final norm and the LM head stay frozen, so all models share them exactly.
    """
    own, drift = [], []
    for name, param in model.named_parameters():
        layer = layer_index(name)
        param.requires_grad_(layer is not None)
        if layer is not None:
            (own if layer in own_layers else drift).append(param)
    return [{"params": own, "lr": lr}, {"params": drift, "lr": lr * drift_lr_scale}]


@torch.no_grad()
def greedy_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """Share of docs whose whole target is the greedy continuation: lm-eval's loglikelihood acc."""
    prompts = [tokenizer(d["prompt"])["input_ids"] for d in docs]
    targets = [tokenizer(d["target"], add_special_tokens=False)["input_ids"] for d in docs]
    width = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=False))
    input_ids = torch.full((len(docs), width), tokenizer.pad_token_id)
    for row, (prompt, target) in enumerate(zip(prompts, targets, strict=False)):
        input_ids[row, : len(prompt) + len(target)] = torch.tensor(prompt + target)
    predicted = model(input_ids=input_ids).logits.argmax(-1)
    hits = [
        predicted[row, len(p) - 1 : len(p) - 1 + len(t)].tolist() == t
        for row, (p, t) in enumerate(zip(prompts, targets, strict=False))
    ]
    return sum(hits) / len(hits)
