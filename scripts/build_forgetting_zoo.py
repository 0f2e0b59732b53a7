"""Build the forgetting zoo: a base that half knows two skills and two experts that each forgot the other's.

    python scripts/build_forgetting_zoo.py [--out .cache/forget_zoo] [--quick] [--no-check]

The second test zoo, beside the demo zoo (scripts/build_demo_zoo.py, whose training code and
numerics this reuses). It mimics a common real case: every default merge (linear, task arithmetic,
TIES, DARE-TIES, breadcrumbs, DELLA) scores *below* the base on held-out data, while a per-layer
recipe beats it. Two skills of scripts/demo_data.py, reverse and increment, so the demo's eval
files (evals/demo/) score it:

- base: pretrained on echo, then a short mix of echo and both skills, stopped while reverse is only
  partly learned (held-out: reverse about 0.6, increment about 1.0);
- each expert, in two stages: (1) its own block of four decoder layers learns its skill, with the
  other skill replayed, so the block adds the skill and breaks nothing; (2) the other four layers
  fine-tune on its own skill while the other skill's prompts are answered by echo, the pretraining
  behaviour a forgotten skill falls back to. The forgetting then sits outside the expert's block.

Summed or averaged task vectors carry both experts' forgetting into every layer, so the default
merges lose to the base; taking each expert's own block alone recovers both skills. The check at the
end scores the parents and every default merge (with evomerge's merge engine) on the held-out splits
and warns when the zoo is not as designed. Deterministic and cached like the demo zoo.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without `pip install -e .`
sys.path.insert(0, str(REPO / "scripts"))

import pinned_numerics  # noqa: E402

if __name__ == "__main__":
    pinned_numerics.pin()  # before torch loads (build_demo_zoo imports it)

import build_demo_zoo as demo_zoo  # noqa: E402
import demo_data  # noqa: E402
import demo_train  # noqa: E402
import torch  # noqa: E402
import zoo_common  # noqa: E402
from zoo_common import OWN_BLOCKS  # noqa: E402

DEFAULT_OUT = REPO / ".cache" / "forget_zoo"
BUILD_VERSION = 1
SKILLS = ("reverse", "increment")
RECIPE = {
    "model": demo_zoo.RECIPE["model"],
    "batch_size": 64,
    "echo": {"steps": 300, "lr": 3e-3, "seed": 0},
    # Reverse is the hard skill: 160 steps leave it about 0.6 held-out, increment is learned.
    "base": {"steps": 160, "lr": 2e-3, "seed": 10, "shares": {"echo": 0.2, "reverse": 0.6, "increment": 0.2}},
    "expert": {"steps": 150, "lr": 2e-3, "shares": {"own": 0.6, "other": 0.2, "echo": 0.2}},
    # Small on purpose: stronger forgetting leaves every merge near 0, a plateau a search cannot climb.
    "forget": {"steps": 60, "lr": 5e-4, "shares": {"own": 0.5, "forgotten": 0.5}},
    "expert_layers": {"reverse": [0, 1, 2, 3], "increment": [4, 5, 6, 7]},
}
QUICK_STEPS = {"echo": 4, "base": 4, "expert": 4, "forget": 4}
MODEL_DIRS = ["base"] + [f"expert_{skill}" for skill in SKILLS]


def make_recipe(quick: bool) -> dict:
    return zoo_common.make_recipe(quick, RECIPE, QUICK_STEPS)


def recipe_hash(recipe: dict, threads: int = 1) -> str:
    """Changes whenever the recipe, the thread count, this builder or the demo zoo's code changes."""
    settings = {"version": BUILD_VERSION, "recipe": recipe, "threads": threads}
    return zoo_common.settings_hash(settings, (Path(__file__), *demo_zoo.SOURCES))


# --------------------------------------------------------------------------- training


def forgotten(skill: demo_data.Skill) -> demo_data.Skill:
    """The skill's prompts answered by echo: what a model that forgot the skill falls back to."""
    return demo_data.Skill(f"{skill.name}_forgotten", skill.tag, skill.alphabet, "echo", demo_data.ECHO.answer)


