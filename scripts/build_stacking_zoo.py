"""Build the stacking zoo: two experts grown on the same new block of a depth-expanded base.

    python scripts/build_stacking_zoo.py [--out .cache/stacking_zoo] [--quick] [--no-check]

The third test zoo, for the layer (data-flow) search: one where a path through the models' layers
can carry two skills that a parameter merge makes interfere. It is block expansion (as LLaMA Pro
adds blocks to a pretrained model), with the demo's tiny Llama, skills and eval files (evals/demo/):

- base: a 4-layer Llama pretrained on echo, then expanded to 8 layers: layers 4-7 are copies of
  layers 0-3 with their o_proj and down_proj zeroed, so they add nothing and the 8-layer base
  computes exactly what the 4-layer one did;
- two experts, increment and rotate, each trains only that same new block (layers 4-7) on its
  skill, with echo replay on the characters its skill does not use; everything else stays frozen.

Both experts' whole change sits in the same four layers, and each block is a new function grown
from zero output, so a per-layer parameter merge must add or average two unrelated blocks in the
same place. A path base 0-3, then expert A's 4-7, then expert B's 4-7 (12 layers) runs both blocks
one after the other, each on a residual stream like the one it was trained on. The check at the end
scores the parents, every default merge and that path on the held-out splits, and warns when the
zoo is not as designed. Deterministic and cached like the demo zoo, whose training code it reuses.

As built, the zoo fails half of its design: every default merge scores about 0, but the stacked path
scores 0.14 held-out (below either expert's 0.5), because each block, trained to answer other
prompts with echo, undoes the answer the block before it wrote (docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import random
import string
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
import build_forgetting_zoo as forget_zoo  # noqa: E402
import demo_data  # noqa: E402
import demo_train  # noqa: E402
import torch  # noqa: E402
import zoo_common  # noqa: E402

DEFAULT_OUT = REPO / ".cache" / "stacking_zoo"
BUILD_VERSION = 1
SKILLS = ("increment", "decrement")
STACKED = "stacked path (base 0-3, increment 4-7, decrement 4-7)"
# Increment is the demo's skill (its eval files are evals/demo/); decrement reads the same digits
# under its own tag, so the two blocks must tell the skills apart by the tag alone.
DECREMENT = demo_data.Skill(
    "decrement",
    "dec",
    string.digits,
    "subtract 1 from every digit, mod 10: dec:130=029",
    lambda text: "".join(str((int(c) - 1) % 10) for c in text),
)
ZOO_SKILLS = {"increment": demo_data.SKILLS["increment"], "decrement": DECREMENT}
EVAL_TASK_DIR = "stacking"
REGENERATE = "python scripts/build_stacking_zoo.py --write-evals"  # the command that writes evals/stacking/
RECIPE = {
    "model": demo_zoo.RECIPE["model"] | {"num_hidden_layers": 4},  # pretrained depth
    "expanded_layers": 8,
    "batch_size": 64,
    "base": {"steps": 400, "lr": 3e-3, "seed": 0},
    "expert": {"steps": 300, "lr": 2e-3, "skill_share": 0.75},
    "expert_layers": [4, 5, 6, 7],  # the expanded block, the same for both experts
}
QUICK_STEPS = {"base": 8, "expert": 4}
MODEL_DIRS = ["base"] + [f"expert_{skill}" for skill in SKILLS]
# Written by the block expansion: zero here, these two write into the residual stream.
OUTPUT_PROJECTIONS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def make_recipe(quick: bool) -> dict:
    return zoo_common.make_recipe(quick, RECIPE, QUICK_STEPS)


def recipe_hash(recipe: dict, threads: int = 1) -> str:
    """Changes whenever the recipe, the thread count, this builder or the code it reuses changes."""
    settings = {"version": BUILD_VERSION, "recipe": recipe, "threads": threads}
    return zoo_common.settings_hash(settings, (Path(__file__), Path(forget_zoo.__file__), *demo_zoo.SOURCES))


# --------------------------------------------------------------------------- models


def deeper_model(model, layer_sources: list[tuple[object, int]]):
    """A Llama whose decoder layers are `layer_sources` (model, layer) in order, with `model`'s
    embeddings, final norm and head; the same tensors copied, nothing trained."""
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layer_sources)
    deeper = LlamaForCausalLM(config)
    state = {name: tensor for name, tensor in model.state_dict().items() if zoo_common.layer_index(name) is None}
    for position, (source, layer) in enumerate(layer_sources):
        prefix = f"model.layers.{layer}."
        for name, tensor in source.state_dict().items():
            if name.startswith(prefix):
                state[f"model.layers.{position}.{name[len(prefix) :]}"] = tensor.clone()
    deeper.load_state_dict(state)
    return deeper.eval()


def expand(model, depth: int):
    """Block expansion to `depth` layers: layer i >= the old depth copies layer i - old depth, with its
    output projections zeroed so it adds nothing to the residual stream (the function is unchanged)."""
    old = model.config.num_hidden_layers
    expanded = deeper_model(model, [(model, layer % old) for layer in range(depth)])
    for layer in expanded.model.layers[old:]:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    return expanded


def build_base(tokenizer, recipe: dict, exclude: frozenset[str]):
    shallow = demo_zoo.build_base(tokenizer, recipe, exclude)
    return expand(shallow, recipe["expanded_layers"])


def build_expert(base, tokenizer, skill_name: str, recipe: dict, exclude: frozenset[str]):
    """The expanded block alone learns the skill; echo replay keeps every other prompt as the base had it."""
    settings = recipe["expert"]
    torch.manual_seed(SKILLS.index(skill_name) + 1)
    model = copy.deepcopy(base)
    groups = forget_zoo.layer_groups(model, recipe["expert_layers"], settings["lr"])
    stream = expert_stream(skill_name, settings["skill_share"], exclude)
    demo_train.train(model, tokenizer, stream, settings["steps"], groups, recipe["batch_size"], f"expert_{skill_name}")
    return model


def expert_stream(skill_name: str, skill_share: float, exclude: frozenset[str]):
    """The skill mixed with echo over every character (the skill's own digits included) under any
    tag but a skill's: the block learns to act on its tag and to leave every other prompt as it is,
    which is what lets a path run one expert's block after the other's."""
    seed = f"stacking/{skill_name}"
    rng = random.Random(seed)
    own = demo_data.training_stream([ZOO_SKILLS[skill_name]], f"{seed}/skill", exclude)
    tags = {skill.tag for skill in ZOO_SKILLS.values()}
    replay = demo_data.training_stream([demo_data.ECHO], f"{seed}/replay", exclude)
    replay = (doc for doc in replay if doc["prompt"][:3] not in tags)
    while True:
        yield next(own) if rng.random() < skill_share else next(replay)


def stacked_path(models: dict, recipe: dict):
    """The path the zoo is built for: the base's pretrained layers, then each expert's block in turn."""
    block = recipe["expert_layers"]
    steps = [(models["base"], layer) for layer in range(block[0])]
    steps += [(models[f"expert_{skill}"], layer) for skill in SKILLS for layer in block]
    return deeper_model(models["base"], steps)


# --------------------------------------------------------------------------- eval splits


def eval_splits(skill_name: str) -> dict[str, list[dict]]:
    """Increment's are the demo's (evals/demo/); decrement's are drawn the same way under their own seeds."""
    if skill_name in demo_data.SKILLS:
        return demo_data.eval_splits(skill_name)
    skill = ZOO_SKILLS[skill_name]
    search = demo_data.sample_distinct(skill, demo_data.SEARCH_DOCS, random.Random(f"stacking/{skill_name}/search"))
    seen = frozenset(doc["prompt"] for doc in search)
    heldout = demo_data.sample_distinct(
        skill, demo_data.HELDOUT_DOCS, random.Random(f"stacking/{skill_name}/heldout"), seen
    )
    return {"search": search, "heldout": heldout}


def all_eval_prompts() -> frozenset[str]:
    """Every eval prompt of the demo's skills and of decrement; training never sees one."""
    own = frozenset(doc["prompt"] for docs in eval_splits("decrement").values() for doc in docs)
    return demo_data.all_eval_prompts() | own


def task_name(skill_name: str, split: str) -> str:
    return f"stacking_{skill_name}_{split}"


def write_eval_suite(evals_dir: Path) -> list[Path]:
    """Decrement's search and held-out splits under evals_dir/stacking (increment's are evals/demo/)."""
    skills = {"decrement": DECREMENT}
    return zoo_common.write_skill_splits(Path(evals_dir) / EVAL_TASK_DIR, skills, eval_splits, task_name, REGENERATE)


# --------------------------------------------------------------------------- the design check


def merge_configs(out: Path) -> dict:
    """Every default merge, as the search's baselines define it (weights 1, density 0.5, ...)."""
    from evomerge.genome import DEFAULT_VALUES
    from evomerge.merge.methods import METHODS

    configs = {"linear": zoo_common.equal_linear_config(out, SKILLS)}
    for name, method in METHODS.items():
        if method.family == "task_vector":
            params = {p: DEFAULT_VALUES[p] for p in method.input_params if p != "weight"}
            configs[name] = zoo_common.merge_config(out, SKILLS, name, [params | {"weight": 1.0}] * len(SKILLS))
    return configs


def heldout_table(out: Path, recipe: dict, tokenizer, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Held-out accuracy of the parents, every default merge and the stacked path, per skill and mean
    (on the first `limit` documents of each skill, all of them by default)."""
    from transformers import AutoModelForCausalLM

    splits = {skill: eval_splits(skill)["heldout"][:limit] for skill in SKILLS}

    def score(model) -> dict[str, float]:
        row = {skill: demo_train.greedy_accuracy(model, tokenizer, docs) for skill, docs in splits.items()}
        return row | {"mean": sum(row.values()) / len(row)}

    table = zoo_common.heldout_table(out, MODEL_DIRS, merge_configs(out), score)
    models = {name: AutoModelForCausalLM.from_pretrained(Path(out) / name).eval() for name in MODEL_DIRS}
    return table | {STACKED: score(stacked_path(models, recipe))}


def print_table(table: dict[str, dict[str, float]]) -> None:
    zoo_common.print_heldout_table(table, demo_data.HELDOUT_DOCS, label_width=52)


def check_design(table: dict[str, dict[str, float]]) -> list[str]:
    """What a broken build looks like: an expert that misses its skill or has the other one, or a
    stacked path that does not beat every parent and default merge."""
    problems = []
    for skill in SKILLS:
        row = table[f"expert_{skill}"]
        if row[skill] < 0.9 or any(row[other] > 0.2 for other in SKILLS if other != skill):
            problems.append(f"expert_{skill} scores {row}: it should master {skill} alone")
    stacked = table[STACKED]["mean"]
    best = max(table.items(), key=lambda item: item[1]["mean"] if item[0] != STACKED else -1.0)
    if stacked <= best[1]["mean"]:
        problems.append(f"the stacked path scores {stacked:.3f}, not above {best[0]} ({best[1]['mean']:.3f})")
    return problems


# --------------------------------------------------------------------------- orchestration


def build_zoo(out: Path = DEFAULT_OUT, quick: bool = False, threads: int = 1, check: bool = True) -> Path:
    """Build (or reuse) the zoo in `out`; returns `out`. Restores torch's global settings after."""
    out = Path(out)
    recipe = make_recipe(quick)
    expected = recipe_hash(recipe, threads)
    if zoo_common.is_up_to_date(out, expected):
        print(f"stacking zoo is up to date in {out}")
        return out
    if not quick and not pinned_numerics.is_pinned():
        return zoo_common.build_in_pinned_subprocess(out, threads, check, Path(__file__))
    started = time.time()
    with zoo_common.deterministic_torch(threads):
        tokenizer = demo_data.build_char_tokenizer()
        exclude = all_eval_prompts()
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
    print(f"built the stacking zoo in {out} in {build_seconds} s")
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
    parser.add_argument("--write-evals", action="store_true", help="regenerate evals/stacking/")
    args = parser.parse_args(argv)
    if args.write_evals:
        written = write_eval_suite(REPO / "evals")
        print(f"wrote {len(written)} eval files under {REPO / 'evals' / EVAL_TASK_DIR}")
    build_zoo(args.out, quick=args.quick, threads=args.threads, check=not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
