"""What the zoo builders share (the demo, forgetting and SmolLM2 zoos in scripts/build_*_zoo.py).

A recipe cut to a quick build, the deterministic torch settings a build runs under, saving a model,
the manifest that caches a finished build, the default merges and the per-layer recipe the checks
score, the held-out table of parents and merges, and the lm-eval files of a zoo's eval splits. torch loads lazily: a builder pins its numerics
(scripts/pinned_numerics.py) before torch is first imported.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pinned_numerics
import yaml

from evomerge.files import write_text_atomic

MANIFEST = "zoo_manifest.json"
OWN_BLOCKS = "own blocks (per-layer)"


def make_recipe(quick: bool, recipe: dict, quick_steps: dict) -> dict:
    """A copy of `recipe`; `quick` cuts each stage to its few `quick_steps` (same files, untrained)."""
    recipe = copy.deepcopy(recipe)
    if quick:
        for stage, steps in quick_steps.items():
            recipe[stage]["steps"] = steps
    return recipe


def settings_hash(settings: dict, sources: Iterable[Path] = ()) -> str:
    """16 hex digits over the build's settings and the bytes of the code that turns them into weights."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def deterministic_torch(threads: int):
    """Pin threads and deterministic kernels for the build, then restore the caller's settings."""
    import torch

    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


def layer_index(param_name: str) -> int | None:
    """The decoder layer a parameter belongs to, or None for embeddings, final norm and head."""
    parts = param_name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def save_model(model, tokenizer, path: Path) -> None:
    """The model in float32 safetensors, with its tokenizer, as a Hugging Face folder."""
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one small shard per model: the bar is only noise
    model.to(torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)


# --------------------------------------------------------------------------- the manifest


def is_up_to_date(out: Path, expected_hash: str) -> bool:
    """Whether `out` holds a finished build whose recipe hash is `expected_hash`."""
    manifest = Path(out) / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("recipe_hash") == expected_hash


def weights_sha256(out: Path, model_dirs: Iterable[str]) -> str:
    """sha256 over the models' model.safetensors, in `model_dirs` order."""
    digest = hashlib.sha256()
    for name in model_dirs:
        digest.update((Path(out) / name / "model.safetensors").read_bytes())
    return digest.hexdigest()


def write_manifest(out: Path, manifest: dict) -> None:
    """OUT/zoo_manifest.json, written last, so a build cut short is not taken as finished."""
    write_text_atomic(Path(out) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def numerics() -> str:
    return "pinned" if pinned_numerics.is_pinned() else "native"


def build_in_pinned_subprocess(out: Path, threads: int, check: bool, script: Path) -> Path:
    """This process loaded torch with the CPU's own kernels; run the zoo's `script` where the numerics are pinned."""
    command = [sys.executable, str(script.resolve()), "--out", str(out), "--threads", str(threads)]
    subprocess.run(command + ([] if check else ["--no-check"]), check=True, env=os.environ | pinned_numerics.PINNED)
    return out


# --------------------------------------------------------------------------- the check's merges and table


def merge_config(out: Path, skills: Iterable[str], method: str, per_model: list[dict], base: bool = True):
    """A float32 MergeConfig over the zoo's experts (in `skills` order), on its base when `base`."""
    from evomerge.merge.config import MergeConfig

    experts = [str(Path(out) / f"expert_{skill}") for skill in skills]
    entries = [{"model": path, "parameters": params} for path, params in zip(experts, per_model, strict=True)]
    fields = {"merge_method": method, "models": entries, "dtype": "float32"}
    return MergeConfig.model_validate(fields | ({"base_model": str(Path(out) / "base")} if base else {}))


def equal_linear_config(out: Path, skills: tuple[str, ...]):
    """Linear at equal weights, the search's first baseline."""
    return merge_config(out, skills, "linear", [{"weight": 1 / len(skills)}] * len(skills), base=False)


def own_blocks_config(out: Path, skills: tuple[str, ...], expert_layers: dict, num_layers: int):
    """The per-layer recipe the zoos are built for: each expert's task vector in its own block only."""
    layers = range(num_layers)
    blocks = [[1.0 if layer in expert_layers[skill] else 0.0 for layer in layers] for skill in skills]
    return merge_config(out, skills, "task_arithmetic", [{"weight": block} for block in blocks])


def heldout_table(out: Path, model_dirs: list[str], configs: dict, score: Callable, verbose: bool = False) -> dict:
    """`score(model)` of every parent in `model_dirs`, then of every merge in `configs` (merged into one
    model with evomerge's engine; the task-vector merges share the sources of `task_arithmetic`)."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.resident import ResidentSources, merge_into_model

    table = {name: score(AutoModelForCausalLM.from_pretrained(Path(out) / name).eval()) for name in model_dirs}
    model = AutoModelForCausalLM.from_pretrained(Path(out) / "base").eval()
    task_vectors = ResidentSources.load(configs["task_arithmetic"])
    for label, config in configs.items():
        sources = task_vectors if config.base_model else ResidentSources.load(config)
        merge_into_model(model, sources, config, seed=0)
        table[label] = score(model)
        if verbose:
            print(f"  checked {label}: {table[label]}", file=sys.stderr, flush=True)
    return table


def standard_error(row: dict[str, float], docs: int) -> float:
    """SE of the mean of the per-skill accuracies, each a binomial share of `docs` documents."""
    skills = [value for name, value in row.items() if name != "mean"]
    return sum(p * (1 - p) / docs for p in skills) ** 0.5 / len(skills)


def print_heldout_table(table: dict[str, dict[str, float]], docs: int, label_width: int = 24) -> None:
    """Per-skill accuracy, mean and its standard error, a row per parent or merge."""
    skills = [name for name in next(iter(table.values())) if name != "mean"]
    header = f"{'held-out accuracy':{label_width}s}" + "".join(f"{skill:>11s}" for skill in skills)
    print(header + f"{'mean':>9s}{'SE':>8s}")
    for label, row in table.items():
        cells = "".join(f"{row[skill]:11.3f}" for skill in skills)
        print(f"{label:{label_width}s}{cells}{row['mean']:9.3f}{standard_error(row, docs):8.3f}")


# --------------------------------------------------------------------------- the eval splits as lm-eval files


def eval_task_config(task: str, data_file: str) -> dict:
    """An lm-eval loglikelihood task scoring acc on one local JSONL (`data_file` relative to the YAML)."""
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{target}}",
        # Targets follow the prompt exactly as the zoos trained on them; lm-eval's default " " would
        # score a space the models never saw.
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1},
    }


def write_eval_yaml(path: Path, config: dict, comment: str, command: str) -> Path:
    """`config` as a YAML headed by `comment` and the `command` that regenerates it."""
    header = f"# {comment}\n# Generated by `{command}`; do not edit.\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False, width=100))
    return path


def write_skill_splits(folder: Path, skills: dict, eval_splits: Callable, task_name: Callable, command: str) -> list:
    """Every skill's eval splits under `folder`: data/SKILL_SPLIT.jsonl and one task YAML each."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    written = []
    for name, skill in skills.items():
        for split, docs in eval_splits(name).items():
            data = folder / "data" / f"{name}_{split}.jsonl"
            data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
            config = eval_task_config(task_name(name, split), f"data/{name}_{split}.jsonl")
            comment = f"{name} ({split} split): {skill.description}"
            written += [data, write_eval_yaml(folder / f"{task_name(name, split)}.yaml", config, comment, command)]
    return written
