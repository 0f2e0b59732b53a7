"""Model names: a local folder, or a Hugging Face hub ID (`org/name`, `org/name@branch|tag|commit`).

`resolve_models` maps every name a spec or merge config writes to a local folder once, before any
worker starts: an existing local folder wins; otherwise the hub ID is resolved with
`huggingface_hub` (so HF_HOME, HF_TOKEN, HF_HUB_OFFLINE and HF_ENDPOINT mean what they always mean)
and only the config, generation config, tokenizer and safetensors files are downloaded into the
hub's cache. A `pins` mapping (a run's journaled commits, or a lock written by `evomerge prefetch`)
resolves a name at that exact commit, which works offline from the cache.

Everything the hub can refuse is one `UserError` line naming each model at fault and the fix: a
gated or private repo, a missing repo or revision, nothing cached while offline, weights only in
`pytorch_model.bin` (never unpickled), a config that needs remote code (never run). Names keep the
user's spelling everywhere (spec, merge configs, journal); only readers of files use `folder`.
`huggingface_hub` is imported lazily: loading a spec stays light.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import UserError

LOG = logging.getLogger(__name__)
# mergekit's spelling: owner/name, optionally @revision (a branch, tag or commit).
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+)(?:@(?P<revision>[^\s@]+))?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
LOGIN = "log in with 'hf auth login' or set HF_TOKEN"
LOCAL_FOLDER_FIX = "give a local folder with config.json and *.safetensors, or a hub ID (org/name)"


@dataclass(frozen=True)
class ModelSource:
    """Where one model name's files are: a local folder, or a hub repo at a commit (in the cache)."""

    name: str  # as the spec or merge config writes it: the key everywhere
    folder: str  # the folder holding config.json, tokenizer and safetensors
    repo_id: str | None = None  # None: a local folder
    revision: str | None = None  # the revision asked for (None: the default branch)
    commit: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def exported(self) -> str:
        """The name another machine resolves to the same files: `org/name@commit` for a hub model."""
        return pinned_name(self.repo_id, self.commit) if self.repo_id and self.commit else self.name

    def pin(self) -> dict:
        return {"repo": self.repo_id, "revision": self.revision, "commit": self.commit}


