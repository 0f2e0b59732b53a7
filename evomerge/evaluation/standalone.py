"""Score one model outside a search (`evomerge eval`), exactly as a search worker scores a candidate.

The model is a folder, or a mergekit YAML merged in memory by evomerge's engine (the tensors
`evomerge merge` would write), loaded in the spec's merge dtype and scored by an `Evaluator` on the
spec's eval set: the same seeded doc subset, the same seeds, the same backend. Everything that can
be checked without a weight is checked first (the model reference, the merge config, the tasks with
a dry run, the chat template), so a mistake is one `UserError` line before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import UserError
from evomerge.evaluation.checks import check_chat_template
from evomerge.evaluation.config import EvalSet
from evomerge.evaluation.dry_run import rehearse_eval_set
from evomerge.evaluation.evaluate import EvalResult, Evaluator
from evomerge.evaluation.tasks import resolve_tasks
from evomerge.merge.config import load_merge_config, with_local_folders
from evomerge.merge.validate import ValidatedMerge, validate_merge_config

MODEL_FIELD = "--model"


@dataclass(frozen=True)
class ModelReference:
    """What `--model` names, inspected without reading a weight."""

    path: Path
    tokenizer_folder: Path
    merge: ValidatedMerge | None  # set when the path is a mergekit YAML


def inspect_model(path: str | Path) -> ModelReference:
    """A model folder (with config.json) or a mergekit YAML (validated and planned); UserError otherwise."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{MODEL_FIELD}: {path} has no config.json; give a model folder or a mergekit YAML")
        return ModelReference(path, path, None)
    if not path.is_file():
        raise UserError(f"{MODEL_FIELD}: {path} does not exist; give a model folder or a mergekit YAML")
    validated = validate_merge_config(with_local_folders(load_merge_config(path), str(path)), str(path))
    return ModelReference(path, validated.folders[validated.donor].path, validated)


def check_before_loading(reference: ModelReference, eval_set: EvalSet) -> None:
    """Every check `evomerge validate` makes of an eval set, against this model's tokenizer."""
    rehearse_eval_set(eval_set, resolve_tasks(eval_set))
    check_chat_template(eval_set.evaluation, reference.tokenizer_folder, MODEL_FIELD)


def load_model(reference: ModelReference, device: str, dtype: str, seed: int, trust_remote_code: bool = False):
    """The model in `dtype` on `device` (a merge built in memory), in eval mode, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(reference.tokenizer_folder, trust_remote_code=trust_remote_code)
    if reference.merge is None:
        model = AutoModelForCausalLM.from_pretrained(
            reference.path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        return model.to(device).eval(), tokenizer
    from evomerge.merge.resident import ResidentSources, write_merge

    merge = reference.merge
    donor = merge.folders[merge.config.base_model or merge.config.referenced_models()[0]].path
    config = AutoConfig.from_pretrained(donor, trust_remote_code=trust_remote_code)
    config.num_hidden_layers = merge.plan.num_layers
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    write_merge(model.to(device), ResidentSources.load(merge.config, device), merge, seed)
    return model.eval(), tokenizer


def score_model(
    path: str | Path,
    eval_set: EvalSet,
    device: str,
    dtype: str,
    seed: int = 0,
    backend: str | None = None,
    trust_remote_code: bool = False,
) -> EvalResult:
    """Check, load and score; `seconds` in the result is scoring alone (loading excluded)."""
    reference = inspect_model(path)
    check_before_loading(reference, eval_set)
    model, tokenizer = load_model(reference, device, dtype, seed, trust_remote_code)
    return Evaluator(model, tokenizer, eval_set, device=device, backend=backend).evaluate()
