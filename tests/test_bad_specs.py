"""Bad or hostile input: refused before any weight is read, and never trusted further than asked.

Each bad spec runs `evomerge search` (or `resume`) and expects exit code 2, exactly one line on
stderr naming the field (with a did-you-mean where a name is close), no traceback, no run directory
and no Ray. Every model folder here has garbage after its safetensors header, so a command that read
a weight before rejecting the spec would die of a safetensors error instead. `evomerge merge` config
errors are covered by tests/merge/test_merge_errors.py. The last tests check what evomerge does with input
it accepts: YAML is only safe-loaded, remote model code stays off unless the spec turns it on, and
paths are resolved against the spec's folder and frozen absolute.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from refusals import assert_refused_in_one_line, run_cli_in_process
from search_zoo import FIXTURE_EVALS
from tiny_models import write_corrupt_checkpoint

from evomerge.hub import ModelSources


@pytest.fixture(scope="module")
def models(zoo, tmp_path_factory) -> dict[str, str]:
    """Garbage-weight copies of the tiny zoo, plus folders broken in one way each."""
    root = tmp_path_factory.mktemp("garbage_weights")
    for name, good in {
        "base": zoo.model("base"),
        "ft_a": zoo.model("ft_a"),
        "ft_b": zoo.model("ft_b"),
        "wide": zoo.wide,
        "big_vocab": zoo.big_vocab,
    }.items():
        write_corrupt_checkpoint(Path(good), root / name)
        with open(root / name / "model.safetensors", "ab") as weights:
            weights.write(name.encode())  # distinct garbage: distinct models, as far as sampled bytes tell
    shutil.copytree(root / "ft_b", root / "no_config")
    (root / "no_config" / "config.json").unlink()
    shutil.copytree(root / "ft_b", root / "config_not_object")
    (root / "config_not_object" / "config.json").write_text("[1, 2]")
    shutil.copytree(root / "base", root / "base_copy")
    shutil.copytree(root / "ft_a", root / "ft_a_copy")
    shutil.copytree(root / "base", root / "base_without_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (root / "base_without_tokenizer" / name).unlink(missing_ok=True)
    edit_json(root, "ft_b", "other_tokenizer", "tokenizer.json", swap_vocabulary_ids)
    edit_json(root, "ft_b", "swapped_bos_eos", "tokenizer_config.json", swap_bos_and_eos)
    edit_json(root, "ft_b", "extra_added_token", "tokenizer.json", add_a_token)
    return {path.name: str(path) for path in root.iterdir()}


def edit_json(root: Path, source: str, name: str, file: str, change) -> None:
    """A copy of model folder `source` named `name` whose JSON `file` went through `change`."""
    shutil.copytree(root / source, root / name)
    with open(root / name / "model.safetensors", "ab") as weights:
        weights.write(name.encode())
    data = json.loads((root / name / file).read_text())
    change(data)
    (root / name / file).write_text(json.dumps(data))


def swap_vocabulary_ids(tokenizer: dict) -> None:
    vocab = tokenizer["model"]["vocab"]
    vocab["w0"], vocab["w1"] = vocab["w1"], vocab["w0"]  # same size, different token ids


def swap_bos_and_eos(config: dict) -> None:
    config["bos_token"], config["eos_token"] = config["eos_token"], config["bos_token"]


def add_a_token(tokenizer: dict) -> None:
    tokenizer["added_tokens"].append({"id": 64, "content": "<extra>", "special": True})


# A group of two fixture tasks, scored by their size-weighted accuracy as lm-eval aggregates it.
TINY_PAIR = (
    "group: tiny_pair\ntask: [tiny_add, tiny_choice]\naggregate_metric_list: [{metric: acc, weight_by_size: true}]\n"
)


def with_group(spec: dict, task_folder: str, **evaluation) -> None:
    """The fixture tasks plus the broken-task folder (which holds the tiny_pair group), and `evaluation`."""
    spec["evaluation"] |= {"include": [str(FIXTURE_EVALS), task_folder], **evaluation}


@pytest.fixture(scope="module")
def broken_task_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("broken_task")
    text = (
        (FIXTURE_EVALS / "tiny_add.yaml")
        .read_text()
        .replace("task: tiny_add", "task: lost_data")
        .replace("data/tiny.jsonl", "data/missing.jsonl")
    )
    (folder / "lost_data.yaml").write_text(text)
    (folder / "tiny_pair.yaml").write_text(TINY_PAIR)
    (folder / "odd_output.yaml").write_text(
        (FIXTURE_EVALS / "tiny_add.yaml")
        .read_text()
        .replace("task: tiny_add", "task: odd_output")
        .replace("output_type: loglikelihood", "output_type: generate_untill")
        .replace("data/tiny.jsonl", str(FIXTURE_EVALS / "data" / "tiny.jsonl"))
    )
    return str(folder)


def good_spec(models: dict, root: Path) -> dict:
    return {
        "name": "bad-spec",
        "runs_dir": str(root / "runs"),
        "models": {"base": models["base"], "experts": [models["ft_a"], models["ft_b"]]},
        "merge": {"method": "ties"},
        "genome": {"layer_groups": 2},
        "evaluation": {"include": [str(FIXTURE_EVALS)], "tasks": ["tiny_add"], "limit": 8},
        "budget": {"max_evals": 10},
        "workers": {"count": 1, "device": "cpu"},
    }


def put(spec: dict, dotted: str, value) -> None:
    *parents, key = dotted.split(".")
    for parent in parents:
        spec = spec.setdefault(parent, {})
    spec[key] = value


# name -> (change to the good spec (or raw file text), words the one stderr line must contain)
CASES = {
    "unknown-top-level-key": (
        lambda s, m, x: put(s, "budgets", {"max_evals": 5}),
        ["budgets", "unknown key", "did you mean 'budget'"],
    ),
    "typo-in-a-key": (
        lambda s, m, x: put(s, "genome.layer_group", 2),
        ["genome.layer_group", "did you mean 'layer_groups'"],
    ),
    "typo-in-method": (lambda s, m, x: put(s, "merge.method", "tie"), ["merge.method", "did you mean 'ties'"]),
    "typo-in-task-name": (
        lambda s, m, x: put(s, "evaluation.tasks", ["tiny_ad"]),
        ["evaluation.tasks[0]", "did you mean 'tiny_add'"],
    ),
    "unknown-lm-eval-task": (
        lambda s, m, x: put(s, "evaluation.tasks", ["no_such_benchmark_qqq"]),
        ["evaluation.tasks[0]", "unknown lm-eval task"],
    ),
    "task-data-file-missing": (
        lambda s, m, x: put(s, "evaluation", {"include": [x], "tasks": ["lost_data"]}),
        ["evaluation.tasks[0]", "missing.jsonl", "does not exist"],
    ),
    "unknown-metric": (
        lambda s, m, x: put(s, "evaluation.tasks", [{"name": "tiny_add", "metric": "accuracy"}]),
        ["evaluation.tasks[0].metric", "did you mean 'acc'"],
    ),
    "empty-task-list": (lambda s, m, x: put(s, "evaluation.tasks", []), ["evaluation.tasks"]),
    "heldout-overlaps-search": (
        lambda s, m, x: put(s, "evaluation.heldout_tasks", ["tiny_add"]),
        ["evaluation.heldout_tasks", "disjoint"],
    ),
    "inverted-bounds": (
        lambda s, m, x: put(s, "genome.bounds", {"weight": [1.0, 0.5]}),
        ["genome.bounds", "lower bound 1.0 must be below upper bound 0.5"],
    ),
    "negative-density-bound": (
        lambda s, m, x: put(s, "genome.bounds", {"density": [-0.1, 0.5]}),
        ["genome.bounds", "density", "(0, 1]"],
    ),
    "density-bound-above-one": (
        lambda s, m, x: put(s, "genome.bounds", {"density": [0.5, 1.5]}),
        ["genome.bounds", "density", "(0, 1]"],
    ),
    "unknown-searchable-parameter": (
        lambda s, m, x: put(s, "genome.params", ["weights"]),
        ["genome.params", "did you mean 'weight'"],
    ),
    "layer-groups-zero": (
        lambda s, m, x: put(s, "genome.layer_groups", 0),
        ["genome.layer_groups", "greater than or equal to 1"],
    ),
    "missing-base-folder": (
        lambda s, m, x: put(s, "models.base", "/nonexistent/evomerge-base"),
        ["models.base", "/nonexistent/evomerge-base", "does not exist"],
    ),
    "missing-expert-folder": (
        lambda s, m, x: put(s, "models.experts", [m["ft_a"], "/nonexistent/evomerge-expert"]),
        ["models.experts[1]", "does not exist"],
    ),
    "two-missing-expert-folders": (
        lambda s, m, x: put(s, "models.experts", ["/nonexistent/evomerge-expert-a", "/nonexistent/evomerge-expert-b"]),
        [
            "models.experts[0] '/nonexistent/evomerge-expert-a', models.experts[1] '/nonexistent/evomerge-expert-b'",
            "does not exist",
        ],
    ),
    "missing-base-folder-and-uncached-hub-expert": (
        lambda s, m, x: (
            put(s, "models.base", "/nonexistent/evomerge-base")
            or put(s, "models.experts", [m["ft_a"], "evomerge-test/never-cached@v1"])
        ),
        [
            "models.base '/nonexistent/evomerge-base': model folder does not exist",
            "models.experts[1] 'evomerge-test/never-cached@v1': not in the Hugging Face cache",
        ],
    ),
    "hub-model-offline-and-not-cached": (
        lambda s, m, x: put(s, "models.experts", [m["ft_a"], "evomerge-test/never-cached@v1"]),
        ["models.experts[1] 'evomerge-test/never-cached@v1'", "not in the Hugging Face cache", "evomerge prefetch"],
    ),
    "expert-without-config": (
        lambda s, m, x: put(s, "models.experts", [m["ft_a"], m["no_config"]]),
        ["models.experts[1]", "no config.json"],
    ),
    "duplicated-expert": (
        lambda s, m, x: put(s, "models.experts", [m["ft_a"], m["ft_a"]]),
        ["models.experts", "listed twice"],
    ),
    "differing-tokenizers": (
        lambda s, m, x: put(s, "models.experts", [m["ft_a"], m["other_tokenizer"]]),
        ["models.experts[1]", "tokenizer differs"],
    ),
    "differing-vocab-sizes": (
        lambda s, m, x: put(s, "models.experts", [m["ft_a"], m["big_vocab"]]),
        ["models.experts[1]", "vocab_size"],
    ),
    "mismatched-hidden-size": (
        lambda s, m, x: put(s, "models.experts", [m["ft_a"], m["wide"]]),
        ["models.experts[1]", "shape"],
    ),
    "slerp-with-two-experts": (
        lambda s, m, x: put(s, "merge.method", "slerp"),
        ["models.experts", "slerp", "exactly one expert"],
    ),
    "nearswap-with-two-experts": (
        lambda s, m, x: put(s, "merge.method", "nearswap"),
        ["models.experts", "nearswap", "exactly one expert"],
    ),
    "model_stock-has-nothing-to-search": (
        lambda s, m, x: put(s, "merge.method", "model_stock"),
        ["merge.method", "model_stock has no parameter to search", "evomerge merge"],
    ),
    "no-budget": (
        lambda s, m, x: put(s, "budget.max_evals", None),
        ["spec.yaml: budget: set max_evals, time_limit_min or max_docs"],
    ),
    "zero-max-docs": (lambda s, m, x: put(s, "budget.max_docs", 0), ["budget.max_docs", "greater than or equal to 1"]),
    "max-docs-below-baselines": (
        lambda s, m, x: put(s, "budget.max_docs", 10),
        ["budget.max_docs: 10 leaves no candidate after the", "raise it to at least"],
    ),
    "unknown-optimizer": (lambda s, m, x: put(s, "optimizer.name", "cma-es"), ["optimizer.name", "'cmaes'"]),
    "run-name-with-slash": (lambda s, m, x: put(s, "name", "team/run1"), ["name", "one folder name"]),
    "unwritable-runs-dir": (
        lambda s, m, x: put(s, "runs_dir", str(Path(m["base"]) / "config.json" / "runs")),
        ["runs_dir", "cannot write", "choose a writable runs_dir"],
    ),
    "malformed-yaml": (lambda s, m, x: "name: bad\nmodels:\n  base: a\n\texperts: [b]\n", ["malformed yaml", "line 4"]),
    "spec-not-a-mapping": (lambda s, m, x: "- just\n- a list\n", ["expected a mapping at the top level", "list"]),
    # --- numbers are sane
    "layer-groups-above-layer-count": (
        lambda s, m, x: put(s, "genome.layer_groups", 100),
        ["genome.layer_groups", "100", "4 layers", "use at most 4"],
    ),
    "layer-groups-huge": (lambda s, m, x: put(s, "genome.layer_groups", 10**20), ["genome.layer_groups", "1024"]),
    "layer-groups-float": (lambda s, m, x: put(s, "genome.layer_groups", 1e20), ["genome.layer_groups", "integer"]),
    "layer-groups-true": (lambda s, m, x: put(s, "genome.layer_groups", True), ["genome.layer_groups", "integer"]),
    "t-bounds-outside-its-range": (
        lambda s, m, x: put(s, "genome.bounds", {"t": [0.0, 2.0]}),
        ["genome.bounds", "t bounds must lie in [0, 1]"],
    ),
    "gamma-bounds-reach-one": (
        lambda s, m, x: put(s, "genome.bounds", {"gamma": [0.0, 1.0]}),
        ["genome.bounds", "gamma bounds must lie in [0, 1)"],
    ),
    "infinite-bound": (
        lambda s, m, x: put(s, "genome.bounds", {"weight": [0.0, float("inf")]}),
        ["genome.bounds.weight[1]", "finite"],
    ),
    "overflowing-bounds": (
        lambda s, m, x: put(s, "genome.bounds", {"weight": [-1e308, 1e308]}),
        ["genome.bounds", "weight bounds must lie in [-100, 100]"],
    ),
    "bounds-for-an-unsearched-parameter": (
        # TIES searches lambda by default (search version 2); a spec that names its genes leaves it out.
        lambda s, m, x: (
            put(s, "genome.params", ["weight", "density"]),
            put(s, "genome.bounds", {"lambda": [0.5, 1.5]}),
        ),
        ["genome.bounds", "'lambda' is not searched", "genome.params"],
    ),
    "gene-the-method-does-not-take": (
        lambda s, m, x: (put(s, "merge.method", "task_arithmetic"), put(s, "genome.params", ["weight", "t"])),
        ["genome.params", "task_arithmetic does not take 't'"],
    ),
    "fixed-parameter-not-finite": (
        lambda s, m, x: put(s, "merge.fixed", {"lambda": float("nan")}),
        ["merge.fixed", "lambda", "not a number in"],
    ),
    "negative-optimizer-seed": (lambda s, m, x: put(s, "optimizer.seed", -5), ["optimizer.seed", "greater than"]),
    "huge-popsize": (lambda s, m, x: put(s, "optimizer.popsize", 10**12), ["optimizer.popsize", "10000"]),
    "huge-worker-count": (lambda s, m, x: put(s, "workers.count", 100_000), ["workers.count", "4096"]),
    "huge-queue-depth": (lambda s, m, x: put(s, "workers.queue_depth", 10**6), ["workers.queue_depth", "1024"]),
    "huge-batch-size": (lambda s, m, x: put(s, "evaluation.batch_size", 10**6), ["evaluation.batch_size", "4096"]),
    "huge-max-evals": (lambda s, m, x: put(s, "budget.max_evals", 10**12), ["budget.max_evals", "10000000"]),
    "fractional-gpu-split": (
        lambda s, m, x: put(s, "workers.gpus_per_worker", 1.5),
        ["workers.gpus_per_worker", "whole number"],
    ),
    "tiny-cpus-per-worker": (
        lambda s, m, x: put(s, "workers.cpus_per_worker", 1e-9),
        ["workers.cpus_per_worker", "0.01"],
    ),
    "infinite-task-weight": (
        lambda s, m, x: put(s, "evaluation.tasks", [{"name": "tiny_add", "weight": float("inf")}]),
        ["evaluation.tasks[0].weight", "finite"],
    ),
    "max-evals-below-the-baselines": (
        lambda s, m, x: put(s, "budget.max_evals", 5),
        ["budget.max_evals", "7 baselines", "budget.baselines: false"],
    ),
    "several-problems-at-once": (
        lambda s, m, x: (put(s, "optimizer.seed", -1), put(s, "workers.queue_depth", 0)),
        ["spec.yaml: 2 problems: ", "optimizer.seed", "workers.queue_depth"],
    ),
    "task-listed-twice": (
        lambda s, m, x: put(s, "evaluation.tasks", ["tiny_add", "tiny_add"]),
        ["evaluation.tasks", "listed twice"],
    ),
    "run-name-dot-dot": (lambda s, m, x: put(s, "name", ".."), ["name", "one folder name", "not starting with '.'"]),
    "run-name-dot": (lambda s, m, x: put(s, "name", "."), ["name", "one folder name"]),
    "run-name-hidden": (lambda s, m, x: put(s, "name", ".cache"), ["name", "not starting with '.'"]),
    # --- files that are not what they claim
    "duplicate-yaml-key": (
        lambda s, m, x: yaml.safe_dump(s) + "budget: {max_evals: 100000}\n",
        ["spec.yaml", "key 'budget' appears twice", "line"],
    ),
    "spec-in-latin-1": (lambda s, m, x: "name: caf\xe9\n".encode("latin-1"), ["spec.yaml", "save it as UTF-8"]),
    "spec-in-utf-16": (lambda s, m, x: yaml.safe_dump(s).encode("utf-16"), ["spec.yaml", "save it as UTF-8"]),
    "yaml-nested-20000-deep": (lambda s, m, x: "a: " + "[" * 20_000 + "]" * 20_000 + "\n", ["nested too deeply"]),
    "config-json-not-an-object": (
        lambda s, m, x: put(s, "models.experts", [m["ft_a"], m["config_not_object"]]),
        ["models.experts[1]", "config.json", "not an object"],
    ),
    "held-out-task-unknown": (
        lambda s, m, x: put(s, "evaluation.heldout_tasks", ["tiny_choice", "tiny_ad"]),
        ["evaluation.heldout_tasks[1].name", "did you mean 'tiny_add'"],
    ),
    "group-name-mistyped": (
        lambda s, m, x: with_group(s, x, tasks=["tiny_pai"]),
        ["evaluation.tasks[0].name", "unknown lm-eval task 'tiny_pai'", "did you mean 'tiny_pair'"],
    ),
    "group-metric-it-does-not-aggregate": (
        lambda s, m, x: with_group(s, x, tasks=[{"name": "tiny_pair", "metric": "acc_norm"}]),
        ["evaluation.tasks[0].metric", "group 'tiny_pair' aggregates no 'acc_norm'", "choose one of: acc"],
    ),
    "held-out-task-inside-a-search-group": (
        lambda s, m, x: with_group(s, x, tasks=["tiny_pair"], heldout_tasks=["tiny_choice"]),
        ["evaluation.heldout_tasks[0].name", "'tiny_choice'", "search task 'tiny_pair'", "heldout_fraction"],
    ),
    "held-out-task-inside-a-search-group-with-carving": (
        lambda s, m, x: with_group(s, x, tasks=["tiny_pair"], heldout_tasks=["tiny_add"], heldout_fraction=0.5),
        ["evaluation.heldout_tasks[0].name", "'tiny_add'", "search task 'tiny_pair'"],
    ),
    "a-task-in-two-search-entries": (
        lambda s, m, x: with_group(s, x, tasks=["tiny_pair", "tiny_add"]),
        ["evaluation.tasks[1].name", "'tiny_pair' (evaluation.tasks[0]) scores too", "list each task once"],
    ),
    "held-out-fraction-not-a-share": (
        lambda s, m, x: put(s, "evaluation.heldout_fraction", 1.5),
        ["evaluation.heldout_fraction", "less than 1"],
    ),
    "held-out-fraction-leaves-no-held-out-doc": (
        lambda s, m, x: put(s, "evaluation.heldout_fraction", 0.001),
        ["evaluation.tasks[0]", "'tiny_add'", "held-out part of its 40 documents is empty", "heldout_fraction"],
    ),
    "carved-task-with-few-shot-examples-from-its-scored-split": (
        lambda s, m, x: put(
            s,
            "evaluation",
            s["evaluation"] | {"tasks": [{"name": "tiny_add", "num_fewshot": 2}], "heldout_fraction": 0.5},
        ),
        ["evaluation.tasks[0].num_fewshot", "'tiny_add'", "from 'test', the split it is scored on", "num_fewshot: 0"],
    ),
    "same-task-searched-and-held-out-without-carving": (
        lambda s, m, x: put(s, "evaluation.heldout_tasks", ["tiny_add"]),
        ["evaluation.heldout_tasks", "also a search task", "evaluation.heldout_fraction"],
    ),
    # --- models that are not distinct fine-tunes of one base with one tokenizer
    "expert-identical-to-the-base": (
        lambda s, m, x: put(s, "models.experts", [m["ft_a"], m["base_copy"]]),
        ["models.experts[1]", "base_copy", "same weights as models.base", "list each model once"],
    ),
    "expert-copied-from-another": (
        lambda s, m, x: put(s, "models.experts", [m["ft_a"], m["ft_a_copy"]]),
        ["models.experts[1]", "same weights as models.experts[0]"],
    ),
    "swapped-bos-and-eos": (
        lambda s, m, x: put(s, "models.experts", [m["ft_a"], m["swapped_bos_eos"]]),
        ["models.experts[1]", "tokenizer differs", "bos_token '</s>' where the base has '<s>'"],
    ),
    "an-added-token-differs": (
        lambda s, m, x: put(s, "models.experts", [m["ft_a"], m["extra_added_token"]]),
        ["models.experts[1]", "tokenizer differs", "added token 64 '<extra>'"],
    ),
    "base-without-a-tokenizer": (
        lambda s, m, x: put(s, "models.base", m["base_without_tokenizer"]),
        ["models.base: no tokenizer files (tokenizer.json", "copy the base model's tokenizer there"],
    ),
    # --- the scoring backend and lm-eval's prompt and generation options
    "unknown-backend": (
        lambda s, m, x: put(s, "evaluation.backend", "tensorrt"),
        ["evaluation.backend", "'native', 'lm_eval' or 'vllm'"],
    ),
    "output-type-no-scorer-knows": (
        lambda s, m, x: put(s, "evaluation", {"include": [x], "tasks": ["odd_output"]}),
        ["evaluation.tasks[0].name", "output_type 'generate_untill'", "did you mean 'generate_until'"],
    ),
    "sampling-in-a-scored-task": (
        lambda s, m, x: put(
            s,
            "evaluation.tasks",
            [{"name": "tiny_generate", "metric": "exact_match,whole", "gen_kwargs": {"do_sample": True}}],
        ),
        ["evaluation.tasks[0].gen_kwargs", "tiny_generate", "samples", "do_sample: false"],
    ),
    "gen-kwargs-on-a-loglikelihood-task": (
        lambda s, m, x: put(s, "evaluation.tasks", [{"name": "tiny_add", "gen_kwargs": {"until": ["."]}}]),
        ["evaluation.tasks[0].gen_kwargs", "loglikelihood task", "remove gen_kwargs"],
    ),
    "chat-template-without-one": (
        lambda s, m, x: put(s, "evaluation.apply_chat_template", True),
        ["evaluation.apply_chat_template", "models.base", "no chat template"],
    ),
    "multiturn-few-shot-without-chat": (
        lambda s, m, x: put(s, "evaluation.fewshot_as_multiturn", True),
        ["evaluation", "fewshot_as_multiturn needs apply_chat_template: true"],
    ),
    "fidelity-rungs-not-increasing": (
        lambda s, m, x: put(s, "evaluation.fidelity", {"rungs": [0.5, 0.25, 1.0]}),
        ["evaluation.fidelity.rungs", "must increase", "[0.2, 1.0]"],
    ),
    "fidelity-keep-not-a-share": (
        lambda s, m, x: put(s, "evaluation.fidelity", {"keep": 1.5}),
        ["evaluation.fidelity.keep", "in (0, 1), not 1.5", "e.g. 0.34"],
    ),
    "fidelity-last-rung-not-every-doc": (
        lambda s, m, x: put(s, "evaluation.fidelity", {"rungs": [0.25, 0.5]}),
        ["evaluation.fidelity.rungs", "last rung must be 1.0"],
    ),
    "fidelity-with-pareto-objectives": (
        lambda s, m, x: put(
            s,
            "evaluation",
            {
                "include": [str(FIXTURE_EVALS)],
                "tasks": ["tiny_add", "tiny_choice"],
                "objectives": [{"name": "add", "tasks": ["tiny_add"]}, {"name": "choice", "tasks": ["tiny_choice"]}],
                "fidelity": {},
            },
        ),
        ["evaluation", "fidelity races candidates on one weighted score", "drop evaluation.fidelity"],
    ),
    "fidelity-on-a-perplexity-task": (
        lambda s, m, x: put(
            s,
            "evaluation",
            {
                "include": [str(FIXTURE_EVALS)],
                "tasks": [{"name": "tiny_rolling", "metric": "word_perplexity"}],
                "fidelity": {},
            },
        ),
        ["evaluation.tasks[0]", "tiny_rolling", "not a mean", "drop evaluation.fidelity"],
    ),
    "fidelity-keep-too-small-to-act": (
        lambda s, m, x: put(s, "evaluation.fidelity", {"keep": 0.0001}),
        ["evaluation.fidelity.keep", "never act", "use keep of at least 0.5", "raise budget.max_evals"],
    ),
    "run-name-ending-in-a-newline": (
        lambda s, m, x: put(s, "name", "bad-spec\n"),
        ["name", "'bad-spec\\n'", "must be one folder name"],
    ),
    "runs-dir-with-a-newline": (
        lambda s, m, x: put(s, "runs_dir", s["runs_dir"] + "\nout_dtype: float16"),
        ["runs_dir", "control character", "exported yaml"],
    ),
    "fidelity-slice-without-docs": (
        lambda s, m, x: put(s, "evaluation.fidelity", {"rungs": [0.51, 0.52, 1.0]}),
        ["evaluation.fidelity.rungs", "0.51-0.52", "holds no document", "widen the rungs"],
    ),
}


def write_case(case: str, models: dict, task_folder: str, root: Path) -> Path:
    spec = good_spec(models, root)
    text = CASES[case][0](spec, models, task_folder)
    path = root / "spec.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text if isinstance(text, str) else yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_spec_is_refused_in_one_line(case, models, broken_task_folder, tmp_path):
    import ray

    spec_path = write_case(case, models, broken_task_folder, tmp_path)
    code, lines = run_cli_in_process("search", spec_path)
    assert_refused_in_one_line(code, lines, CASES[case][1])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "a run directory was created"
    assert not ray.is_initialized(), "Ray was started for a spec that cannot run"


# name -> (validate's flags, words its one stderr line must contain); the spec asks for GPU workers
VALIDATE_CASES = {
    "gpu-memory-overflowing": (["--gpu-memory", "1e999GiB"], ["--gpu-memory", "not a memory size"]),
    "gpu-memory-infinite": (["--gpu-memory", "inf"], ["--gpu-memory", "not a memory size"]),
    "gpu-memory-beyond-a-double": (["--gpu-memory", "1e400GB"], ["--gpu-memory", "not a memory size"]),
    "gpu-memory-nan": (["--gpu-memory", "nanGiB"], ["--gpu-memory", "not a memory size"]),
    "gpu-memory-without-a-unit": (["--gpu-memory", "80"], ["--gpu-memory", "with a unit"]),
    "gpu-memory-absurd": (["--gpu-memory", "1e30GB"], ["--gpu-memory", "not a gpu's memory size"]),
    "gpus-a-million": (["--gpu-memory", "80GiB", "--gpus", "1000000"], ["--gpus", "from 1 to 256"]),
    "runs-dir-a-file": (["--gpu-memory", "80GiB", "--runs-dir-is-a-file"], ["runs_dir", "not a writable folder"]),
}


@pytest.mark.parametrize("case", list(VALIDATE_CASES))
def test_validate_refuses_bad_flags_and_places_in_one_line(case, models, tmp_path):
    spec = good_spec(models, tmp_path)
    spec["workers"]["device"] = "cuda"
    flags = list(VALIDATE_CASES[case][0])
    if "--runs-dir-is-a-file" in flags:
        flags.remove("--runs-dir-is-a-file")
        (tmp_path / "a_file").write_text("not a folder")
        spec["runs_dir"] = str(tmp_path / "a_file")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    assert_refused_in_one_line(*run_cli_in_process("validate", spec_path, *flags), VALIDATE_CASES[case][1])


def test_validate_json_prints_an_object_for_a_refusal_too(models, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    spec_path = write_case("two-missing-expert-folders", models, "", tmp_path)
    result = CliRunner().invoke(app, ["validate", str(spec_path), "--json"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert json.loads(result.stdout) == {"ok": False, "error": lines[0].removeprefix("error: ")}


def test_the_garbage_zoo_is_only_broken_in_its_weights(models, tmp_path):
    """Guards the premise above: a good spec over these folders validates, reading a weight fails."""
    from safetensors.torch import load_file

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(good_spec(models, tmp_path)))
    code, _ = run_cli_in_process("validate", spec_path)
    assert code == 0
    with pytest.raises(Exception):  # noqa: B017 - any read error proves the premise
        load_file(Path(models["ft_a"]) / "model.safetensors")


def frozen_run(models: dict, root: Path) -> tuple[Path, Path]:
    """A run directory as `evomerge search` leaves it once started: frozen spec + run_started."""
    from evomerge.rundir.journal import Journal
    from evomerge.search.loop import create_run_dir
    from evomerge.spec import load_spec

    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(good_spec(models, root)))
    run_dir = create_run_dir(load_spec(spec_path))
    journal = Journal(run_dir)
    journal.append("run_started", spec_fingerprint=load_spec(spec_path).fingerprint(), workers=1)
    journal.close()
    return run_dir, spec_path


def test_resuming_after_the_frozen_spec_was_edited_is_refused(models, tmp_path):
    run_dir, _ = frozen_run(models, tmp_path)
    frozen = yaml.safe_load((run_dir / "spec.yaml").read_text())
    frozen["optimizer"] = {"seed": 5}
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(frozen))
    assert_refused_in_one_line(
        *run_cli_in_process("resume", run_dir), ["spec.yaml", "the spec was changed after the run started"]
    )


def test_resuming_with_a_different_spec_is_refused(models, tmp_path):
    run_dir, spec_path = frozen_run(models, tmp_path)
    changed = yaml.safe_load(spec_path.read_text())
    changed["genome"]["layer_groups"] = 4
    spec_path.write_text(yaml.safe_dump(changed))
    assert_refused_in_one_line(
        *run_cli_in_process("resume", run_dir, "--spec", spec_path), ["differs from the spec frozen"]
    )


def test_resuming_a_folder_that_is_not_a_run_is_refused(tmp_path):
    assert_refused_in_one_line(*run_cli_in_process("resume", tmp_path), ["not a run directory"])


def test_starting_a_run_whose_name_exists_is_refused(models, tmp_path):
    _, spec_path = frozen_run(models, tmp_path)
    assert_refused_in_one_line(*run_cli_in_process("search", spec_path), ["name", "already exists", "evomerge resume"])


def test_missing_spec_file_is_refused(tmp_path):
    assert_refused_in_one_line(*run_cli_in_process("validate", tmp_path / "nope.yaml"), ["nope.yaml", "file not found"])


def test_a_folder_given_as_the_spec_is_refused(tmp_path):
    assert_refused_in_one_line(
        *run_cli_in_process("search", tmp_path), [str(tmp_path), "is a folder; give the spec file"]
    )


def test_the_unique_key_loader_is_still_a_safe_loader(tmp_path):
    from evomerge.errors import UserError
    from evomerge.merge.config import UniqueKeySafeLoader, load_yaml_file

    assert issubclass(UniqueKeySafeLoader, yaml.SafeLoader)
    (tmp_path / "evil.yaml").write_text("!!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(UserError, match="could not determine a constructor"):
        load_yaml_file(tmp_path / "evil.yaml")
    (tmp_path / "anchors.yaml").write_text("base: &b {x: 1}\nmore:\n  <<: *b\n  x: 2\n")
    assert load_yaml_file(tmp_path / "anchors.yaml") == {"base": {"x": 1}, "more": {"x": 2}}


@pytest.mark.slow
def test_the_installed_command_prints_only_the_line(models, broken_task_folder, tmp_path, evomerge_cli):
    """The same refusals through the real `evomerge` process: no import noise, no warnings."""
    cases = ["typo-in-method", "differing-tokenizers"]
    paths = []
    for case in cases:
        (tmp_path / case).mkdir()
        paths.append(write_case(case, models, broken_task_folder, tmp_path / case))
    with ThreadPoolExecutor(max_workers=2) as pool:
        finished = list(pool.map(lambda p: evomerge_cli("search", p), paths))
    for case, result in zip(cases, finished, strict=False):
        assert_refused_in_one_line(
            result.returncode, [line for line in result.stderr.splitlines() if line.strip()], CASES[case][1]
        )


@pytest.fixture(scope="module")
def cuda_refusal(models, tmp_path_factory, evomerge_cli):
    """`evomerge search` of a spec asking for CUDA workers on a machine without a GPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    root = tmp_path_factory.mktemp("cuda")
    spec = good_spec(models, root)
    spec["workers"]["device"] = "cuda"
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    result = evomerge_cli("search", spec_path, timeout=180)
    return result, [line for line in result.stderr.splitlines() if line.strip()], root