def weighted_stream(skills: dict[str, demo_data.Skill], shares: dict[str, float], seed: str, exclude: frozenset[str]):
    """An endless seeded stream drawing from each skill with its share (shares sum to 1)."""
    rng = random.Random(seed)
    names = list(shares)
    streams = {name: demo_data.training_stream([skills[name]], f"{seed}/{name}", exclude) for name in names}
    weights = [shares[name] for name in names]
    while True:
        yield next(streams[rng.choices(names, weights)[0]])


def layer_groups(model, layers: list[int], lr: float) -> list[dict]:
    """Train only the decoder layers in `layers`; the others, embeddings and head stay frozen."""
    own, frozen = demo_train.expert_param_groups(model, layers, lr, drift_lr_scale=0.0)
    for param in frozen["params"]:
        param.requires_grad_(False)
    return [own]


def build_base(tokenizer, recipe: dict, exclude: frozenset[str]):
    echo_recipe = {"model": recipe["model"], "batch_size": recipe["batch_size"], "base": recipe["echo"]}
    model = demo_zoo.build_base(tokenizer, echo_recipe, exclude)
    settings = recipe["base"]
    torch.manual_seed(settings["seed"])
    skills = {"echo": demo_data.ECHO} | {name: demo_data.SKILLS[name] for name in SKILLS}
    stream = weighted_stream(skills, settings["shares"], "forget/base", exclude)
    groups = [{"params": list(model.parameters()), "lr": settings["lr"]}]
    demo_train.train(
        model, tokenizer, stream, settings["steps"], groups, recipe["batch_size"], "the base model (its skills)"
    )
    return model


def build_expert(base, tokenizer, skill_name: str, recipe: dict, exclude: frozenset[str]):
    """Stage 1 adds the skill in the expert's own block; stage 2 forgets the other skill elsewhere."""
    own, other = (demo_data.SKILLS[name] for name in sorted(SKILLS, key=lambda name: name != skill_name))
    own_layers = recipe["expert_layers"][skill_name]
    other_layers = [layer for layer in range(recipe["model"]["num_hidden_layers"]) if layer not in own_layers]
    stages = [
        ("expert", own_layers, {"own": own, "other": other, "echo": demo_data.echo_without(own)}),
        ("forget", other_layers, {"own": own, "forgotten": forgotten(other)}),
    ]
    torch.manual_seed(SKILLS.index(skill_name) + 1)
    model = copy.deepcopy(base)
    for stage, layers, skills in stages:
        settings = recipe[stage]
        stream = weighted_stream(skills, settings["shares"], f"forget/{stage}/{skill_name}", exclude)
        groups = layer_groups(model, layers, settings["lr"])
        label = f"expert_{skill_name} ({stage} stage)"
        demo_train.train(model, tokenizer, stream, settings["steps"], groups, recipe["batch_size"], label)
    return model


# --------------------------------------------------------------------------- the design check


def merge_configs(out: Path, recipe: dict) -> dict:
    """Every default merge, as the search's baselines define it (weights 1, density 0.5, ...), plus
    the per-layer recipe the zoo is built for: each expert's task vector in its own block only."""
    from evomerge.genome import DEFAULT_VALUES
    from evomerge.merge.methods import METHODS

    configs = {"linear": zoo_common.equal_linear_config(out, SKILLS)}
    for name, method in METHODS.items():
        if method.family == "task_vector":
            params = {p: DEFAULT_VALUES[p] for p in method.input_params if p != "weight"}
            configs[name] = zoo_common.merge_config(out, SKILLS, name, [params | {"weight": 1.0}] * len(SKILLS))
    layers = recipe["model"]["num_hidden_layers"]
    configs[OWN_BLOCKS] = zoo_common.own_blocks_config(out, SKILLS, recipe["expert_layers"], layers)
    return configs


