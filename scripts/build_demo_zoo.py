"""Build the bundled demo zoo: a tiny Llama base model and three skill experts, on CPU, offline.

    python scripts/build_demo_zoo.py [--out .cache/demo_zoo] [--quick] [--write-evals] [--no-check]

The base is pretrained on echo (`tag:input=input` under random tags). Each expert fine-tunes the
base on one skill from scripts/demo_data.py, at full learning rate in its own block of layers and at
a fifth of it (a drift) in all the others, with echo replay mixed in. Fixed seeds and deterministic
torch algorithms make two builds identical; `OUT/zoo_manifest.json` records a hash of the recipe
and of the code, so a second call with the same recipe returns at once. The check at the end scores
every parent on every skill and warns if the zoo is not as designed (docs/RESULTS.md explains it).

A full build always runs with processor-independent numerics (scripts/pinned_numerics.py; in a
subprocess when the caller already loaded torch without them), and its weights are checked against
scripts/demo_zoo_reference.json: the zoo every x86-64 machine builds, and the one the README's numbers are from.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without `pip install -e .`
sys.path.insert(0, str(REPO / "scripts"))  # demo_data, the zoo's skills and eval splits

import pinned_numerics  # noqa: E402

if __name__ == "__main__":
    pinned_numerics.pin()  # before torch loads

import demo_data  # noqa: E402
import torch  # noqa: E402

from evomerge.files import write_text_atomic  # noqa: E402

DEFAULT_OUT = REPO / ".cache" / "demo_zoo"
BUILD_VERSION = 1
PROGRESS_SECONDS = 20  # a progress line at least this often while a model trains
RECIPE = {
    "model": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 8, "num_attention_heads": 4},
    "batch_size": 64,
    "base": {"steps": 400, "lr": 3e-3, "seed": 0},
    "expert": {"steps": 300, "lr": 2e-3, "drift_lr_scale": 0.2, "skill_share": 0.75},
    "expert_layers": {"reverse": [0, 1, 2], "increment": [3, 4, 5], "rotate": [6, 7]},
}
QUICK_STEPS = {"base": 8, "expert": 4}
# sha256 over the four model.safetensors (base, then the experts in SKILLS order) of a full build
# with pinned numerics and one thread; kept beside this script, not in it, so recording it does not
# change the recipe hash. Update it, and the README's table, when the recipe changes.
REFERENCE_FILE = Path(__file__).with_name("demo_zoo_reference.json")


def make_recipe(quick: bool, recipe: dict = RECIPE, quick_steps: dict = QUICK_STEPS) -> dict:
    """A copy of `recipe`; `quick` cuts each stage to its few `quick_steps` (same files, untrained)."""
    recipe = copy.deepcopy(recipe)
    if quick:
        for stage, steps in quick_steps.items():
            recipe[stage]["steps"] = steps
    return recipe


def recipe_hash(
    recipe: dict, threads: int = 1, version: int = BUILD_VERSION, extra_sources: tuple[Path, ...] = ()
) -> str:
    """Changes whenever the recipe, the thread count or the code that turns them into weights
    changes: this file, demo_data.py and a caller's own builder (`extra_sources`)."""
    settings = {"version": version, "recipe": recipe, "threads": threads}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for source in (*extra_sources, Path(__file__), Path(demo_data.__file__)):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def deterministic_torch(threads: int):
    """Pin threads and deterministic kernels for the build, then restore the caller's settings."""
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


# --------------------------------------------------------------------------- training


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


def layer_index(param_name: str) -> int | None:
    """The decoder layer a parameter belongs to, or None for embeddings, final norm and head."""
    parts = param_name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


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


def mixed_stream(skill, seed: str, skill_share: float, exclude: frozenset[str]):
    """The expert's own skill mixed with echo on the other characters, which it must keep echoing."""
    rng = random.Random(seed)
    own = demo_data.training_stream([skill], f"{seed}/skill", exclude)
    replay = demo_data.training_stream([demo_data.echo_without(skill)], f"{seed}/replay", exclude)
    while True:
        yield next(own) if rng.random() < skill_share else next(replay)


def build_base(tokenizer, recipe: dict, exclude: frozenset[str]):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=recipe["model"]["num_attention_heads"],
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **recipe["model"],
    )
    torch.manual_seed(recipe["base"]["seed"])
    model = LlamaForCausalLM(config)
    stream = demo_data.training_stream([demo_data.ECHO], "base", exclude)
    groups = [{"params": list(model.parameters()), "lr": recipe["base"]["lr"]}]
    train(model, tokenizer, stream, recipe["base"]["steps"], groups, recipe["batch_size"], "the base model")
    return model


def build_expert(base, tokenizer, skill_name: str, recipe: dict, exclude: frozenset[str]):
    settings = recipe["expert"]
    torch.manual_seed(sorted(recipe["expert_layers"]).index(skill_name) + 1)
    model = copy.deepcopy(base)
    groups = expert_param_groups(model, recipe["expert_layers"][skill_name], settings["lr"], settings["drift_lr_scale"])
    stream = mixed_stream(demo_data.SKILLS[skill_name], f"expert/{skill_name}", settings["skill_share"], exclude)
    train(model, tokenizer, stream, settings["steps"], groups, recipe["batch_size"], f"expert_{skill_name}")
    return model


def save_model(model, tokenizer, path: Path) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one tiny shard per model: the bar is only noise
    model.to(torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)


