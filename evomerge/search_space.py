"""The spec's `search:` section: which space the optimizer walks.

`params` (the default) evolves the merge method's parameters per layer group (`genome.py`); a spec
without the section, or with only its defaults, keeps its fingerprint. `layers` searches the data
flow: the merged model is a path of up to `max_steps` layers drawn from the base's and the
experts' layers, written as a mergekit `passthrough` merge of `slices` (`layer_genome.py`).
`params_then_layers` is Sakana's PS then DFS in one run: a `params` search spends `params_share` of
`budget.max_evals`, then a `layers` search over the base, the experts and the first phase's winner
(named `ps_winner` in merge configs) spends the rest (`search/phases.py`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from evomerge.evaluation.config import Strict

MAX_STEPS_LIMIT = 4096
# A layer path's default length, in multiples of the base's depth: room to repeat half the stack.
DEFAULT_DEPTH_FACTOR = 1.5
SCALE_BOUNDS = (0.5, 1.5)  # what a step's scale gene spans; 1.0, the layer as it is, mid-box
DEFAULT_PARAMS_SHARE = 0.5
PS_WINNER = "ps_winner"  # how phase-2 merge configs (and the multi-document export) name the first phase's winner
PHASES = ("params", "layers")  # the phases of a params_then_layers run, in order


class SearchSpaceSpec(Strict):
    space: Literal["params", "layers", "params_then_layers"] = Field(
        "params",
        description="params: the merge method's parameters per layer group; layers: a path through the models' layers (passthrough slices); params_then_layers: params, then layers over the models and the params winner.",
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS_LIMIT,
        strict=True,
        description=f"layers: the candidate slots of the path (the base's layers repeated); default {DEFAULT_DEPTH_FACTOR}x the base's depth, at least its depth, at most {MAX_STEPS_LIMIT}.",
    )
    scales: bool = Field(
        False,
        description=f"layers: one more gene per slot scaling what the step writes to the residual stream (its o_proj and down_proj), in {list(SCALE_BOUNDS)}.",
    )

    block: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS_LIMIT,
        strict=True,
        description="layers: consecutive layers one set of genes takes together (take or skip, whose, the scale); default 1. The base's depth and max_steps must be multiples of it.",
    )
    params_share: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=f"params_then_layers: the share of budget.max_evals the parameter phase gets (baselines included); default {DEFAULT_PARAMS_SHARE}.",
    )

    @model_validator(mode="after")
    def _layer_settings_need_layers(self):
        if self.space == "params":
            for name in ("max_steps", "scales", "block"):
                if name in self.model_fields_set and getattr(self, name) not in (None, False):
                    raise ValueError(f"search.{name} applies to space: layers only; remove it or set space: layers")
        if self.space != "params_then_layers" and self.params_share is not None:
            raise ValueError(
                "search.params_share applies to space: params_then_layers only; remove it or set space: params_then_layers"
            )
        return self

    @model_serializer(mode="wrap")
    def _without_unset_fields(self, handler: SerializerFunctionWrapHandler) -> dict:
        """A spec that does not use `params_share` or `block` dumps (and fingerprints) as before they existed."""
        data = handler(self)
        for name in ("params_share", "block"):
            if data.get(name) is None:
                data.pop(name, None)
        return data

    @property
    def layers(self) -> bool:
        """Whether the whole run searches layer paths (a params_then_layers run starts in params)."""
        return self.space == "layers"

    @property
    def phased(self) -> bool:
        return self.space == "params_then_layers"

    def layer_space(self) -> SearchSpaceSpec:
        """The second phase's space: `layers` with this spec's slots and scales."""
        return SearchSpaceSpec(space="layers", max_steps=self.max_steps, scales=self.scales, block=self.block)

    def params_evals(self, max_evals: int) -> int:
        """The evaluations (baselines included) the parameter phase of a params_then_layers run gets."""
        share = DEFAULT_PARAMS_SHARE if self.params_share is None else self.params_share
        return round(share * max_evals)

    @property
    def layers_per_slot(self) -> int:
        return self.block or 1

    def steps_for(self, num_layers: int) -> int:
        """The path's slots for a base of `num_layers` layers."""
        if self.max_steps is not None:
            return self.max_steps
        block = self.layers_per_slot  # the default rounded up to whole blocks
        return -(-max(num_layers, round(DEFAULT_DEPTH_FACTOR * num_layers)) // block) * block


DEFAULT_SEARCH_SPACE = SearchSpaceSpec(space="params", max_steps=None, scales=False)


def check_layer_space(spec) -> None:
    """What a layer-path search cannot do, refused in one line (a ValueError the spec reports)."""
    space = spec.search.space
    if spec.evaluation.backend.value == "vllm":
        raise ValueError(
            f"search.space: {space} changes the model's depth per candidate, which a vLLM engine cannot follow; set evaluation.backend: native"
        )
    if spec.workers.gpus_per_worker > 1:
        raise ValueError(
            f"search.space: {space} keeps each worker on one device; set workers.gpus_per_worker to 1 or below"
        )


def check_phased_space(spec) -> None:
    """What a params_then_layers run cannot do, refused in one line (a ValueError the spec reports)."""
    check_layer_space(spec)
    max_evals = spec.budget.max_evals
    if max_evals is None:
        raise ValueError(
            "search.space: params_then_layers splits budget.max_evals between its phases; set budget.max_evals"
        )
    params = spec.search.params_evals(max_evals)
    if not 1 <= params < max_evals:
        raise ValueError(
            f"search.params_share: {params} of budget.max_evals {max_evals} leaves a phase no evaluation; raise budget.max_evals or move params_share toward 0.5"
        )
    if spec.evaluation.fidelity is not None:
        raise ValueError(
            "evaluation.fidelity: a params_then_layers run scores every candidate whole; remove evaluation.fidelity"
        )
    if spec.budget.max_docs is not None:
        raise ValueError(
            "budget.max_docs: a params_then_layers run splits budget.max_evals between its phases; remove budget.max_docs"
        )