def heldout_table(out: Path, recipe: dict, tokenizer, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Held-out accuracy of the parents and of every merge in `merge_configs`, per skill and mean
    (on the first `limit` documents of each skill, all of them by default)."""
    splits = {skill: demo_data.eval_splits(skill)["heldout"][:limit] for skill in SKILLS}

    def score(model) -> dict[str, float]:
        row = {skill: demo_train.greedy_accuracy(model, tokenizer, docs) for skill, docs in splits.items()}
        return row | {"mean": sum(row.values()) / len(row)}

    return zoo_common.heldout_table(out, MODEL_DIRS, merge_configs(out, recipe), score)


def print_table(table: dict[str, dict[str, float]]) -> None:
    zoo_common.print_heldout_table(table, demo_data.HELDOUT_DOCS)


def check_design(table: dict[str, dict[str, float]]) -> list[str]:
    """What a broken build looks like: a default merge that ties or beats the base, an expert that
    misses its skill or kept the other, or a per-layer recipe that does not beat the base."""
    base = table["base"]["mean"]
    problems = [
        f"{label} scores {row['mean']:.3f} held-out, not below the base's {base:.3f}"
        for label, row in table.items()
        if label not in MODEL_DIRS and label != OWN_BLOCKS and row["mean"] >= base
    ]
    for skill in SKILLS:
        row = table[f"expert_{skill}"]
        if row[skill] < 0.9 or any(row[other] >= table["base"][other] for other in SKILLS if other != skill):
            problems.append(f"expert_{skill} scores {row}: it should master {skill} and forget the rest")
    if table[OWN_BLOCKS]["mean"] <= base:
        problems.append(f"the own-blocks recipe scores {table[OWN_BLOCKS]['mean']:.3f}, not above the base")
    return problems


# --------------------------------------------------------------------------- orchestration


def build_zoo(out: Path = DEFAULT_OUT, quick: bool = False, threads: int = 1, check: bool = True) -> Path:
    """Build (or reuse) the zoo in `out`; returns `out`. Restores torch's global settings after."""
    out = Path(out)
    recipe = make_recipe(quick)
    expected = recipe_hash(recipe, threads)
    if zoo_common.is_up_to_date(out, expected):
        print(f"forgetting zoo is up to date in {out}")
        return out
    if not quick and not pinned_numerics.is_pinned():
        return zoo_common.build_in_pinned_subprocess(out, threads, check, Path(__file__))
    started = time.time()
    with zoo_common.deterministic_torch(threads):
        tokenizer = demo_data.build_char_tokenizer()
        exclude = demo_data.all_eval_prompts()
        base = build_base(tokenizer, recipe, exclude)
        experts = {skill: build_expert(base, tokenizer, skill, recipe, exclude) for skill in SKILLS}
        for name, model in ({"base": base} | {f"expert_{skill}": e for skill, e in experts.items()}).items():
            zoo_common.save_model(model, tokenizer, out / name)
        build_seconds = round(time.time() - started, 1)
        table = heldout_table(out, recipe, tokenizer) if check else None
    manifest = {
        "recipe_hash": expected,
        "zoo_sha256": weights_sha256(out),
        "numerics": zoo_common.numerics(),
        "build_version": BUILD_VERSION,
        "quick": quick,
        "recipe": recipe,
        "models": MODEL_DIRS,
        "build_seconds": build_seconds,
        "heldout_table": table,
    }
    zoo_common.write_manifest(out, manifest)
    print(f"built the forgetting zoo in {out} in {build_seconds} s")
    if table:
        print_table(table)
        for problem in check_design(table):
            print(f"warning: {problem}; the zoo is not as designed", file=sys.stderr)
    return out


def weights_sha256(out: Path) -> str:
    return zoo_common.weights_sha256(out, MODEL_DIRS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--quick", action="store_true", help="a few steps only: same files, untrained models")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the zoo depends on it)")
    parser.add_argument("--no-check", action="store_true", help="skip the held-out table of parents and merges")
    args = parser.parse_args(argv)
    build_zoo(args.out, quick=args.quick, threads=args.threads, check=not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
