"""The `evaluation:` section of spec.yaml, and the eval sets a worker scores, as frozen pydantic models.

`spec.py` embeds `EvaluationSpec`; a worker receives these same frozen models inside an `EvalSet`
(which task list, which doc limit, which spec field to name in errors), never a copy of their
fields. Pydantic checks what the values alone decide; the checks that need the disk (include
folders, task YAMLs, data files, metrics, filters) are in `evaluation.tasks`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from evomerge.errors import did_you_mean
from evomerge.evaluation.backend import BackendName

# Where task YAMLs are looked for when the spec names no `include`: relative to the spec's folder.
DEFAULT_INCLUDE = ("evals",)
BATCH_SIZE_LIMIT = 4096
FEWSHOT_LIMIT = 1000
TOKEN_BUDGET_LIMIT = 1 << 22
SEARCH_TASKS_FIELD = "evaluation.tasks"
HELDOUT_TASKS_FIELD = "evaluation.heldout_tasks"


class Strict(BaseModel):
    """Unknown keys are errors, instances are immutable, and no float field takes NaN or an infinity."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class EvalTask(Strict):
    """One lm-eval task of a weighted score."""

    name: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0, le=1e6, description="Its share of the weighted mean.")
    metric: str = Field("acc", description="'acc', or 'exact_match,strict-match' to pick a filter.")
    num_fewshot: int | None = Field(None, ge=0, le=FEWSHOT_LIMIT)
    gen_kwargs: dict[str, Any] | None = Field(
        None, description="generate_until tasks: merged over the task YAML's generation_kwargs."
    )


class ObjectiveSpec(Strict):
    name: str
    tasks: list[str] = Field(min_length=1, description="Search tasks whose weighted mean is this objective.")


class EvalSetName(str, Enum):
    """The two task lists of a spec; the value is the worker's and the journal's name for it."""

    SEARCH = "search"
    HELDOUT = "heldout"


class FidelitySpec(Strict):
    """`evaluation.fidelity`: race each searched candidate over nested seeded shares of the search docs.

    A candidate is scored on the first share of every task's seeded doc order; it gets the next
    share only while it can still beat the best fully scored candidate (its partial score plus `z`
    standard errors reaches that best). With `keep` (successive halving) it must also rank in the
    top `keep` share of recent candidates' partial scores at each rung, which bounds the share of
    documents scored. Baselines and held-out scores are always scored whole.
    """

    rungs: list[float] = Field(
        default_factory=lambda: [0.2, 1.0],
        min_length=2,
        max_length=8,
        description="Cumulative shares of each task's search docs; increasing, the last one 1.0.",
    )
    z: float = Field(2.0, gt=0, le=10, description="Standard errors of optimism before a candidate is stopped.")
    keep: float | None = Field(
        None,
        description="Successive halving: the share of candidates, ranked by partial score among the last two "
        "generations' (at least 8 / keep asks), that go on past each rung, e.g. 0.34; unset, only the incumbent "
        "test stops candidates.",
    )

    @field_validator("rungs")
    @classmethod
    def _nested_shares(cls, rungs: list[float]) -> list[float]:
        if any(not 0 < share <= 1 for share in rungs):
            raise ValueError("each rung is a share of the search docs in (0, 1], e.g. [0.2, 1.0]")
        if any(later <= earlier for earlier, later in zip(rungs, rungs[1:], strict=False)):
            raise ValueError(f"rungs must increase ({rungs}); e.g. [0.2, 1.0]")
        if rungs[-1] != 1.0:
            raise ValueError(f"the last rung must be 1.0 (every search doc), not {rungs[-1]}; e.g. [0.2, 1.0]")
        return rungs

    @field_validator("keep")
    @classmethod
    def _a_share(cls, keep: float | None) -> float | None:
        if keep is not None and not 0 < keep < 1:
            raise ValueError(
                f"keep is the share of candidates that go on past each rung, in (0, 1), not {keep}; e.g. 0.34"
            )
        return keep

    def slice_shares(self) -> list[tuple[float, float]]:
        """Each rung's slice of the seeded doc order, as (start, end) shares: disjoint, adjacent, ending at 1."""
        return list(zip([0.0, *self.rungs[:-1]], self.rungs, strict=True))


class Carve(Strict):
    """`evaluation.heldout_fraction` as one eval set sees it: which part of the carved tasks' docs it scores.

    Every doc of a carved task falls, by a seeded draw per task, into the held-out part (a
    `fraction` of them) or the search part (the rest); `limit` and fidelity slices then draw
    from the part alone, so the two sets never share a doc.
    """

    fraction: float = Field(gt=0, lt=1)
    heldout: bool  # this set scores the held-out part; else the search part
    tasks: tuple[str, ...]  # the carved entries: the spec's search tasks


