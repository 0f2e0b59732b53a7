"""Every check on a merge config that can be made before a weight is read.

Reads config.json files and safetensors headers only. Each problem raises a one-line UserError
naming the config field and the fix; `validate_merge_config` returns the plan the engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import UserError, did_you_mean
from evomerge.merge.config import MergeConfig
from evomerge.merge.io import ModelFolder, inspect_model_folder, parse_dtype
from evomerge.merge.parameters import ParameterFacts, default_of
from evomerge.merge.plan import MergePlan, MissingParameter, Planner, evaluate_setting, normalized_slices
from evomerge.merge.registry import KNOWN_PARAMETERS, METHODS, MethodInfo

SUPPORTED_TOKENIZER_SOURCES = ("base",)


@dataclass(frozen=True)
class ValidatedMerge:
    config: MergeConfig
    plan: MergePlan
    folders: dict[str, ModelFolder]
    working_dtype: dict[str, torch.dtype]  # per output tensor
    out_dtype: dict[str, torch.dtype]
    donor: str  # model whose config.json and tokenizer the output takes


def validate_merge_config(
    config: MergeConfig,
    source: str = "config",
    folders: dict[str, ModelFolder] | None = None,
    field_names: dict[str, str] | None = None,
) -> ValidatedMerge:
    """Check everything and plan the merge.

    `folders` (already inspected) avoids disk reads; `field_names` maps model paths to the field
    the user wrote them in, when the config was generated from another file (a search spec).
    """
    method = METHODS.get(config.merge_method)
    if method is None:
        raise UserError(
            f"{source}: merge_method: unknown method '{config.merge_method}'{did_you_mean(config.merge_method, METHODS)}; choose one of {', '.join(METHODS)}"
        )
    if method.needs_base and not config.base_model and not any(s.base_model for s in config.slices or []):
        raise UserError(
            f"{source}: base_model: method '{method.name}' needs a base_model; add 'base_model: PATH' (the model the fine-tunes started from)"
        )
    parse_dtype(config.dtype, f"{source}: dtype")
    parse_dtype(config.out_dtype, f"{source}: out_dtype")
    _check_parameter_values(config, source)
    known = folders or {}
    names = field_names or {}
    folders = {
        path: known.get(path) or inspect_model_folder(path, f"{source}: {names.get(path) or _field_of(config, path)}")
        for path in config.referenced_models()
    }
    donor = _tokenizer_donor(config, source)
    if donor not in folders:
        folders[donor] = inspect_model_folder(donor, f"{source}: tokenizer_source")
    # Folders handed in were already checked together when they were loaded (a worker's
    # resident sources); re-checking every tensor shape per candidate is hot-path waste.
    if not (known and all(path in known for path in folders)):
        _check_same_family(folders, source, config, names)
    _check_layer_ranges(config, folders, source)
    plan = _build_plan(config, folders, source)
    working, out = _dtypes(config, plan, folders, method)
    return ValidatedMerge(config, plan, folders, working, out, donor)


def _field_of(config: MergeConfig, path: str) -> str:
    return config.referenced_fields().get(path, "base_model")


def _tokenizer_donor(config: MergeConfig, source: str) -> str:
    fallback = config.base_model or config.referenced_models()[0]
    choice = config.tokenizer_source
    if choice in (None, "base"):
        return fallback
    if choice == "union":
        raise UserError(
            f"{source}: tokenizer_source: 'union' is not supported yet; use 'base' (all models must share one vocabulary)"
        )
    if Path(choice).expanduser().is_dir():
        return choice
    raise UserError(
        f"{source}: tokenizer_source: '{choice}' is not supported yet; use 'base' or the path of a local model folder"
    )


def _all_parameter_scopes(config: MergeConfig):
    yield "parameters", config.parameters
    for i, entry in enumerate(config.models or []):
        yield f"models[{i}].parameters", entry.parameters
    for i, output_slice in enumerate(config.slices or []):
        yield f"slices[{i}].parameters", output_slice.parameters
        for j, src in enumerate(output_slice.sources):
            yield f"slices[{i}].sources[{j}].parameters", src.parameters


def _check_parameter_values(config: MergeConfig, source: str) -> None:
    method = METHODS[config.merge_method]
    for where, scope in _all_parameter_scopes(config):
        for name, setting in (scope or {}).items():
            field = f"{source}: {where}.{name}"
            if name not in KNOWN_PARAMETERS:
                raise UserError(
                    f"{field}: unknown parameter{did_you_mean(name, KNOWN_PARAMETERS)}; known: {', '.join(sorted(KNOWN_PARAMETERS))}"
                )
            for value in _literal_values(name, setting, field):
                _check_range(method.facts(name), value, field)


def _literal_values(name, setting, field):
    """Every number a setting can take: its gradient points and filter branches."""
    try:
        points = [evaluate_setting(name, setting, "", t) for t in (0.0, 1.0)]
        branches = setting if isinstance(setting, list) else [setting]
        for branch in branches:
            value = getattr(branch, "value", None)
            if value is not None:
                points.extend(v for v in (value if isinstance(value, list) else [value]))
    except ValueError as error:
        raise UserError(f"{field}: {error}; use a number or a list of numbers") from None
    return [p for p in points if isinstance(p, (int, float)) and not isinstance(p, bool)]


def _check_range(facts: ParameterFacts, value: float, field: str) -> None:
    # Scales (weight, lambda) have no range here: a non-finite merge is caught on its output.
    valid = facts.valid
    if valid is not None and value not in valid:
        raise UserError(f"{field}: {value} is outside {valid}; use a value in that range")


def _check_same_family(
    folders: dict[str, ModelFolder], source: str, config: MergeConfig, names: dict[str, str]
) -> None:
    paths = list(folders)
    reference = folders[paths[0]]
    for path in paths[1:]:
        other = folders[path]
        field = f"{source}: {names.get(path) or _field_of(config, path)}"
        if other.config.get("architectures") != reference.config.get("architectures"):
            raise UserError(
                f"{field}: architecture {other.config.get('architectures')} differs from {reference.config.get('architectures')} of '{paths[0]}'; merge only fine-tunes of one base model"
            )
        if other.config.get("vocab_size") != reference.config.get("vocab_size"):
            raise UserError(
                f"{field}: vocab_size {other.config.get('vocab_size')} differs from {reference.config.get('vocab_size')} of '{paths[0]}'; vocabularies must match (tokenizer surgery is not supported)"
            )
        for name, info in other.tensors.items():
            ref = reference.tensors.get(name)
            if ref is not None and ref.shape != info.shape:
                raise UserError(
                    f"{field}: tensor {name} has shape {list(info.shape)} but {list(ref.shape)} in '{paths[0]}'; the models are not the same architecture"
                )


def _check_layer_ranges(config: MergeConfig, folders: dict[str, ModelFolder], source: str) -> None:
    for i, output_slice in enumerate(config.slices or []):
        lengths = set()
        for j, src in enumerate(output_slice.sources):
            start, end = src.layer_range
            available = folders[src.model].num_layers
            field = f"{source}: slices[{i}].sources[{j}].layer_range"
            if not 0 <= start < end <= available:
                raise UserError(
                    f"{field}: [{start}, {end}] is out of bounds for a model with {available} layers; use 0 <= start < end <= {available}"
                )
            lengths.add(end - start)
        if len(lengths) > 1:
            raise UserError(
                f"{source}: slices[{i}]: every source of a slice must span the same number of layers, got {sorted(lengths)}"
            )
        base = output_slice.base_model or config.base_model
        if METHODS[config.merge_method].needs_base and base not in {s.model for s in output_slice.sources}:
            raise UserError(
                f"{source}: slices[{i}]: base model '{base}' must be one of the slice's sources; add it with the same layer_range"
            )


def _build_plan(config: MergeConfig, folders: dict[str, ModelFolder], source: str) -> MergePlan:
    names = {path: list(folder.tensors) for path, folder in folders.items()}
    counts = {path: folder.num_layers for path, folder in folders.items()}
    method = METHODS[config.merge_method]
    if method.experts_exactly is not None or method.experts_at_least > 1 or method.base_optional:
        for i, output_slice in enumerate(normalized_slices(config, counts)):
            base = output_slice.base_model or config.base_model
            has_base = base is not None and base in {s.model for s in output_slice.sources}
            problem = method.slice_problem(len(output_slice.sources), has_base)
            if problem:
                raise UserError(f"{source}: slices[{i}]: {problem}")
    try:
        plan = Planner(config, names, counts).build()
    except MissingParameter as unset:
        raise UserError(
            f"{source}: parameters.{unset.name}: not set for tensor {unset.tensor_name}; set it globally or for every model"
        ) from None
    except ValueError as error:
        raise UserError(f"{source}: parameters: {error}") from None
    for tensor in plan.tensors:
        missing = [model for model, name in tensor.inputs if name not in folders[model].tensors]
        if missing:
            raise UserError(
                f"{source}: tensor {tensor.output} is missing from '{missing[0]}'; the models are not the same architecture"
            )
    if "epsilon" in method.input_params:
        _check_della_epsilon(plan, source)
    return plan


def _check_della_epsilon(plan: MergePlan, source: str) -> None:
    for tensor in plan.tensors:
        for params in tensor.per_input:
            density, epsilon = (
                params.get("density", default_of("density")),
                params.get("epsilon", default_of("epsilon")),
            )
            if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                raise UserError(
                    f"{source}: parameters.epsilon: density {density:g} ± epsilon {epsilon:g} leaves (0, 1) for {tensor.output}; lower epsilon"
                )


def _dtypes(config: MergeConfig, plan: MergePlan, folders: dict[str, ModelFolder], method: MethodInfo):
    forced = parse_dtype(config.dtype, "dtype")
    forced_out = parse_dtype(config.out_dtype, "out_dtype")
    working, out = {}, {}
    for tensor in plan.tensors:
        dtype = forced
        if dtype is None:
            dtype = folders[tensor.inputs[0][0]].tensors[tensor.inputs[0][1]].dtype
            for model, name in tensor.inputs[1:]:
                dtype = torch.promote_types(dtype, folders[model].tensors[name].dtype)
        working[tensor.output] = dtype
        # mergekit writes what the method returns: float32 from Arcee Fusion's and RAM+'s arithmetic.
        natural = torch.promote_types(dtype, torch.float32) if method.promotes_to_float32 else dtype
        out[tensor.output] = forced_out or natural
    return working, out