class ModelSources(Mapping[str, ModelSource]):
    """Every model of a spec or merge config, by the name it is written with."""

    def __init__(self, sources: Mapping[str, ModelSource]):
        self._sources = dict(sources)

    def __getitem__(self, name: str) -> ModelSource:
        return self._sources[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def source(self, name: str) -> ModelSource:
        """The source of `name`; a name resolved nowhere (a tokenizer_source path) is its own folder."""
        return self._sources.get(name) or ModelSource(name, name)

    def folder(self, name: str) -> str:
        return self.source(name).folder

    def folders(self) -> dict[str, str]:
        return {name: source.folder for name, source in self._sources.items()}

    def pins(self) -> dict[str, dict]:
        """name -> {repo, revision, commit} of every hub model: what a run journals and a lock holds."""
        return {name: source.pin() for name, source in self._sources.items() if source.is_hub}

    def exported(self) -> dict[str, str]:
        return {name: source.exported for name, source in self._sources.items()}


def pinned_name(repo_id: str, commit: str) -> str:
    """How an exported config names a hub model: mergekit reads `org/name@commit` as that commit."""
    return f"{repo_id}@{commit}"


def split_hub_id(name: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) when `name` is spelled as a hub ID, else None."""
    match = HUB_ID.match(name) if isinstance(name, str) else None
    return (match["repo"], match["revision"]) if match else None


def model_name(name, relative_to: Path):
    """What a spec keeps for a model: an existing folder (relative to the spec) as an absolute path;
    a hub ID as written; anything else as an absolute path, so a missing folder is named as one."""
    if not isinstance(name, str):
        return name
    local = (relative_to / Path(name).expanduser()).resolve()
    return name if split_hub_id(name) and not local.is_dir() else str(local)


def resolve_models(
    fields: Mapping[str, str], source: str = "spec", pins: Mapping[str, str] | None = None, fetch_hint: str = ""
) -> ModelSources:
    """name -> ModelSource for every name of `fields` (name -> the field that writes it).

    A name in `pins` is resolved at that commit. Every model at fault is named in one UserError;
    `fetch_hint` is the command that fills the cache for an offline machine.
    """
    resolved, problems = {}, []
    for name, field in fields.items():
        try:
            resolved[name] = resolve_model(name, (pins or {}).get(name), fetch_hint)
        except _Problem as problem:
            problems.append((field, name, problem))
    if problems:
        raise UserError(_one_line(problems, source))
    return ModelSources(resolved)


def resolve_model(name: str, pin: str | None = None, fetch_hint: str = "") -> ModelSource:
    """One name: a local folder as it is, a hub ID fetched (or found in the cache) at `pin` or its revision."""
    hub_id = split_hub_id(name)
    if hub_id is None and not Path(name).expanduser().exists():
        raise _Problem("model folder does not exist", LOCAL_FOLDER_FIX)
    if hub_id is None or Path(name).expanduser().is_dir():
        return ModelSource(name, name)
    repo_id, revision = hub_id
    from huggingface_hub import constants

    offline = constants.is_offline_mode()
    commit = pin or (revision if revision and COMMIT.match(revision) else None)
    # A commit already complete in the cache needs no request: the hub never changes a commit.
    folder = _complete_in_cache(repo_id, commit) if commit else None
    if folder is None:
        folder, commit = _fetch(repo_id, revision, pin, offline, fetch_hint)
    elif pin and not offline:
        _say_if_moved_on(repo_id, revision, pin)
    _check_snapshot(Path(folder))
    return ModelSource(name, folder, repo_id, revision, commit)


class _Problem(Exception):
    """Why one model cannot be used: what is wrong, and the fix (shared fixes are said once)."""

    def __init__(self, what: str, fix: str):
        super().__init__(what)
        self.what, self.fix = what, fix


def _one_line(problems: list[tuple[str, str, _Problem]], source: str) -> str:
    groups: dict[tuple[str, str], list[str]] = {}
    for field, name, problem in problems:
        groups.setdefault((problem.what, problem.fix), []).append(f"{field} '{name}'")
    return f"{source}: " + "; ".join(f"{', '.join(who)}: {what}; {fix}" for (what, fix), who in groups.items())


def _fetch(repo_id: str, revision: str | None, pin: str | None, offline: bool, fetch_hint: str) -> tuple[str, str]:
    """(snapshot folder, commit): asks the hub unless offline, then downloads what is missing."""
    from huggingface_hub import HfApi, snapshot_download

    if not offline:
        try:
            info = HfApi().model_info(repo_id, revision=pin or revision)
            allow = wanted_files([sibling.rfilename for sibling in info.siblings or []])
            _progress_bars_only_on_a_terminal()
            # By name, not by info.sha, so the cache maps the branch or tag to its commit for offline use.
            # A gated repo shows its files to anyone; the download is what is refused.
            folder = snapshot_download(repo_id, revision=pin or revision, allow_patterns=allow)
        except _Problem:
            raise
        except Exception as error:  # noqa: BLE001 - every hub refusal becomes a one-line problem
            _raise_refusal(error, repo_id, pin or revision)
            LOG.debug("hub unreachable for %s (%s); trying the cache", repo_id, error)
        else:
            return folder, Path(folder).name
    return _cached(repo_id, pin or revision, offline, fetch_hint)


def _progress_bars_only_on_a_terminal() -> None:
    """Download bars help at a terminal; in a log (SLURM, a pipe) they are noise around the one-line errors."""
    import sys

    from huggingface_hub.utils import disable_progress_bars

    if not sys.stderr.isatty():
        disable_progress_bars()


def _cached(repo_id: str, revision: str | None, offline: bool, fetch_hint: str) -> tuple[str, str]:
    """The cached snapshot of `revision` (no request); its completeness is checked afterwards."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=["config.json"], local_files_only=True)
    except Exception:  # noqa: BLE001 - nothing usable in the cache, whatever the library's reason
        from huggingface_hub import constants

        at = f" at {revision}" if revision else ""
        fetch = f"run '{fetch_hint or 'hf download REPO'}' on a machine with internet (same HF_HOME)"
        if offline:
            raise _Problem(
                f"not in the Hugging Face cache{at} and HF_HUB_OFFLINE is set", f"{fetch}, or unset HF_HUB_OFFLINE"
            ) from None
        raise _Problem(
            f"not in the Hugging Face cache{at} and the hub at {constants.ENDPOINT} cannot be reached",
            f"check the network and HF_ENDPOINT, or {fetch}",
        ) from None
    return folder, Path(folder).name


def _raise_refusal(error: Exception, repo_id: str, revision: str | None) -> None:
    """A _Problem for the hub's answers that name the model's fault; returns for a network failure."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{constants.ENDPOINT}/{repo_id}"
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(error, RevisionNotFoundError):
        raise _Problem(
            f"the hub has no revision '{revision}' (branch, tag or commit) of {repo_id}",
            f"check it on {page}/tree/main, or drop '@{revision}' for the default branch",
        )
    if isinstance(error, GatedRepoError):
        raise _Problem(f"is gated ({status})", f"accept its licence on {page}, then {LOGIN} with that account")
    if isinstance(error, RepositoryNotFoundError) and status == 401:
        raise _Problem(
            "is not on the hub, or is private or gated and needs a login (401), nor a local folder",
            f"check the spelling; if it is private or gated, {LOGIN} (and accept its licence on its page)",
        )
    if isinstance(error, RepositoryNotFoundError):
        raise _Problem("is not on the hub (404), nor a local folder", "check the spelling")
    if isinstance(error, DisabledRepoError):
        raise _Problem("was disabled by its owner on the hub", "choose another model")
    if isinstance(error, HfHubHTTPError) and status == 403:
        raise _Problem(
            "refused: your token may not read it (403)", f"accept its licence on {page}, or {LOGIN} with access"
        )
    if isinstance(error, HfHubHTTPError) and status is not None and status < 500:
        raise _Problem(f"the hub refused it ({status})", "check the name and your HF_TOKEN")


def _say_if_moved_on(repo_id: str, revision: str | None, pin: str) -> None:
    """One line when the revision asked for now points past the pinned commit; never fails."""
    from huggingface_hub import HfApi

    try:
        now = HfApi().model_info(repo_id, revision=revision).sha
    except Exception:  # noqa: BLE001 - a courtesy check: no answer, no line
        return
    if now and now != pin:
        LOG.warning(
            "%s: the hub's %s has moved on to %s since it was pinned; using the pinned commit %s",
            repo_id,
            revision or "default branch",
            now[:12],
            pin[:12],
        )


def wanted_files(files: list[str]) -> list[str]:
    """The top-level files evomerge reads: configs, tokenizer, and the transformers safetensors set.

    A repo with `model.safetensors[.index.json]` may also hold another format's safetensors (Mistral's
    `consolidated.safetensors`); only transformers' own set is taken. `.bin` weights are never fetched.
    """
    top = [f for f in files if "/" not in f]
    safetensors = [f for f in top if f.endswith(".safetensors")]
    standard = [f for f in safetensors if f == "model.safetensors" or re.match(r"model-\d+-of-\d+\.safetensors$", f)]
    weights = standard or safetensors
    if not weights:
        pickled = [f for f in top if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickled:
            raise _Problem(
                f"holds only pickled weights ({pickled[0]}), which evomerge never unpickles",
                "convert them to safetensors (save_pretrained(safe_serialization=True)) or pick a revision with safetensors (@refs/pr/N)",
            )
        raise _Problem("holds no .safetensors weights", "pick a repo or revision with model.safetensors")
    indexes = [f for f in top if f.endswith(".safetensors.index.json") and (not standard or f.startswith("model."))]
    return [f for f in top if f in MODEL_FILES] + weights + indexes


def _complete_in_cache(repo_id: str, commit: str) -> str | None:
    """The cached snapshot of `commit` when every file evomerge reads is there, else None (no request)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=commit, allow_patterns=["config.json"], local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, whatever the library's reason
        return None
    return folder if _weights_complete(Path(folder)) else None


