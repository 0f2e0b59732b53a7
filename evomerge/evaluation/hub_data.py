"""The Hugging Face hub datasets lm-eval tasks read: which ones, fetching and pinning them, and what to
say when one is out of reach.

A task reads a hub dataset when its `dataset_path` is a hub repository (`allenai/ai2_arc`), not a
loader (`json`, `parquet`) nor a local folder, and it names no local `data_files`. `datasets`
downloads it into its caches the first time a task is built with internet access (validate does,
on the driver); search workers build offline from those caches. A node without internet whose
cache lacks a dataset gets one line naming the task, the dataset and the command that fetches it.

`evomerge prefetch` calls `fetch_datasets` on a machine with internet and writes what it returns
into the spec's lock; `locked_dataset_revisions` reads the lock back into the `dataset_revisions`
an `EvalSet` pins its datasets with.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError

if TYPE_CHECKING:
    from evomerge.evaluation.config import EvalSet

PREFETCH_COMMAND = "evomerge prefetch SPEC"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
SPLIT_KEYS = ("test_split", "validation_split", "training_split", "fewshot_split")
# What a missing cache entry or an unreachable hub looks like from `datasets` and `huggingface_hub`.
HUB_CLIENT_MODULES = ("datasets", "huggingface_hub", "requests", "httpx", "httpcore", "urllib3", "fsspec")
COMMIT_LENGTH = 40
DATASET_PREFIX = "dataset:"
REVISION_SCHEME = "revision"
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
    status = _status(error)
    if ref is None or (status is None and not _from_hub_clients(error)):
        return None  # a template or config error of a hub task: the rehearsal names it
    text = " ".join(_messages(error)).lower()
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


def _from_hub_clients(error: BaseException | None) -> bool:
    """Whether an error of the chain was raised by the download stack, or is a network or missing-file error."""
    while error is not None:
        module = type(error).__module__.partition(".")[0]
        if module in HUB_CLIENT_MODULES or isinstance(error, ConnectionError | FileNotFoundError | TimeoutError):
            return True
        error = error.__cause__ or error.__context__
    return False


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


def locked_dataset_revisions(lock: dict | None) -> dict[str, str]:
    """Dataset key -> commit, from a lock's `datasets:` list (what `fetch_datasets` returned)."""
    revisions = {}
    for entry in (lock or {}).get("datasets") or []:
        if isinstance(entry, dict) and entry.get("path") and entry.get("revision"):
            revisions[dataset_key(str(entry["path"]), entry.get("name"))] = str(entry["revision"])
    return revisions


def eval_datasets(eval_sets: Iterable[EvalSet]) -> list[DatasetRef]:
    """Every hub dataset config the tasks of these eval sets read, once each (no download, no network)."""
    from evomerge.evaluation.tasks import resolve_tasks

    found: dict[str, DatasetRef] = {}
    for eval_set in eval_sets:
        for leaf in resolve_tasks(eval_set).leaves:
            ref = leaf.hub_dataset
            if ref is None:
                continue
            known = found.get(ref.key)
            found[ref.key] = ref if known is None else _merged(known, ref)
    return list(found.values())


def fetch_datasets(eval_sets: Iterable[EvalSet], revisions: Mapping[str, str] | None = None) -> list[dict]:
    """Download every hub dataset the eval sets read into the datasets cache, as a worker's build reads it.

    `revisions` (a lock's, by dataset key) pins what is fetched. Returns one lock entry per dataset:
    {path, name, revision (the commit fetched), size (bytes in the caches)}.
    """
    from evomerge.evaluation.tasks import build_configs, leaf_configs, resolve_tasks

    entries: dict[str, dict] = {}
    for eval_set in eval_sets:
        pins = {**(eval_set.dataset_revisions or {}), **(revisions or {})}
        pinned = eval_set.model_copy(update={"dataset_revisions": pins or None})
        resolved = resolve_tasks(pinned)
        configs = leaf_configs(resolved)
        for position, task in enumerate(resolved.tasks):
            for leaf in task.leaves:
                ref = leaf.hub_dataset
                if ref is None or ref.key in entries:
                    continue
                try:
                    build_configs({leaf.name: configs[leaf.name]})
                except Exception as error:  # noqa: BLE001 - every download failure becomes one line
                    field = pinned.task_field(position)
                    raise dataset_error(error, ref, f"'{leaf.name}'", field) or UserError(
                        f"{field}: task '{leaf.name}' cannot be built from hub dataset {ref.describe()} "
                        f"({type(error).__name__}: {_first_line(error)}); fix its YAML or the dataset"
                    ) from None
                entries[ref.key] = _lock_entry(ref)
    return list(entries.values())


def dataset_fingerprints(eval_set: EvalSet) -> dict[str, str]:
    """ "dataset:KEY" -> "revision:COMMIT" for every hub dataset the eval set reads that the hub cache holds.

    Read from the cache alone (no network): the commit a revision names there, so a run whose
    datasets were fetched again at another commit is told its data changed.
    """
    from evomerge.evaluation.tasks import resolve_tasks

    fingerprints = {}
    for leaf in resolve_tasks(eval_set).leaves:
        ref = leaf.hub_dataset
        commit = cached_commit(ref.path, ref.revision) if ref is not None else None
        if ref is not None and commit is not None:
            fingerprints[f"{DATASET_PREFIX}{ref.key}"] = f"{REVISION_SCHEME}:{commit}"
    return fingerprints


def cached_commit(path: str, revision: str | None) -> str | None:
    """The commit the hub cache holds for dataset repo `path` at `revision` (default branch: main), or None."""
    from huggingface_hub import constants

    if revision is not None and len(revision) == COMMIT_LENGTH and all(c in "0123456789abcdef" for c in revision):
        return revision
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}" / "refs" / (revision or "main")
    try:
        return ref.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _lock_entry(ref: DatasetRef) -> dict:
    import datasets

    builder = datasets.load_dataset_builder(ref.path, ref.name, revision=ref.revision)
    size = sum(file.stat().st_size for file in Path(builder.cache_dir).rglob("*") if file.is_file())
    size += int(builder.info.download_size or 0)
    return {"path": ref.path, "name": ref.name, "revision": builder.hash, "size": size}


def _merged(first: DatasetRef, second: DatasetRef) -> DatasetRef:
    splits = tuple(dict.fromkeys((*first.splits, *second.splits)))
    return replace(first, splits=splits, tasks=(*first.tasks, *second.tasks))


def revisions_from_fingerprints(fingerprints: Mapping[str, str]) -> dict[str, str]:
    """Dataset key -> commit, from input fingerprints (the `dataset_fingerprints` entries a run journaled)."""
    revisions = {}
    for name, digest in fingerprints.items():
        scheme, _, commit = str(digest).partition(":")
        if name.startswith(DATASET_PREFIX) and scheme == REVISION_SCHEME and commit:
            revisions[name.removeprefix(DATASET_PREFIX)] = commit
    return revisions


def pin_datasets(eval_sets: Mapping[str, EvalSet], revisions: Mapping[str, str] | None) -> dict[str, EvalSet]:
    """The eval sets with hub datasets pinned to `revisions` where they pin none yet (a lock's pins win)."""
    if not revisions:
        return dict(eval_sets)
    return {
        name: eval_set.model_copy(update={"dataset_revisions": {**revisions, **(eval_set.dataset_revisions or {})}})
        for name, eval_set in eval_sets.items()
    }