@pytest.mark.slow
def test_cuda_workers_without_a_gpu_are_refused_before_weights(cuda_refusal):
    result, lines, _ = cuda_refusal
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "workers.device" in lines[-1] and "no GPU" in lines[-1]


@pytest.mark.slow
def test_cuda_workers_without_a_gpu_leave_no_run_behind(cuda_refusal):
    result, lines, root = cuda_refusal
    assert len(lines) == 1, result.stderr
    assert not (root / "runs" / "bad-spec").exists()


PACKAGE = Path(__file__).resolve().parents[1] / "evomerge"
UNSAFE_YAML = re.compile(
    r"yaml\.(load|load_all|full_load|full_load_all|unsafe_load|unsafe_load_all)\(|Loader\s*=|yaml\.(Unsafe|Full)?Loader\b"
)


def test_yaml_is_only_ever_safe_loaded():
    sources = {path.relative_to(PACKAGE): path.read_text() for path in PACKAGE.rglob("*.py")}
    unsafe = [f"{path}: {match.group(0)}" for path, text in sources.items() for match in UNSAFE_YAML.finditer(text)]
    assert not unsafe, unsafe
    assert sum(text.count("yaml.safe_load(") for text in sources.values()) >= 2, "the scan found evomerge's YAML reads"


def test_every_from_pretrained_call_passes_the_spec_s_trust_remote_code():
    calls = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                given = {keyword.arg: ast.unparse(keyword.value) for keyword in node.keywords}
                calls.append((path.name, node.lineno, given.get("trust_remote_code")))
    assert calls, "no from_pretrained call found"
    assert all(value and value != "True" and value.endswith("trust_remote_code") for _, _, value in calls), calls