def _weights_complete(folder: Path) -> bool:
    index = next(iter(sorted(folder.glob("*.safetensors.index.json"))), None)
    shards = set(json.loads(index.read_text()).get("weight_map", {}).values()) if index else set()
    return any(folder.glob("*.safetensors")) and all((folder / shard).is_file() for shard in shards)


def _check_snapshot(folder: Path) -> None:
    """The snapshot is complete and loadable without remote code."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise _Problem("has no config.json", "pick a Hugging Face transformers model repo")
    if not _weights_complete(folder):
        raise _Problem(
            "is only partly in the cache (weights missing)",
            "fetch it again on a machine with internet (evomerge prefetch)",
        )
    config = json.loads(config_file.read_text())
    if config.get("auto_map"):
        raise _Problem(
            "needs remote code (auto_map in config.json), and evomerge never runs remote code",
            "pick a model whose architecture transformers ships",
        )
    model_type = config.get("model_type")
    if model_type is not None and not _known_model_type(model_type):
        raise _Problem(
            f"has model_type '{model_type}', which this transformers does not know; evomerge never runs remote code",
            "upgrade transformers, or pick a model whose architecture it ships",
        )


def _known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def folder_size(folder: str | Path) -> int:
    """Bytes of the files a model folder holds (a hub snapshot's links followed to their blobs)."""
    return sum(path.stat().st_size for path in Path(folder).iterdir() if path.is_file())
