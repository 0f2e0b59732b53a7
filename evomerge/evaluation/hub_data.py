"""The Hugging Face hub datasets lm-eval tasks read: which ones, and what to say when one is out of reach.

A task reads a hub dataset when its `dataset_path` is a hub repository (`allenai/ai2_arc`), not a
loader (`json`, `parquet`) nor a local folder, and it names no local `data_files`. `datasets`
downloads it into its caches the first time a task is built with internet access (validate does,
on the driver); search workers build offline from those caches. A node without internet whose
cache lacks a dataset gets one line naming the task, the dataset and the command that fetches it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import UserError

PREFETCH_COMMAND = "evomerge prefetch SPEC"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")
# What a missing cache entry or an unreachable hub looks like from `datasets` and `huggingface_hub`.
UNREACHABLE_HINTS = ("offline", "couldn't reach", "connection", "couldn't find", "cannot find", "not cached")


def dataset_key(path: str, name: str | None) -> str:
    """How a lock and `EvalSet.dataset_revisions` name a dataset config: "path" or "path:name"."""
    return f"{path}:{name}" if name else path


@dataclass(frozen=True)
class DatasetRef:
    """A hub dataset config some tasks read, and the splits they read from it."""

    path: str
    name: str | None
    revision: str | None  # the revision the task YAML or a lock pins, else None (the default branch)
    splits: tuple[str, ...]
    tasks: tuple[str, ...]  # the leaf tasks that read it

    @property
    def key(self) -> str:
        return dataset_key(self.path, self.name)

    def describe(self) -> str:
        return f"'{self.path}'" + (f" (config '{self.name}')" if self.name else "")


def hub_dataset(config: dict[str, Any], overrides: dict[str, Any], task: str) -> DatasetRef | None:
    """The hub dataset a leaf task reads, given its config and evomerge's overrides; None when its data is local."""
    merged = config | overrides
    path = merged.get("dataset_path")
    dataset_kwargs = merged.get("dataset_kwargs") or {}
    if not isinstance(path, str) or dataset_kwargs.get("data_files") or dataset_kwargs.get("data_dir"):
        return None
    if _packaged_loader(path) or Path(path).expanduser().exists() or path.startswith(("/", "./", "../")):
        return None
    splits = tuple(dict.fromkeys(str(merged[key]) for key in SPLIT_KEYS if merged.get(key)))
    name = merged.get("dataset_name")
    revision = dataset_kwargs.get("revision")
    return DatasetRef(path, None if name is None else str(name), revision, splits, (task,))


def offline() -> bool:
    """Whether this process may not contact the hub (either variable set to a true value)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_VARIABLES)


def dataset_error(error: BaseException, ref: DatasetRef | None, named: str, field: str) -> UserError | None:
    """One line for a hub dataset that could not be loaded (offline and not cached, missing, gated); else None."""
    if ref is None:
        return None
    text = " ".join(_messages(error)).lower()
    status = _status(error)
    where = f"{field}: task {named} reads hub dataset {ref.describe()}"
    if offline() and (status is None or any(hint in text for hint in UNREACHABLE_HINTS)):
        return UserError(
            f"{where}, which is not in the datasets cache, and this node is offline ({' / '.join(OFFLINE_VARIABLES)}); "
            f"run `{PREFETCH_COMMAND}` on a machine with internet access, with the same HF_HOME, then retry"
        )
    if status in (401, 403) or "gated" in text:
        return UserError(
            f"{where}, which is gated or private ({status or 'no access'}); accept its terms on the hub and set HF_TOKEN"
        )
    if status == 404 or "doesn't exist" in text or "not found" in text:
        return UserError(f"{where}, which the hub does not have (404); fix dataset_path or dataset_name in its YAML")
    if any(hint in text for hint in UNREACHABLE_HINTS) or status is not None:
        return UserError(
            f"{where}, which could not be downloaded ({_first_line(error)}); check the network or HF_ENDPOINT, "
            f"or run `{PREFETCH_COMMAND}` on a machine with internet access"
        )
    return None


def _packaged_loader(path: str) -> bool:
    """Whether `path` names one of datasets' own loaders (json, csv, parquet, ...)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return path in _PACKAGED_DATASETS_MODULES


def _messages(error: BaseException | None) -> list[str]:
    found: list[str] = []
    while error is not None and len(found) < 8:
        found.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return found


def _status(error: BaseException | None) -> int | None:
    """The HTTP status of the first error in the chain that carries a response."""
    while error is not None:
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
        error = error.__cause__ or error.__context__
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0]