@pytest.mark.parametrize("asked", [False, True])
def test_workers_trust_remote_code_only_when_the_spec_says_so(asked, monkeypatch):
    import ray

    from evomerge.search import cluster
    from evomerge.spec import parse_spec

    built = []
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(
        cluster,
        "ray_worker_class",
        lambda cpus, gpus: SimpleNamespace(remote=lambda settings, name: built.append(settings)),
    )
    data = {"name": "t", "models": {"base": "b", "experts": ["e"]}, "evaluation": {"tasks": ["t"]}}
    spec = parse_spec({**data, "trust_remote_code": True} if asked else data, "spec", Path("/"))
    prepared = SimpleNamespace(union_config={}, eval_sets={}, sources=ModelSources({}))
    make_actor, _ = cluster.make_actor_factory(prepared, spec)
    make_actor(0)
    assert built[0].trust_remote_code is asked


def test_paths_resolve_against_the_spec_folder_and_are_frozen_absolute(models, tmp_path, monkeypatch):
    from evomerge.preflight import preflight
    from evomerge.search.loop import create_run_dir
    from evomerge.spec import load_spec

    folder = tmp_path / "specs"
    folder.mkdir()
    spec = good_spec(models, tmp_path)
    spec["models"]["base"] = os.path.relpath(models["base"], folder)
    spec["evaluation"]["include"] = [os.path.relpath(FIXTURE_EVALS, folder)]
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_spec(folder / "spec.yaml")
    assert loaded.models.base == str(Path(models["base"]).resolve())
    assert loaded.evaluation.include == [str(FIXTURE_EVALS.resolve())]
    preflight(loaded)
    frozen = yaml.safe_load((create_run_dir(loaded) / "spec.yaml").read_text())
    assert frozen["models"]["base"] == loaded.models.base and Path(frozen["evaluation"]["include"][0]).is_absolute()


@pytest.mark.parametrize(
    "dtype, fix",
    [("float32", "a smaller merge.dtype (bfloat16)"), ("bfloat16", "more memory")],
    ids=["float32", "bfloat16"],
)
def test_eval_of_a_model_this_machine_cannot_hold_is_refused_with_the_figure_and_the_fix(
    models, tmp_path, monkeypatch, dtype, fix
):
    """A 7B checkpoint (headers only, its weights a hole) on a machine of 8 GB: one line, before any load."""
    sys.path.insert(0, str(Path(__file__).parent / "merge"))
    from header_only import MISTRAL_7B, write_header_only_model
    from search_zoo import char_tokenizer

    import evomerge.merge.memory_plan

    seven_b = write_header_only_model(tmp_path / "7b", MISTRAL_7B, "7b", char_tokenizer())
    monkeypatch.setattr(evomerge.merge.memory_plan, "host_memory", lambda: 8 * 10**9)
    spec = good_spec(models, tmp_path)
    spec["merge"]["dtype"] = dtype
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    code, lines = run_cli_in_process("eval", spec_path, "--model", seven_b)
    assert_refused_in_one_line(code, lines, ["--model", "needs at least", "GB for its weights", "(8.0 GB)", fix])
