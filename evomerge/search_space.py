"""The spec's `search:` section: which space the optimizer walks.

`params` (the default) evolves the merge method's parameters per layer group (`genome.py`); a spec
without the section, or with only its defaults, keeps its fingerprint. `layers` searches the data
flow: the merged model is a path of up to `max_steps` layers drawn from the base's and the
experts' layers, written as a mergekit `passthrough` merge of `slices` (`layer_genome.py`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from evomerge.evaluation.config import Strict

MAX_STEPS_LIMIT = 4096
# A layer path's default length, in multiples of the base's depth: room to repeat half the stack.
DEFAULT_DEPTH_FACTOR = 1.5
SCALE_BOUNDS = (0.5, 1.5)  # what a step's scale gene spans; 1.0, the layer as it is, mid-box


class SearchSpaceSpec(Strict):
    space: Literal["params", "layers"] = Field(
        "params",
        description="params: the merge method's parameters per layer group; layers: a path through the models' layers (passthrough slices).",
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

    @model_validator(mode="after")
    def _layer_settings_need_layers(self):
        if self.space != "layers":
            for name in ("max_steps", "scales"):
                if name in self.model_fields_set and getattr(self, name) not in (None, False):
                    raise ValueError(f"search.{name} applies to space: layers only; remove it or set space: layers")
        return self

    @property
    def layers(self) -> bool:
        return self.space == "layers"

    def steps_for(self, num_layers: int) -> int:
        """The path's slots for a base of `num_layers` layers."""
        return (
            self.max_steps if self.max_steps is not None else max(num_layers, round(DEFAULT_DEPTH_FACTOR * num_layers))
        )


DEFAULT_SEARCH_SPACE = SearchSpaceSpec(space="params", max_steps=None, scales=False)


def check_layer_space(spec) -> None:
    """What a layer-path search cannot do, refused in one line (a ValueError the spec reports)."""
    if spec.evaluation.backend.value == "vllm":
        raise ValueError(
            "search.space: layers changes the model's depth per candidate, which a vLLM engine cannot follow; set evaluation.backend: native"
        )
    if spec.workers.gpus_per_worker > 1:
        raise ValueError(
            "search.space: layers keeps each worker on one device; set workers.gpus_per_worker to 1 or below"
        )
