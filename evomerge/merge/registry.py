"""Every merge method's facts in one entry, without torch: what it takes, searches and is compared with.

`METHODS` maps a mergekit method name to its `MethodInfo`: how its tensor function is configured
(family, sparsification, sign consensus), which parameters it resolves, which it searches by
default and within which bounds, its baseline points (its default merge, the points equal to a
parent or to the base), whether the fused GPU kernel runs it, and the checks a spec must pass to
use it. The spec, the genome, preflight and the CLI ask the entry and never branch on a method's
name. What an entry holds is `method_info.MethodInfo`; the tensor functions that carry a method out
live in `methods.py`, `methods_geometric.py` and `methods_selective.py` (torch), dispatched by
family in `engine.py` (the newer families through `tensor_adapters.py`). Adding a method is one
entry here, its tensor function and its tests.

Nothing here imports torch, so loading a spec and the read-only commands stay light.
"""

from __future__ import annotations

from evomerge.merge.method_info import FusedTrim as FusedTrim
from evomerge.merge.method_info import MethodInfo as MethodInfo
from evomerge.merge.method_info import Sparsification as Sparsification
from evomerge.merge.parameters import NEARSWAP_T, RAM_EPSILON, default_of

# The baseline label of the equal-weight linear average (the linear method's default merge).
LINEAR_AVERAGE_LABEL = "linear (equal weights)"


def _task_vector_method(
    name: str,
    sparsification: Sparsification | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    *,
    standard_baseline: bool = False,
) -> MethodInfo:
    input_params: dict[str, float | None] = {"weight": None, "density": default_of("density")}
    if sparsification == "magnitude_outliers":
        input_params["gamma"] = default_of("gamma")
    if sparsification == "della_magprune":
        input_params["epsilon"] = default_of("epsilon")
    trims = sparsification is not None
    return MethodInfo(
        name=name,
        family="task_vector",
        sparsification=sparsification,
        sign_consensus=consensus,
        default_normalize=normalize,
        default_rescale=rescale,
        input_params=input_params,
        shared_params={"normalize": normalize, "rescale": rescale, "lambda": default_of("lambda"), "int8_mask": False},
        # Plain task arithmetic has nothing to trim: only its weights are searched.
        default_searched=("weight", "density") if trims else ("weight",),
        default_settings={"weight": 1.0, "density": 0.5} if trims else {"weight": 1.0},
        default_label=f"{name} (density=0.5)" if trims else f"{name} (lambda=1)",
        standard_baseline=standard_baseline,
        exact_at_density_one=sparsification in (None, "magnitude", "random"),
        expresses_average=not trims,
        fused_trim={None: FusedTrim.NONE, "magnitude": FusedTrim.MAGNITUDE, "random": FusedTrim.RANDOM}.get(
            sparsification
        ),
    )