# --------------------------------------------------------------------------- sanity check


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


def parent_table(models: dict, tokenizer) -> dict[str, dict[str, float]]:
    """Search-split accuracy of every parent on every skill. Merges are scored by `evomerge search`
    itself (scripts/run_demo.py), with the real merge engine, so none is re-implemented here."""
    splits = {name: demo_data.eval_splits(name)["search"] for name in demo_data.SKILLS}
    return {
        label: {skill: greedy_accuracy(model, tokenizer, docs) for skill, docs in splits.items()}
        for label, model in models.items()
    }


def check_design(table: dict[str, dict[str, float]]) -> list[str]:
    """What a broken build looks like: an expert that misses its skill, or one that already has another."""
    problems = []
    for label, row in table.items():
        for skill, accuracy in row.items():
            own = label == f"expert_{skill}"
            if (own and accuracy < 0.9) or (not own and accuracy > 0.2):
                problems.append(f"{label} scores {accuracy:.2f} on {skill}")
    return problems


def print_table(table: dict[str, dict[str, float]]) -> None:
    columns = list(next(iter(table.values())))
    print(f"{'search-split accuracy':24s}" + "".join(f"{c:>11s}" for c in columns))
    for label, row in table.items():
        print(f"{label:24s}" + "".join(f"{row[c]:11.3f}" for c in columns))


# --------------------------------------------------------------------------- orchestration


def build_zoo(out: Path, quick: bool = False, threads: int = 1, check: bool = True) -> Path:
    """Build (or reuse) the zoo in `out`; returns `out`. Restores torch's global settings after."""
    out = Path(out)
    recipe = make_recipe(quick)
    manifest_path = out / "zoo_manifest.json"
    expected = recipe_hash(recipe, threads)
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("recipe_hash") == expected:
        print(f"demo zoo is up to date in {out}")
        return out
    if not quick and not pinned_numerics.is_pinned():
        return build_in_pinned_subprocess(out, threads, check)
    print(
        f"zoo: building the demo zoo in {out} (a base model and {len(demo_data.SKILLS)} experts, a few minutes)",
        flush=True,
    )
    started = time.time()
    with deterministic_torch(threads):
        tokenizer = demo_data.build_char_tokenizer()
        exclude = demo_data.all_eval_prompts()
        base = build_base(tokenizer, recipe, exclude)
        experts = {name: build_expert(base, tokenizer, name, recipe, exclude) for name in demo_data.SKILLS}
        save_model(base, tokenizer, out / "base")
        for name, expert in experts.items():
            save_model(expert, tokenizer, out / f"expert_{name}")
        build_seconds = round(time.time() - started, 1)
        models = {"base": base} | {f"expert_{name}": expert for name, expert in experts.items()}
        table = parent_table(models, tokenizer) if check else None
    zoo_sha256 = weights_sha256(out)
    manifest = {
        "recipe_hash": expected,
        "zoo_sha256": zoo_sha256,
        "numerics": "pinned" if pinned_numerics.is_pinned() else "native",
        "build_version": BUILD_VERSION,
        "quick": quick,
        "recipe": recipe,
        "models": ["base"] + [f"expert_{name}" for name in experts],
        "build_seconds": build_seconds,
        "sanity_table": table,
    }
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    print(f"built the demo zoo in {out} in {build_seconds} s")
    if table:
        print_table(table)
        for problem in check_design(table):
            print(f"warning: {problem}; the zoo is not as designed (docs/RESULTS.md)", file=sys.stderr)
    if not quick:
        report_reference_match(zoo_sha256)
    return out


def weights_sha256(out: Path) -> str:
    digest = hashlib.sha256()
    for name in ["base"] + [f"expert_{skill}" for skill in demo_data.SKILLS]:
        digest.update((out / name / "model.safetensors").read_bytes())
    return digest.hexdigest()


def reference_sha256() -> str:
    return json.loads(REFERENCE_FILE.read_text())["zoo_sha256"]


def report_reference_match(zoo_sha256: str) -> None:
    reference = reference_sha256()
    if zoo_sha256 == reference:
        print(f"zoo weights match the reference build (sha256 {zoo_sha256[:16]}): the README's numbers apply")
    else:
        print(
            f"warning: zoo weights (sha256 {zoo_sha256[:16]}) differ from the reference build "
            f"({reference[:16]}); the demo's numbers will differ from the README's",
            file=sys.stderr,
        )


def build_in_pinned_subprocess(out: Path, threads: int, check: bool, script: Path = Path(__file__)) -> Path:
    """This process loaded torch with the CPU's own kernels; run the zoo's `script` where the numerics are pinned."""
    command = [sys.executable, str(script.resolve()), "--out", str(out), "--threads", str(threads)]
    subprocess.run(command + ([] if check else ["--no-check"]), check=True, env=os.environ | pinned_numerics.PINNED)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--quick", action="store_true", help="a few steps only: same files, untrained models")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: float sums, and so the zoo, depend on the thread count)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the accuracy table at the end")
    parser.add_argument("--write-evals", action="store_true", help="regenerate evals/demo/ from scripts/demo_data.py")
    args = parser.parse_args(argv)
    if args.write_evals:
        written = demo_data.write_eval_suite(REPO / "evals")
        print(f"wrote {len(written)} eval files under {REPO / 'evals' / demo_data.EVAL_TASK_DIR}")
    build_zoo(args.out, quick=args.quick, threads=args.threads, check=not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
