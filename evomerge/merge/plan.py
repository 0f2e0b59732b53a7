"""Turn a MergeConfig plus the models' tensor names into a per-tensor MergePlan.

For every output tensor the plan says which input tensors feed it, which input is the base, and
the method's parameters resolved the way mergekit 0.1.5 resolves them: precedence
source > slice > global; filters match a substring of the tensor name; gradient lists are
interpolated piecewise-linearly at t = layer / (layers_in_slice - 1), and at t = 0 for the
embeddings, final norm and head. Planning reads names only, never weights.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from evomerge.merge.config import ConditionalParameter, MergeConfig, OutputSlice, SourceSlice
from evomerge.merge.parameters import SWITCHES
from evomerge.merge.registry import METHODS, MethodInfo

LAYER_NAME = re.compile(r"^(?P<prefix>.*?\.layers\.)(?P<index>\d+)(?P<suffix>\..+)$")
BOOL_PARAMS = SWITCHES


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is made: inputs (model path, tensor name), base position, parameters."""

    output: str
    inputs: tuple[tuple[str, str], ...]
    base_index: int | None
    shared: dict[str, Any]
    per_input: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class MergePlan:
    method: MethodInfo
    tensors: tuple[TensorPlan, ...]
    num_layers: int


@functools.lru_cache(maxsize=65536)  # a worker plans the same names for every candidate
def split_layer_name(name: str) -> tuple[str, int, str] | None:
    match = LAYER_NAME.match(name)
    if not match:
        return None
    return match["prefix"], int(match["index"]), match["suffix"]


def coerce(name: str, value: Any) -> Any:
    if name in BOOL_PARAMS:
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"parameter '{name}' must be a number, got {value!r}")
    return float(value)


def evaluate_setting(name: str, setting: Any, tensor_name: str, t: float) -> Any:
    """Value of one parameter setting for a tensor at gradient position t (None = no match)."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if not isinstance(setting, list):
        return coerce(name, setting)
    if not setting:
        return None
    if all(not isinstance(item, ConditionalParameter) for item in setting):
        return interpolate_gradient(name, setting, t)
    for condition in setting:
        if condition.filter in (None, "*") or (tensor_name and condition.filter in tensor_name):
            return evaluate_setting(name, condition.value, tensor_name, t)
    return None


def interpolate_gradient(name: str, values: list, t: float) -> Any:
    values = [coerce(name, v) for v in values]
    if any(isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    fraction = scaled - low
    return coerce(name, (1 - fraction) * values[low] + fraction * values[high])


def resolve(name: str, scopes: Iterable[dict | None], tensor_name: str, t: float, default: Any) -> Any:
    for scope in scopes:
        if scope is not None and name in scope:
            value = evaluate_setting(name, scope[name], tensor_name, t)
            if value is not None:
                return value
    if default is None:
        raise MissingParameter(name, tensor_name)
    return coerce(name, default)


class MissingParameter(ValueError):
    def __init__(self, name: str, tensor_name: str):
        super().__init__(f"parameter '{name}' is not set for tensor {tensor_name}")
        self.name = name
        self.tensor_name = tensor_name


def normalized_slices(config: MergeConfig, layer_counts: dict[str, int]) -> list[OutputSlice]:
    """The `models:` form as one slice over all layers, with the base added last if unlisted."""
    if config.slices:
        return list(config.slices)
    sources = [
        SourceSlice(model=m.model, layer_range=(0, layer_counts[m.model]), parameters=m.parameters)
        for m in config.models or []
    ]
    if config.base_model and config.base_model not in {s.model for s in sources}:
        sources.append(SourceSlice(model=config.base_model, layer_range=(0, layer_counts[config.base_model])))
    return [OutputSlice(sources=sources)]


class Planner:
    """Builds a MergePlan; `tensor_names[model]` lists each model's tensor names in file order."""

    def __init__(self, config: MergeConfig, tensor_names: dict[str, list[str]], layer_counts: dict[str, int]):
        self.config = config
        self.method = METHODS[config.merge_method]
        self.tensor_names = tensor_names
        self.name_sets = {model: set(names) for model, names in tensor_names.items()}
        self.slices = normalized_slices(config, layer_counts)

    def build(self) -> MergePlan:
        first, last = self.slices[0], self.slices[-1]
        template = first.sources[0].model
        non_layer = [n for n in self.tensor_names[template] if split_layer_name(n) is None]
        pre = [n for n in non_layer if "embed" in n]
        post = [n for n in non_layer if "embed" not in n]
        plans = [self._plan(n, [(s.model, n) for s in first.sources], first, 0.0) for n in pre]
        out_layer = 0
        for output_slice in self.slices:
            plans.extend(self._slice_plans(output_slice, out_layer))
            out_layer += output_slice.sources[0].layer_range[1] - output_slice.sources[0].layer_range[0]
        plans.extend(self._plan(n, [(s.model, n) for s in last.sources], last, 0.0) for n in post)
        return MergePlan(self.method, tuple(p for p in plans if p is not None), out_layer)

    def _slice_plans(self, output_slice: OutputSlice, out_layer_start: int) -> list:
        sources = output_slice.sources
        length = sources[0].layer_range[1] - sources[0].layer_range[0]
        layer_suffixes = self._layer_suffixes(sources[0].model, sources[0].layer_range[0])
        plans = []
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            for prefix, suffix in layer_suffixes:
                inputs = [(s.model, f"{prefix}{s.layer_range[0] + offset}{suffix}") for s in sources]
                output = f"{prefix}{out_layer_start + offset}{suffix}"
                plans.append(self._plan(output, inputs, output_slice, t))
        return plans

    def _layer_suffixes(self, model: str, layer: int) -> list[tuple[str, str]]:
        found = []
        for name in self.tensor_names[model]:
            parts = split_layer_name(name)
            if parts and parts[1] == layer:
                found.append((parts[0], parts[2]))
        return found

    def _plan(
        self, output: str, inputs: list[tuple[str, str]], output_slice: OutputSlice, t: float
    ) -> TensorPlan | None:
        present = [name in self.name_sets[model] for model, name in inputs]
        if not any(present):
            return None  # e.g. lm_head.weight of models with tied embeddings
        base_model = output_slice.base_model or self.config.base_model
        models = [model for model, _ in inputs]
        base_index = models.index(base_model) if base_model in models else None
        shared_scopes = (output_slice.parameters, self.config.parameters)
        shared = {
            name: resolve(name, shared_scopes, output, t, default)
            for name, default in self.method.shared_params.items()
        }
        per_input = []
        for index, (model, input_name) in enumerate(inputs):
            scopes = [s.parameters for s in output_slice.sources if s.model == model] + list(shared_scopes)
            # A base with a role (the origin of the deltas) has no per-input parameters.
            skip_base = index == base_index and self.method.base_has_role
            per_input.append(
                {}
                if skip_base
                else {
                    name: self._resolve_input(name, scopes, input_name, t, default)
                    for name, default in self.method.input_params.items()
                }
            )
        return TensorPlan(output, tuple(inputs), base_index, shared, tuple(per_input))

    def _resolve_input(self, name: str, scopes: list, input_name: str, t: float, default: Any) -> Any:
        try:
            return resolve(name, scopes, input_name, t, default)
        except MissingParameter:
            if name in self.method.optional_params:
                return None
            raise
