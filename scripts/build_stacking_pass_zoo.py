"""Build the pass-through stacking zoo: the stacking zoo's experts, each block trained to add nothing off its tag.

    python scripts/build_stacking_pass_zoo.py [--out .cache/stacking_pass_zoo] [--quick] [--no-check]

The stacking zoo (scripts/build_stacking_zoo.py) with one change in how an expert trains its block
(layers 4-7 of the depth-expanded base). There, a quarter of each batch was echo under other tags,
so a block learned to turn any prompt that is not its own back into echo, and in the path base 0-3,
increment 4-7, decrement 4-7 the decrement block undid increment's answer. Here an expert trains on
two batches a step:

- its skill, with the usual next-token loss on the answer;
- other prompts (echo under other tags, and the other skill's prompts with their answers), where the
  loss is the block's contribution to the residual stream: the squared change between the stream
  entering layer 4 and the one leaving layer 7, over every position, relative to the stream's own
  size. The block learns to act on its tag and to be the identity everywhere else.

Each expert trains alone, from the base, on data only: no expert sees the other's weights, and
nothing trains on the stacked path. The base, the eval splits (evals/demo/, evals/stacking/) and the
design check are the stacking zoo's.

As built, the zoo is as designed: every default merge scores 0 held-out, each expert 0.5 and the
stacked path 0.998. The searches of search_spaces/stacking_pass_*.yaml do not find that path
(docs/RESULTS.md): every partial stack scores below a parent, so no slope leads a per-layer search to it.
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

import build_stacking_zoo as stacking  # noqa: E402
import demo_data  # noqa: E402
import demo_train  # noqa: E402
import torch  # noqa: E402
import zoo_common  # noqa: E402

DEFAULT_OUT = REPO / ".cache" / "stacking_pass_zoo"
BUILD_VERSION = 1
SKILLS, MODEL_DIRS = stacking.SKILLS, stacking.MODEL_DIRS
RECIPE = stacking.RECIPE | {
    "expert": {
        "steps": 300,
        "lr": 2e-3,
        "skill_batch": 48,  # documents of the skill per step (next-token loss)
        "pass_batch": 32,  # other documents per step (the block's contribution as the loss)
        "pass_weight": 10.0,  # the contribution loss's weight against the skill's
        "other_skill_share": 0.5,  # of the pass batch: the other skill's prompts, the rest echo
    },
}
QUICK_STEPS = stacking.QUICK_STEPS
PROGRESS_STEPS = 50  # a line with both losses this often while an expert trains
SOURCES = (
    Path(__file__),
    Path(stacking.__file__),
    Path(stacking.forget_zoo.__file__),
    *stacking.demo_zoo.SOURCES,
)


def make_recipe(quick: bool) -> dict:
    return zoo_common.make_recipe(quick, RECIPE, QUICK_STEPS)


def recipe_hash(recipe: dict, threads: int = 1) -> str:
    """Changes whenever the recipe, the thread count, this builder or the code it reuses changes."""
    settings = {"version": BUILD_VERSION, "recipe": recipe, "threads": threads}
    return zoo_common.settings_hash(settings, SOURCES)


# --------------------------------------------------------------------------- the block's contribution


def relative_change(before: torch.Tensor, after: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked positions of |after - before|², over the mean |before|² there."""
    weights = mask.to(before.dtype).unsqueeze(-1)
    change = ((after - before) ** 2 * weights).sum()
    scale = (before.detach() ** 2 * weights).sum()
    return change / scale


class BlockTap:
    """Hooks on a block of decoder layers: the stream entering its first layer and the one leaving its last."""

    def __init__(self, model, layers: list[int]):
        self.entering, self.leaving = None, None
        decoder = model.model.layers
        self.handles = [
            decoder[layers[0]].register_forward_pre_hook(self._enter, with_kwargs=True),
            decoder[layers[-1]].register_forward_hook(self._leave),
        ]

    def _enter(self, module, args, kwargs):
        self.entering = args[0] if args else kwargs["hidden_states"]

    def _leave(self, module, args, output):
        self.leaving = output[0] if isinstance(output, tuple) else output

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# --------------------------------------------------------------------------- the experts


