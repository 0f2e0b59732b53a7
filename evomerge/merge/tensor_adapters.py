"""Plan-to-function adapters of the geometric and element-selecting methods.

Each adapter takes one output tensor's plan and inputs (in the plan's order) and calls the pure
tensor function with the inputs and parameters in the order mergekit 0.1.5 passes them: the base
apart, the other inputs in the config's order, per-input weights of the non-base inputs only.
Karcher and passthrough give the base no role, so every input counts (a configured base the
config does not list was appended last by the planner, as mergekit appends it).
`engine.FAMILY_MERGES` maps each method family to its adapter.
"""

from __future__ import annotations

import torch

from evomerge.merge import methods_geometric as geometric
from evomerge.merge import methods_selective as selective
from evomerge.merge.plan import TensorPlan


def split_base(plan: TensorPlan, inputs: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The base input (None when the tensor has none) and the others, in the plan's order."""
    if plan.base_index is None:
        return None, list(inputs)
    return inputs[plan.base_index], [tensor for index, tensor in enumerate(inputs) if index != plan.base_index]


def required_base(plan: TensorPlan, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base, others = split_base(plan, inputs)
    if base is None:  # validate_merge_config rejects such plans for methods that need a base
        raise ValueError(f"{plan.output}: this merge method needs a base model among its inputs")
    return base, others


def non_base_weights(plan: TensorPlan) -> list[float]:
    return [params["weight"] for index, params in enumerate(plan.per_input) if index != plan.base_index]


def model_stock(plan: TensorPlan, inputs: list[torch.Tensor]) -> torch.Tensor:
    base, others = required_base(plan, inputs)
    return geometric.model_stock(base, others, filter_wise=plan.shared["filter_wise"])


def nuslerp(plan: TensorPlan, inputs: list[torch.Tensor]) -> torch.Tensor:
    base, others = split_base(plan, inputs)
    return geometric.nuslerp(
        others,
        non_base_weights(plan),
        base,
        row_wise=plan.shared["nuslerp_row_wise"],
        flatten=plan.shared["nuslerp_flatten"],
    )


def multislerp(plan: TensorPlan, inputs: list[torch.Tensor]) -> torch.Tensor:
    base, others = split_base(plan, inputs)
    return geometric.multislerp(
        others,
        non_base_weights(plan),
        base,
        normalize_weights=plan.shared["normalize_weights"],
        eps=plan.shared["eps"],
    )


def karcher(plan: TensorPlan, inputs: list[torch.Tensor]) -> torch.Tensor:
    return geometric.karcher(list(inputs), max_iter=int(plan.shared["max_iter"]), tol=plan.shared["tol"])


def sce(plan: TensorPlan, inputs: list[torch.Tensor]) -> torch.Tensor:
    base, others = required_base(plan, inputs)
    return selective.sce(base, others, select_topk=plan.shared["select_topk"], int8_mask=plan.shared["int8_mask"])


def nearswap(plan: TensorPlan, inputs: list[torch.Tensor]) -> torch.Tensor:
    base, (other,) = required_base(plan, inputs)
    return selective.nearswap(base, other, plan.shared["t"])


def arcee_fusion(plan: TensorPlan, inputs: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    base, (other,) = required_base(plan, inputs)
    return selective.arcee_fusion(base, other, generator)


def ram(plan: TensorPlan, inputs: list[torch.Tensor]) -> torch.Tensor:
    base, others = required_base(plan, inputs)
    return selective.ram(base, others, epsilon=plan.shared["epsilon"])


def ramplus_tl(plan: TensorPlan, inputs: list[torch.Tensor]) -> torch.Tensor:
    base, others = required_base(plan, inputs)
    shared = plan.shared
    return selective.ramplus_tl(base, others, r=shared["r"], alpha=shared["alpha"], epsilon=shared["epsilon"])


def passthrough(plan: TensorPlan, inputs: list[torch.Tensor]) -> torch.Tensor:
    (tensor,) = inputs
    return selective.passthrough(tensor, plan.per_input[0].get("scale"))


# Adapters that need nothing but the plan and the inputs, by family.
PLAIN_ADAPTERS = {
    "model_stock": model_stock,
    "nuslerp": nuslerp,
    "multislerp": multislerp,
    "karcher": karcher,
    "sce": sce,
    "nearswap": nearswap,
    "ram": ram,
    "ramplus_tl": ramplus_tl,
    "passthrough": passthrough,
}