class EvalSet(Strict):
    """What one worker evaluator scores: a task list of the spec with its doc limit.

    `field` is where the tasks sit in the spec, so that errors name `evaluation.heldout_tasks[1]`
    for a held-out task; `evaluation` carries the settings both lists share (include, seed,
    batch size, max length). `share` (fidelity racing) narrows it to one slice of each task's
    seeded doc order, as (start, end) shares of it. `carve` says which part of the carved tasks'
    docs it scores (a held-out set lists the carved search tasks first). `dataset_revisions` pins
    hub datasets (by "path" or "path:name") to the commits a lock recorded.
    """

    field: str
    tasks: tuple[EvalTask, ...]
    limit: int | None
    evaluation: EvaluationSpec
    share: tuple[float, float] | None = None
    carve: Carve | None = None
    dataset_revisions: dict[str, str] | None = None

    def task_field(self, position: int) -> str:
        """The spec field of the task at `position`: a carved search task keeps its place in evaluation.tasks."""
        carved = len(self.carve.tasks) if self.carve is not None and self.carve.heldout else 0
        if position < carved:
            return f"{SEARCH_TASKS_FIELD}[{position}]"
        return f"{self.field}[{position - carved}]"

    def carved(self, task: str) -> Carve | None:
        """The carve that applies to the entry `task`, or None when all its docs are this set's."""
        return self.carve if self.carve is not None and task in self.carve.tasks else None

    @property
    def fidelity(self) -> FidelitySpec | None:
        """The racing settings when this is the search set of a spec that races; held-out sets never race."""
        return self.evaluation.fidelity if self.field == SEARCH_TASKS_FIELD else None

    def slices(self) -> list[EvalSet]:
        """The disjoint slices a raced candidate is scored on, one per rung, in order."""
        fidelity = self.fidelity
        if fidelity is None:
            return [self]
        return [self.model_copy(update={"share": share}) for share in fidelity.slice_shares()]


class VllmSettings(Strict):
    """`evaluation.vllm`: the vLLM engine's share of each GPU (evaluation/vllm_memory.py)."""

    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of the GPU the engine may take (its weights, activations and KV cache), beside the "
        "worker's sources and model; default: what it needs, with a KV cache of 1 GiB or one longest request.",
    )