def pass_stream(skill_name: str, other_share: float, exclude: frozenset[str]):
    """The prompts the block must leave alone, with their answers: the other skill's, and echo under
    any tag but a skill's."""
    seed = f"stacking_pass/{skill_name}"
    rng = random.Random(seed)
    others = [stacking.ZOO_SKILLS[name] for name in SKILLS if name != skill_name]
    other = demo_data.training_stream(others, f"{seed}/other", exclude)
    tags = {skill.tag for skill in stacking.ZOO_SKILLS.values()}
    echo = demo_data.training_stream([demo_data.ECHO], f"{seed}/echo", exclude)
    echo = (doc for doc in echo if doc["prompt"][:3] not in tags)
    while True:
        yield next(other) if rng.random() < other_share else next(echo)


def build_expert(base, tokenizer, skill_name: str, recipe: dict, exclude: frozenset[str]):
    """The expanded block alone learns the skill, and to add nothing to any other prompt."""
    settings, block = recipe["expert"], recipe["expert_layers"]
    torch.manual_seed(SKILLS.index(skill_name) + 1)
    model = copy.deepcopy(base)
    groups = stacking.forget_zoo.layer_groups(model, block, settings["lr"])
    own = demo_data.training_stream([stacking.ZOO_SKILLS[skill_name]], f"stacking_pass/{skill_name}/skill", exclude)
    others = pass_stream(skill_name, settings["other_skill_share"], exclude)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings["lr"], total_steps=settings["steps"], pct_start=0.1
    )
    tap = BlockTap(model, block)
    model.train()
    print(f"zoo: training expert_{skill_name}: {settings['steps']} steps", flush=True)
    for step in range(settings["steps"]):
        skill_docs = [next(own) for _ in range(settings["skill_batch"])]
        other_docs = [next(others) for _ in range(settings["pass_batch"])]
        skill_loss = model(**demo_train.encode_batch(tokenizer, skill_docs)).loss
        pass_loss = block_contribution(model, tap, demo_train.encode_batch(tokenizer, other_docs))
        optimizer.zero_grad()
        (skill_loss + settings["pass_weight"] * pass_loss).backward()
        optimizer.step()
        schedule.step()
        if step % PROGRESS_STEPS == 0 or step == settings["steps"] - 1:
            losses = f"skill loss {skill_loss.item():.4f}, block contribution {pass_loss.item():.5f}"
            print(f"zoo: expert_{skill_name} step {step}: {losses}", flush=True)
    tap.remove()
    return model.eval()


def block_contribution(model, tap: BlockTap, batch: dict) -> torch.Tensor:
    """The block's relative change to the stream over every position of `batch`'s documents."""
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return relative_change(tap.entering, tap.leaving, batch["attention_mask"])


# --------------------------------------------------------------------------- orchestration


def build_zoo(out: Path = DEFAULT_OUT, quick: bool = False, threads: int = 1, check: bool = True) -> Path:
    """Build (or reuse) the zoo in `out`; returns `out`. Restores torch's global settings after."""
    out = Path(out)
    recipe = make_recipe(quick)
    expected = recipe_hash(recipe, threads)
    if zoo_common.is_up_to_date(out, expected):
        print(f"pass-through stacking zoo is up to date in {out}")
        return out
    if not quick and not pinned_numerics.is_pinned():
        return zoo_common.build_in_pinned_subprocess(out, threads, check, Path(__file__))
    started = time.time()
    with zoo_common.deterministic_torch(threads):
        tokenizer = demo_data.build_char_tokenizer()
        exclude = stacking.all_eval_prompts()
        base = stacking.build_base(tokenizer, recipe, exclude)  # the stacking zoo's base, the same weights
        experts = {skill: build_expert(base, tokenizer, skill, recipe, exclude) for skill in SKILLS}
        for name, model in ({"base": base} | {f"expert_{skill}": e for skill, e in experts.items()}).items():
            zoo_common.save_model(model, tokenizer, out / name)
        build_seconds = round(time.time() - started, 1)
        table = stacking.heldout_table(out, recipe, tokenizer) if check else None
    manifest = {
        "recipe_hash": expected,
        "zoo_sha256": zoo_common.weights_sha256(out, MODEL_DIRS),
        "numerics": zoo_common.numerics(),
        "build_version": BUILD_VERSION,
        "quick": quick,
        "recipe": recipe,
        "models": MODEL_DIRS,
        "build_seconds": build_seconds,
        "heldout_table": table,
    }
    zoo_common.write_manifest(out, manifest)
    print(f"built the pass-through stacking zoo in {out} in {build_seconds} s")
    if table:
        stacking.print_table(table)
        for problem in stacking.check_design(table):
            print(f"warning: {problem}; the zoo is not as designed", file=sys.stderr)
    return out


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
