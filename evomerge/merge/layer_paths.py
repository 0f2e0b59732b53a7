"""A worker's layer-path candidate (a passthrough merge of `slices`) built in memory from resident sources.

Every source model (the base and each expert) is loaded once, whole, onto the worker's device. A
candidate's merge is planned as `evomerge merge` plans it (`validate_merge_config`), then the
resident model is rewired: its decoder layers become a new list whose step j is a shallow clone of
the source layer the plan names (its own modules, so attention's `layer_idx` can say j for the KV
cache, but the very same parameter tensors: a layer taken twice costs no memory). Only a tensor the
plan scales by something other than 1 gets a new tensor, `source * scale` in the merge dtype, as
mergekit's passthrough computes it. The embeddings, final norm and head are the source modules the
plan names (tied heads follow their embeddings), and `config.num_hidden_layers` becomes the path's
length, so the scorer runs the deeper (or shallower) model as it is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.merge.config import MergeConfig
from evomerge.merge.plan import TensorPlan, split_layer_name
from evomerge.merge.validate import ValidatedMerge, validate_merge_config

UNSCALED = (None, 1.0)  # a scale that leaves the tensor's bits as they are
# What a layer search's step scale multiplies (mergekit filters match a substring of the tensor
# name): the two projections that write into the residual stream, so the scale is how much the step adds.
RESIDUAL_WRITERS = ("o_proj", "down_proj")


@dataclass(frozen=True)
class LayerCandidate:
    """A planned candidate: what `LayerPathMerger.apply` rewires the model to."""

    validated: ValidatedMerge


class LayerPathMerger:
    """Rewires one resident model into each candidate's layer path; the worker's merger for `search.space: layers`."""

    path = "layers"

    def __init__(
        self,
        model: torch.nn.Module,
        union: MergeConfig,
        device: str,
        dtype: torch.dtype,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM

        self.model = model
        self.union = validate_merge_config(union)
        self.dtype = dtype
        self.modules: dict[str, dict[str, torch.nn.Module]] = {}
        self.layer_types = list(getattr(model.config, "layer_types", None) or [])
        base = self.union.config.base_model or self.union.config.referenced_models()[0]
        for folder in self.union.folders:
            source = model
            if folder != base:
                loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
                source = loaded.to(torch.device(device))  # type: ignore[arg-type]  # transformers types .to as a decorator
            self.modules[folder] = dict(source.eval().named_modules())
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        self._fresh: list[tuple[str, torch.Tensor]] = []  # the last candidate's scaled tensors

    def prepare(self, config: MergeConfig, seed: int = 0) -> LayerCandidate:
        del seed  # a layer path draws nothing at random
        if config.merge_method != "passthrough":
            raise ValueError(f"a layer-path worker merges passthrough configs, not {config.merge_method}")
        return LayerCandidate(validate_merge_config(config, "candidate", folders=self.union.folders))

    def merge(self, config: MergeConfig, seed: int = 0) -> ValidatedMerge:
        return self.apply(self.prepare(config, seed))

    @torch.no_grad()
    def apply(self, candidate: LayerCandidate) -> ValidatedMerge:
        plans = candidate.validated.plan.tensors
        layers: dict[int, list[TensorPlan]] = {}
        self._fresh = []
        for plan in plans:
            parts = split_layer_name(plan.output)
            if parts is None:
                self._place_outer(plan)
            else:
                layers.setdefault(parts[1], []).append(plan)
        steps = [self._step(index, layers[index]) for index in sorted(layers)]
        container = _layers_path(plans)
        _set_module(self.model, container, torch.nn.ModuleList(steps))
        config: Any = self.model.config
        config.num_hidden_layers = len(steps)
        if self.layer_types:
            config.layer_types = [self.layer_types[_source_layer(layers[i][0])] for i in sorted(layers)]
        return candidate.validated

    def _place_outer(self, plan: TensorPlan) -> None:
        """An embedding, norm or head tensor: the source's module, scaled when the plan says."""
        module_path, name = plan.output.rsplit(".", 1)
        source = self.modules[plan.inputs[0][0]][module_path]
        scale = plan.per_input[0].get("scale")
        module = source if scale in UNSCALED else self._scaled(shallow_clone(source), name, scale, plan.output)
        _set_module(self.model, module_path, module)
        if self.tied and "embed" in plan.output:
            # The checkpoint has no head: it is the embeddings the path starts with.
            head = next(path for path in self.modules[plan.inputs[0][0]] if path.endswith("lm_head"))
            _set_module(self.model, head, self.modules[plan.inputs[0][0]][head])

    def _step(self, index: int, plans: list[TensorPlan]) -> torch.nn.Module:
        """Output layer `index`: a clone of its source layer sharing the source's tensors."""
        model, first = plans[0].inputs[0]
        prefix, layer, _ = _layer_parts(first)
        step = shallow_clone(self.modules[model][f"{prefix}{layer}"])
        for module in step.modules():
            if hasattr(module, "layer_idx"):
                setattr(module, "layer_idx", index)  # noqa: B010 - the attribute is the model's, not Module's
        for plan in plans:
            scale = plan.per_input[0].get("scale")
            if scale not in UNSCALED:
                suffix = _layer_parts(plan.inputs[0][1])[2].lstrip(".")
                module_path, name = suffix.rsplit(".", 1)
                self._scaled(step.get_submodule(module_path), name, scale, plan.output)
        return step

    def _scaled(self, module: torch.nn.Module, name: str, scale: float, output: str) -> torch.nn.Module:
        """Give the (cloned) module its own `name` tensor: the source's times `scale`."""
        tensor = (getattr(module, name) * scale).to(self.dtype)
        module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
        self._fresh.append((output, tensor))
        return module

    def first_non_finite(self) -> str | None:
        """The first tensor this candidate computed that holds NaN or inf (the sources were checked once)."""
        return next((name for name, tensor in self._fresh if not bool(torch.isfinite(tensor).all())), None)


def shallow_clone(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` and its submodules that holds the very same parameter and buffer tensors."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: None if child is None else shallow_clone(child) for name, child in module._modules.items()}
    return clone


def _layer_parts(name: str) -> tuple[str, int, str]:
    """(prefix, index, suffix) of a layer tensor's name; the plan put only layer tensors here."""
    parts = split_layer_name(name)
    if parts is None:
        raise ValueError(f"{name} is not a layer's tensor")
    return parts


def _source_layer(plan: TensorPlan) -> int:
    return _layer_parts(plan.inputs[0][1])[1]


def _layers_path(plans: tuple[TensorPlan, ...]) -> str:
    """The module path of the decoder layer list ('model.layers')."""
    for plan in plans:
        parts = split_layer_name(plan.output)
        if parts is not None:
            return parts[0].rstrip(".")
    raise ValueError("the candidate has no layer")


def _set_module(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
