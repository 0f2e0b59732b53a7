"""Everything checked before a search starts, without reading a weight.

`preflight(spec)` resolves every model name to a folder once (a hub ID at its pinned commit when
`pins` gives one, see `hub.py`), checks the model folders (existence, architecture, vocabulary,
tokenizer, no model listed twice under another name), plans the default merge, resolves every
lm-eval task, and returns what the search needs: the genome, the merge that keeps every tensor
resident, the eval sets, the baseline merges and the models' sources. Merge configs keep the
spec's names; whatever reads a model's files asks `Prepared.sources` for its folder.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

from evomerge.errors import UserError
from evomerge.evaluation.checks import check_chat_template
from evomerge.evaluation.config import EvalSet
from evomerge.evaluation.dry_run import rehearse_eval_set
from evomerge.evaluation.tasks import resolve_tasks
from evomerge.genome import Genome
from evomerge.genome_multi import MethodChoiceGenome, first_points, make_genome
from evomerge.hub import ModelSources, resolve_models
from evomerge.layer_genome import LayerGenome, layer_genome_problem
from evomerge.merge.config import MergeConfig
from evomerge.merge.fingerprint import same_weights, weights_fingerprint
from evomerge.merge.registry import METHODS, every_tensor_config, single_model_config
from evomerge.merge.tokenizers import VOCABULARY_FILES, read_tokenizer, tokenizer_difference
from evomerge.merge.validate import validate_merge_config
from evomerge.rundir.trials import BASE_LABEL, parent_label
from evomerge.spec import Spec


@dataclass(frozen=True)
class Prepared:
    spec: Spec
    genome: Genome | MethodChoiceGenome
    union_config: dict
    eval_sets: dict[str, EvalSet]  # "search" and, with held-out tasks, "heldout"
    baselines: list[tuple[str, dict]]  # (label, merge config)
    search_docs: int | None = None  # search documents one candidate scored whole takes (None: not rehearsed)
    sources: ModelSources = dataclass_field(default_factory=lambda: ModelSources({}))  # model name -> its folder


def preflight(
    spec: Spec,
    source: str = "spec",
    pins: Mapping[str, str] | None = None,
    dataset_revisions: dict[str, str] | None = None,
) -> Prepared:
    """Every check before a search; `pins` (model name -> commit) holds hub models at those commits,
    `dataset_revisions` (a lock's, `evaluation.hub_data.locked_dataset_revisions`) hub datasets."""
    for method in spec.merge.methods:
        experts_problem = METHODS[method].experts_problem(len(spec.models.experts))
        if experts_problem:
            raise UserError(f"{source}: models.experts: {experts_problem}")
    sources = resolve_models(model_fields(spec), source, pins, fetch_hint=f"evomerge prefetch {source}")
    folders = sources.folders()
    _check_distinct_folders(folders, model_fields(spec), source)
    union = _union_config(spec)
    fields = {folders[name]: field for name, field in model_fields(spec).items()}
    validated = validate_merge_config(union.with_models(folders), source, field_names=fields)
    _check_tokenizers(fields, source)
    check_chat_template(spec.evaluation, folders[spec.models.base], "models.base")
    _check_distinct_weights(fields, source)
    num_layers = validated.folders[folders[spec.models.base]].num_layers
    _check_layer_groups(spec, num_layers, source)
    searches_layers = spec.search.layers or spec.search.phased  # a phased run's second phase is a layer search
    if searches_layers and (problem := layer_genome_problem(spec, validated.folders[folders[spec.models.base]])):
        raise UserError(f"{source}: {problem}")
    genome = LayerGenome(spec, num_layers) if spec.search.layers else make_genome(spec, num_layers)
    for x in first_points(genome):
        validate_merge_config(genome.to_merge_config(x).with_models(folders), source, folders=validated.folders)
    eval_sets = spec.evaluation.eval_sets(dataset_revisions)
    resolved = {name: resolve_tasks(eval_set) for name, eval_set in eval_sets.items()}
    check_available(spec, source)
    baselines = (
        (genome.baseline_configs() if spec.search.layers else baseline_configs(spec)) if spec.budget.baselines else []
    )
    _check_budget_after_baselines(spec, len(baselines), source)
    _check_halving_can_act(spec, len(baselines), source)
    # The slowest check last: it builds every task's docs.
    docs = {name: rehearse_eval_set(eval_set, resolved[name]) for name, eval_set in eval_sets.items()}
    _check_docs_budget(spec, len(baselines), docs["search"], source)
    union_config = union.model_dump(mode="json", exclude_none=True)
    return Prepared(spec, genome, union_config, eval_sets, baselines, search_docs=docs["search"], sources=sources)


def model_fields(spec: Spec) -> dict[str, str]:
    """Model name -> the spec field that names it, base first."""
    return {
        spec.models.base: "models.base",
        **{path: f"models.experts[{i}]" for i, path in enumerate(spec.models.experts)},
    }


def _union_config(spec: Spec) -> MergeConfig:
    """A merge over every model: it touches every tensor the search can use."""
    return MergeConfig.model_validate(every_tensor_config(spec.models.base, spec.models.experts, spec.merge.dtype))


def _check_tokenizers(fields: dict[str, str], source: str) -> None:
    """Every expert has the base's tokenizer: whole tokenizer.json, added and special tokens."""
    reference = None
    for path, field in fields.items():
        facts = read_tokenizer(Path(path), f"{source}: {field}")
        if facts is None:
            raise UserError(
                f"{source}: {field}: no tokenizer files ({', '.join(VOCABULARY_FILES)}) in {path}; copy the base model's tokenizer there"
            )
        difference = None if reference is None else tokenizer_difference(reference, facts)
        if difference:
            raise UserError(
                f"{source}: {field}: its tokenizer differs from the base model's ({difference}); every model must share the base tokenizer"
            )
        reference = reference or facts


def _check_distinct_folders(folders: dict[str, str], fields: dict[str, str], source: str) -> None:
    """Two names of one snapshot (`org/x` and `org/x@main`) are one model listed twice."""
    seen: dict[str, str] = {}
    for name, folder in folders.items():
        if folder in seen:
            raise UserError(
                f"{source}: {fields[name]}: '{name}' is the same model as {fields[seen[folder]]} ('{seen[folder]}'); list each model once"
            )
        seen[folder] = name


def _check_distinct_weights(fields: dict[str, str], source: str) -> None:
    """No expert is the base, or another expert, under a second name (a copied folder)."""
    seen: dict[str, str] = {}
    for path, field in fields.items():
        fingerprint = weights_fingerprint(Path(path))
        if fingerprint in seen and same_weights(Path(_path_of(fields, seen[fingerprint])), Path(path)):
            first = seen[fingerprint]
            raise UserError(
                f"{source}: {field}: '{path}' holds the same weights as {first} ('{_path_of(fields, first)}'); "
                f"list each model once and give {field} a real fine-tune"
            )
        seen[fingerprint] = field


def _path_of(fields: dict[str, str], field: str) -> str:
    return next(path for path, name in fields.items() if name == field)


def _check_layer_groups(spec: Spec, num_layers: int, source: str) -> None:
    groups = spec.genome.layer_groups
    if groups > num_layers:
        raise UserError(
            f"{source}: genome.layer_groups: {groups} is more than the base model's {num_layers} layers; "
            f"use at most {num_layers} (one gene set per layer)"
        )


def _check_budget_after_baselines(spec: Spec, baselines: int, source: str) -> None:
    max_evals = spec.budget.max_evals
    if max_evals is not None and baselines and max_evals <= baselines:
        raise UserError(
            f"{source}: budget.max_evals: {max_evals} leaves no evaluation for the search after the {baselines} "
            f"baselines; raise it above {baselines} or set budget.baselines: false"
        )


def _check_halving_can_act(spec: Spec, baselines: int, source: str) -> None:
    """Successive halving ranks a candidate against the ceil(1 / keep) before it: a keep so small
    that the budget never holds that many would silently race without it."""
    fidelity, max_evals = spec.evaluation.fidelity, spec.budget.max_evals
    if fidelity is None or fidelity.keep is None or max_evals is None:
        return
    candidates, ranked = max_evals - baselines, math.ceil(1 / fidelity.keep - 1e-9)
    if ranked < candidates:
        return
    smallest = f"use keep of at least {math.ceil(1000 / (candidates - 1)) / 1000:g}, or " if candidates > 2 else ""
    raise UserError(
        f"{source}: evaluation.fidelity.keep: {fidelity.keep:g} ranks each candidate against the {ranked} before it, but "
        f"budget.max_evals leaves {candidates} candidates after the {baselines} baselines, so successive halving would never act; "
        f"{smallest}raise budget.max_evals to at least {baselines + ranked + 1}"
    )


def _check_docs_budget(spec: Spec, baselines: int, per_candidate: int, source: str) -> None:
    """`budget.max_docs` must fit the baselines and one candidate scored whole (the search's ceiling rule)."""
    max_docs, needed = spec.budget.max_docs, (baselines + 1) * per_candidate
    if max_docs is not None and max_docs < needed:
        after = f" after the {baselines} baselines" if baselines else ""
        raise UserError(
            f"{source}: budget.max_docs: {max_docs:,} leaves no candidate{after} ({per_candidate:,} search "
            f"documents each); raise it to at least {needed:,}"
        )


def baseline_configs(spec: Spec) -> list[tuple[str, dict]]:
    """The base, the parents and the default merges every report compares against: the methods'
    standard ones and, from version 2, the spec's own method's."""
    base, experts, dtype = spec.models.base, list(spec.models.experts), spec.merge.dtype
    configs = [(BASE_LABEL, single_model_config(base, dtype))]
    configs += [(parent_label(p), single_model_config(p, dtype)) for p in experts]
    standard = [m for m in METHODS.values() if m.standard_baseline]
    configs += [(m.default_label, m.default_merge(base, experts, dtype)) for m in standard]
    for name in spec.merge.methods:  # a method gene: each listed method's default merge
        own = METHODS[name]
        if spec.version >= 2 and own.default_label not in dict(configs):
            configs.append((own.default_label, method_default_config(spec, name)))
    return configs


def method_default_config(spec: Spec, method: str | None = None) -> dict:
    """The spec's method (or the listed `method`) with weights 1, density 0.5 and t 0.5 (else
    mergekit's defaults): version 2's x0."""
    name = method or spec.merge.methods[0]
    return METHODS[name].default_merge(spec.models.base, list(spec.models.experts), spec.merge.dtype)


TRACKER_INSTALL_HINT = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def check_available(spec: Spec, source: str = "spec") -> None:
    """The optional packages the spec asks for (logging backends, vLLM) are importable (none is a dependency)."""
    if spec.evaluation.backend.value == "vllm" and importlib.util.find_spec("vllm") is None:
        from evomerge.evaluation.vllm_backend import INSTALL_HINT

        raise UserError(
            f"{source}: evaluation.backend: vllm is not installed; {INSTALL_HINT}, or set evaluation.backend: native"
        )
    for name in ("tensorboard", "wandb"):
        if getattr(spec.logging, name) and importlib.util.find_spec(name) is None:
            raise UserError(
                f"{source}: logging.{name}: {name} is not installed; {TRACKER_INSTALL_HINT[name]} or set it to false"
            )