class EvaluationSpec(Strict):
    tasks: list[EvalTask] = Field(min_length=1)
    objectives: list[ObjectiveSpec] = Field(
        default_factory=list, description="Two or more for a multi-objective (Pareto) search."
    )
    heldout_tasks: list[EvalTask] = Field(default_factory=list, description="Disjoint split for the final report.")
    include: list[str] = Field(
        default_factory=lambda: list(DEFAULT_INCLUDE), description="Folders of task YAMLs, relative to the spec."
    )
    limit: int | None = Field(None, ge=1, description="Docs per search task: a fixed seeded subset.")
    heldout_limit: int | None = Field(None, ge=1, description="Docs per held-out task; default: the whole split.")
    heldout_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Carve held-out docs from the search tasks: this seeded share of each one's docs is held "
        "out, the search scores only the rest.",
    )
    seed: int = Field(0, ge=0)
    batch_size: int = Field(32, ge=1, le=BATCH_SIZE_LIMIT)
    max_length: int | None = Field(None, ge=8)
    top_k: int = Field(5, ge=0, description="Trials re-scored on the held-out tasks at the end.")
    backend: BackendName = Field(
        BackendName.NATIVE,
        description="native: evomerge's batched scorer; lm_eval: HFLM; vllm: one vLLM engine per worker.",
    )
    token_budget: int | None = Field(
        None,
        ge=64,
        le=TOKEN_BUDGET_LIMIT,
        description="native: tokens per batch; default 16384 (GPU) or 512 (CPU), 16384 when generating.",
    )
    apply_chat_template: bool = Field(False, description="Render prompts with the tokenizer's chat template.")
    system_instruction: str | None = Field(None, description="A system message before every prompt.")
    fewshot_as_multiturn: bool | None = Field(
        None, description="Few-shot examples as chat turns; default: on with a chat template."
    )
    fidelity: FidelitySpec | None = Field(
        None, description="Race candidates over nested doc shares; only those that can still win get every doc."
    )
    vllm: VllmSettings | None = Field(None, description="backend vllm: the engine's share of each GPU.")

    @property
    def multiturn_fewshot(self) -> bool:
        """lm-eval's fewshot_as_multiturn: on by default whenever a chat template is applied."""
        return self.apply_chat_template if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn

    @field_validator("tasks", "heldout_tasks", mode="before")
    @classmethod
    def _names_as_tasks(cls, tasks):
        return [{"name": t} if isinstance(t, str) else t for t in tasks or []]

    @field_validator("tasks", "heldout_tasks")
    @classmethod
    def _listed_once(cls, tasks: list[EvalTask]) -> list[EvalTask]:
        names = [task.name for task in tasks]
        for position, name in enumerate(names):
            if name in names[:position]:
                raise ValueError(
                    f"task '{name}' is listed twice (entries {names.index(name)} and {position}); keep one"
                )
        return tasks

    @field_validator("heldout_tasks")
    @classmethod
    def _disjoint(cls, heldout: list[EvalTask], info: ValidationInfo) -> list[EvalTask]:
        search = {task.name for task in info.data.get("tasks", [])}
        overlap = [task.name for task in heldout if task.name in search]
        if overlap:
            raise ValueError(
                f"{overlap[0]} is also a search task; held-out tasks must be a disjoint split: drop it here, "
                "or carve held-out docs from every search task with evaluation.heldout_fraction"
            )
        return heldout

    @model_validator(mode="after")
    def _objectives_use_search_tasks(self):
        names = [t.name for t in self.tasks]
        for objective in self.objectives:
            for task in objective.tasks:
                if task not in names:
                    raise ValueError(
                        f"objective '{objective.name}' uses '{task}', which is not in evaluation.tasks{did_you_mean(task, names)}"
                    )
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError(
                "fewshot_as_multiturn needs apply_chat_template: true; set both or drop fewshot_as_multiturn"
            )
        if self.fidelity is not None and self.objectives:
            raise ValueError(
                "fidelity races candidates on one weighted score; drop evaluation.fidelity or evaluation.objectives"
            )
        if len(self.objectives) == 1:
            raise ValueError("objectives: give two or more for a Pareto search, or none for a single weighted score")
        return self

    def eval_sets(self, dataset_revisions: dict[str, str] | None = None) -> dict[str, EvalSet]:
        """The search set, and the held-out set when the spec has held-out tasks or carves them.

        `dataset_revisions` pins hub datasets to locked commits ("path" or "path:name" -> commit).
        """
        fraction = self.heldout_fraction
        carved = tuple(task.name for task in self.tasks) if fraction else ()

        def carve(heldout: bool) -> Carve | None:
            return Carve(fraction=fraction, heldout=heldout, tasks=carved) if fraction else None

        pins = dict(dataset_revisions) if dataset_revisions else None
        sets = {
            EvalSetName.SEARCH.value: EvalSet(
                field=SEARCH_TASKS_FIELD,
                tasks=tuple(self.tasks),
                limit=self.limit,
                evaluation=self,
                carve=carve(False),
                dataset_revisions=pins,
            )
        }
        if self.heldout_tasks or carved:
            sets[EvalSetName.HELDOUT.value] = EvalSet(
                field=HELDOUT_TASKS_FIELD,
                tasks=(*(self.tasks if carved else ()), *self.heldout_tasks),
                limit=self.heldout_limit,
                evaluation=self,
                carve=carve(True),
                dataset_revisions=pins,
            )
        return sets


EvalSet.model_rebuild()

# Settings added after runs were first journaled, at their defaults. A run's fingerprint leaves
# them out while they hold these values, so runs started before they existed still resume.
LATER_EVALUATION_DEFAULTS = {
    "backend": BackendName.NATIVE.value,
    "token_budget": None,
    "apply_chat_template": False,
    "system_instruction": None,
    "fewshot_as_multiturn": None,
    "fidelity": None,
    "heldout_fraction": None,
    "vllm": None,
}
LATER_TASK_DEFAULTS = {"gen_kwargs": None}
LATER_FIDELITY_DEFAULTS = {"keep": None}


def without_later_defaults(evaluation: dict) -> dict:
    """A dumped `evaluation:` section minus the later settings that still hold their defaults."""

    def trimmed(section: dict, defaults: dict) -> dict:
        return {key: value for key, value in section.items() if key not in defaults or value != defaults[key]}

    result = trimmed(evaluation, LATER_EVALUATION_DEFAULTS)
    if result.get("fidelity"):
        result["fidelity"] = trimmed(result["fidelity"], LATER_FIDELITY_DEFAULTS)
    for key in ("tasks", "heldout_tasks"):
        result[key] = [trimmed(task, LATER_TASK_DEFAULTS) for task in evaluation.get(key, [])]
    return result
