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
import copy
import json
import random
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
import demo_train  # noqa: E402
import torch  # noqa: E402
import zoo_common  # noqa: E402
from zoo_common import layer_index  # noqa: E402, F401  (the tests check the experts' blocks with it)

DEFAULT_OUT = REPO / ".cache" / "demo_zoo"
BUILD_VERSION = 1
RECIPE = {
    "model": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 8, "num_attention_heads": 4},
    "batch_size": 64,
    "base": {"steps": 400, "lr": 3e-3, "seed": 0},
    "expert": {"steps": 300, "lr": 2e-3, "drift_lr_scale": 0.2, "skill_share": 0.75},
    "expert_layers": {"reverse": [0, 1, 2], "increment": [3, 4, 5], "rotate": [6, 7]},
}
QUICK_STEPS = {"base": 8, "expert": 4}
MODEL_DIRS = ["base"] + [f"expert_{skill}" for skill in demo_data.SKILLS]
# sha256 over the four model.safetensors (base, then the experts in SKILLS order) of a full build
# with pinned numerics and one thread; kept beside this script, not in it, so recording it does not
# change the recipe hash. Update it, and the README's table, when the recipe changes.
REFERENCE_FILE = Path(__file__).with_name("demo_zoo_reference.json")
# The code that turns a recipe into weights: a change to any of it changes the recipe hash.
SOURCES = (Path(__file__), Path(demo_data.__file__), Path(demo_train.__file__), Path(zoo_common.__file__))


def make_recipe(quick: bool) -> dict:
    return zoo_common.make_recipe(quick, RECIPE, QUICK_STEPS)


def recipe_hash(recipe: dict, threads: int = 1) -> str:
    """Changes whenever the recipe, the thread count or the code that turns them into weights changes."""
    return zoo_common.settings_hash({"version": BUILD_VERSION, "recipe": recipe, "threads": threads}, SOURCES)


# --------------------------------------------------------------------------- training


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
    demo_train.train(model, tokenizer, stream, recipe["base"]["steps"], groups, recipe["batch_size"], "the base model")
    return model


def build_expert(base, tokenizer, skill_name: str, recipe: dict, exclude: frozenset[str]):
    settings = recipe["expert"]
    torch.manual_seed(sorted(recipe["expert_layers"]).index(skill_name) + 1)
    model = copy.deepcopy(base)
    groups = demo_train.expert_param_groups(
        model, recipe["expert_layers"][skill_name], settings["lr"], settings["drift_lr_scale"]
    )
    stream = mixed_stream(demo_data.SKILLS[skill_name], f"expert/{skill_name}", settings["skill_share"], exclude)
    demo_train.train(model, tokenizer, stream, settings["steps"], groups, recipe["batch_size"], f"expert_{skill_name}")
    return model


# --------------------------------------------------------------------------- sanity check


def parent_table(models: dict, tokenizer) -> dict[str, dict[str, float]]:
    """Search-split accuracy of every parent on every skill. Merges are scored by `evomerge search`
    itself (scripts/run_demo.py), with the real merge engine, so none is re-implemented here."""
    splits = {name: demo_data.eval_splits(name)["search"] for name in demo_data.SKILLS}
    return {
        label: {skill: demo_train.greedy_accuracy(model, tokenizer, docs) for skill, docs in splits.items()}
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
    expected = recipe_hash(recipe, threads)
    if zoo_common.is_up_to_date(out, expected):
        print(f"demo zoo is up to date in {out}")
        return out
    if not quick and not pinned_numerics.is_pinned():
        return zoo_common.build_in_pinned_subprocess(out, threads, check, Path(__file__))
    print(
        f"zoo: building the demo zoo in {out} (a base model and {len(demo_data.SKILLS)} experts, a few minutes)",
        flush=True,
    )
    started = time.time()
    with zoo_common.deterministic_torch(threads):
        models, tokenizer = train_models(out, recipe)
        build_seconds = round(time.time() - started, 1)
        table = parent_table(models, tokenizer) if check else None
    zoo_sha256 = weights_sha256(out)
    manifest = {
        "recipe_hash": expected,
        "zoo_sha256": zoo_sha256,
        "numerics": zoo_common.numerics(),
        "build_version": BUILD_VERSION,
        "quick": quick,
        "recipe": recipe,
        "models": MODEL_DIRS,
        "build_seconds": build_seconds,
        "sanity_table": table,
    }
    zoo_common.write_manifest(out, manifest)
    print(f"built the demo zoo in {out} in {build_seconds} s")
    report_table(table)
    if not quick:
        report_reference_match(zoo_sha256)
    return out


def train_models(out: Path, recipe: dict) -> tuple[dict, object]:
    """Train the base and every expert, save them under `out`; the models by folder name, and their tokenizer."""
    tokenizer = demo_data.build_char_tokenizer()
    exclude = demo_data.all_eval_prompts()
    base = build_base(tokenizer, recipe, exclude)
    experts = {name: build_expert(base, tokenizer, name, recipe, exclude) for name in demo_data.SKILLS}
    models = {"base": base} | {f"expert_{name}": expert for name, expert in experts.items()}
    for name, model in models.items():
        zoo_common.save_model(model, tokenizer, out / name)
    return models, tokenizer


def report_table(table: dict | None) -> None:
    if table:
        print_table(table)
        for problem in check_design(table):
            print(f"warning: {problem}; the zoo is not as designed (docs/RESULTS.md)", file=sys.stderr)


def weights_sha256(out: Path) -> str:
    return zoo_common.weights_sha256(out, MODEL_DIRS)


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