# The geometric and element-selecting methods; a method with no searched parameter merges, but a
# search of it alone is refused (spec validation): it has nothing to evolve.
NEW_METHODS = (
    MethodInfo(
        "model_stock",
        "model_stock",
        shared_params={"filter_wise": False},
        default_label="model_stock",
        experts_at_least=2,
    ),
    MethodInfo(
        "nuslerp",
        "nuslerp",
        needs_base=False,
        base_optional=True,
        input_params={"weight": None},
        shared_params={"nuslerp_flatten": True, "nuslerp_row_wise": False},
        default_searched=("weight",),
        default_settings={"weight": 1.0},
        default_label="nuslerp (equal weights)",
        experts_exactly=2,
        weights_are_shares=True,
    ),
    MethodInfo(
        "multislerp",
        "multislerp",
        needs_base=False,
        base_optional=True,
        input_params={"weight": None},
        shared_params={"normalize_weights": True, "eps": 1e-8},
        default_searched=("weight",),
        default_settings={"weight": 1.0},
        default_label="multislerp (equal weights)",
        searched_without_base=True,
        weights_are_shares=True,
    ),
    MethodInfo(
        "karcher",
        "karcher",
        needs_base=False,
        base_ignored=True,
        shared_params={"max_iter": 10.0, "tol": 1e-5},
        default_label="karcher",
    ),
    MethodInfo(
        "sce",
        "sce",
        shared_params={"select_topk": default_of("select_topk"), "int8_mask": False},
        default_searched=("select_topk",),
        default_label="sce (select_topk=1)",
    ),
    MethodInfo(
        "nearswap",
        "nearswap",
        shared_params={"t": None},
        own_facts={"t": NEARSWAP_T},
        default_searched=("t",),
        default_shared={"t": 0.001},
        default_label="nearswap (t=0.001)",
        experts_exactly=1,
    ),
    MethodInfo(
        "arcee_fusion", "arcee_fusion", default_label="arcee_fusion", experts_exactly=1, promotes_to_float32=True
    ),
    MethodInfo(
        "ram",
        "ram",
        shared_params={"epsilon": RAM_EPSILON.default},
        own_facts={"epsilon": RAM_EPSILON},
        default_searched=("epsilon",),
        default_label="ram (epsilon=1e-05)",
    ),
    MethodInfo(
        "ramplus_tl",
        "ramplus_tl",
        shared_params={"r": default_of("r"), "alpha": default_of("alpha"), "epsilon": RAM_EPSILON.default},
        own_facts={"epsilon": RAM_EPSILON},
        default_searched=("r", "alpha"),
        default_label="ramplus_tl (r=0.1, alpha=0.2)",
        promotes_to_float32=True,
    ),
    MethodInfo(
        "passthrough",
        "passthrough",
        needs_base=False,
        base_ignored=True,
        input_params={"scale": None},
        optional_params=frozenset({"scale"}),
        default_label="passthrough",
        experts_exactly=1,
    ),
)

METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "linear",
            "linear",
            needs_base=False,
            input_params={"weight": None},
            shared_params={"normalize": True},
            default_searched=("weight",),
            default_settings={"weight": 1.0},
            default_label=LINEAR_AVERAGE_LABEL,
            standard_baseline=True,
            exact_at_density_one=True,
        ),
        MethodInfo(
            "slerp",
            "slerp",
            input_params={},
            shared_params={"t": None},
            default_searched=("t",),
            default_shared={"t": 0.5},
            default_label="slerp (t=0.5)",
            interpolation="t",
            experts_exactly=1,
        ),
        _task_vector_method("task_arithmetic", None, False, False, False, standard_baseline=True),
        _task_vector_method("ties", "magnitude", True, True, False, standard_baseline=True),
        _task_vector_method("dare_ties", "random", True, False, True, standard_baseline=True),
        _task_vector_method("dare_linear", "random", False, False, True),
        _task_vector_method("breadcrumbs", "magnitude_outliers", False, False, False),
        _task_vector_method("breadcrumbs_ties", "magnitude_outliers", True, False, False),
        _task_vector_method("della", "della_magprune", True, True, True),
        _task_vector_method("della_linear", "della_magprune", False, False, True),
        *NEW_METHODS,
    )
}

# The method a spec that names none merges with.
DEFAULT_METHOD = METHODS["ties"]
# What a plain model folder is, as a merge: one weighted source and no base.
SINGLE_MODEL = METHODS["linear"]
# A merge that reads every tensor of every model (preflight's union config).
EVERY_TENSOR = METHODS["task_arithmetic"]
# Every parameter some method resolves (anything else in a merge config is a typo).
KNOWN_PARAMETERS = frozenset(p for m in METHODS.values() for p in (*m.input_params, *m.shared_params))


def single_model_config(path: str, dtype: str) -> dict:
    """The merge config that reproduces one model folder (a parent or the base as a baseline)."""
    return {
        "merge_method": SINGLE_MODEL.name,
        "models": [{"model": path, "parameters": {"weight": 1.0}}],
        "dtype": dtype,
    }


def every_tensor_config(base: str, experts: list[str], dtype: str) -> dict:
    """A merge over every model that touches every tensor a search can use."""
    return EVERY_TENSOR.default_merge(base, experts, dtype)
