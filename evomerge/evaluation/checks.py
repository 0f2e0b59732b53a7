"""Evaluation checks that need more than one task YAML: the scorer's support, greedy decoding, chat templates.

They run in `evomerge validate`, before a search and before `evomerge eval` loads a model: they
read task configs and tokenizer files, never a weight. Each mistake is one `UserError` line naming
the spec field and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evomerge.errors import UserError, did_you_mean
from evomerge.evaluation.backend import SCORED_OUTPUT_TYPES
from evomerge.evaluation.config import EvalTask, EvaluationSpec

GENERATE_UNTIL = "generate_until"  # lm-eval's output_type when a task YAML names none
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def scoring_overrides(
    task: EvalTask, config: dict, evaluation: EvaluationSpec, field: str, leaf: str | None = None
) -> dict[str, Any]:
    """The task config keys the spec overrides (generation_kwargs), once the task is known to be scorable.

    `config` is the task's YAML with its includes merged (lm-eval's task index entry); `leaf` names
    the task of a group or tag `task` that `config` belongs to.
    """
    named = f"'{task.name}'" if leaf in (None, task.name) else f"'{leaf}' (of '{task.name}')"
    output_type = config.get("output_type", GENERATE_UNTIL)
    if output_type not in SCORED_OUTPUT_TYPES:
        raise UserError(
            f"{field}.name: task {named} has output_type '{output_type}'"
            f"{did_you_mean(str(output_type), SCORED_OUTPUT_TYPES)}, which evaluation.backend {evaluation.backend.value} "
            f"does not score; set output_type in its YAML to one of {', '.join(SCORED_OUTPUT_TYPES)}"
        )
    if config.get("doc_to_image") or config.get("doc_to_audio"):
        raise UserError(
            f"{field}.name: task {named} is multimodal (doc_to_image or doc_to_audio), which evaluation.backend "
            f"{evaluation.backend.value} does not score; evomerge scores text-only tasks, remove it"
        )
    if task.gen_kwargs is not None and output_type != GENERATE_UNTIL:
        raise UserError(
            f"{field}.gen_kwargs: task {named} is a {output_type} task and generates nothing; remove gen_kwargs"
        )
    if output_type != GENERATE_UNTIL:
        return {}
    merged = {**(config.get("generation_kwargs") or {}), **(task.gen_kwargs or {})}
    if _samples(merged):
        raise UserError(
            f"{field}.gen_kwargs: task {named} samples (do_sample: true, or a temperature above 0); a search "
            "score must be greedy, so that the same weights always score the same: set gen_kwargs: {do_sample: false}"
        )
    return {"generation_kwargs": merged} if task.gen_kwargs is not None else {}


def check_chat_template(evaluation: EvaluationSpec, tokenizer_folder: str | Path, field: str) -> None:
    """With evaluation.apply_chat_template, the scored model's tokenizer must have a chat template."""
    if evaluation.apply_chat_template and not has_chat_template(Path(tokenizer_folder)):
        raise UserError(
            f"evaluation.apply_chat_template: the tokenizer of {field} ({tokenizer_folder}) has no chat template; "
            "set apply_chat_template: false, or give the tokenizer one (chat_template in tokenizer_config.json)"
        )


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer files in `folder` carry a chat template (read from JSON, no tokenizer built)."""
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    config_file = folder / "tokenizer_config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # the tokenizer checks report an unreadable tokenizer_config.json
    return isinstance(config, dict) and bool(config.get("chat_template"))


def _samples(generation_kwargs: dict) -> bool:
    """Whether lm-eval would sample with these kwargs (its normalize_gen_kwargs rule)."""
    do_sample = generation_kwargs.get("do_sample")
    if do_sample is not None:
        return bool(do_sample)
    try:
        return float(generation_kwargs.get("temperature") or 0.0) > 0.0
    except (TypeError, ValueError):
        return True  # a temperature that is not a number: refused rather than guessed
