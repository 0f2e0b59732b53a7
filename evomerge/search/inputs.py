"""Fingerprints of what a search reads besides its spec: the model folders and the evaluation files.

Journaled at `run_started`; `resume` recomputes them and refuses a run whose inputs changed, so the
scores of old and new weights or data never mix in one run. Every file is hashed whole, so one
changed tensor anywhere is found. A weight file's SHA-256 is read once and kept in a small cache
(`$XDG_CACHE_HOME/evomerge/file-digests.json`) under its path, size, mtime, ctime, inode and
device; a later start or resume re-reads only files whose stat changed. The first read of a 15 GB
file (a 7B bf16 checkpoint) took 15-17 s from the page cache and 18-37 s from disk on a busy
2-core machine (docs/BENCHMARKS.md, "Input fingerprints"). A file in the Hugging Face cache (a link
into `blobs/<sha256>`) is not read at all: its blob's name is its SHA-256.
Configs, tokenizer files, task YAMLs (with what they include and the code their `!function`s name)
and data files are small and hashed whole each time.

A hub model is fingerprinted by its pinned commit (keyed `org/name@commit`, not by a cache path,
so a run resumes on a machine with another HF_HOME): the hub never changes a commit's files.

Each digest starts with its scheme ("full-v1:", "sha256:", "commit:"), so a version that hashes
differently skips a file it cannot compare instead of calling it changed. Runs journaled with the
older "sampled-v1:" weight digests (size, safetensors header, 8 byte ranges) are still checked in
that scheme.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

from evomerge.errors import UserError
from evomerge.evaluation.hub_data import dataset_fingerprints
from evomerge.evaluation.tasks import resolve_tasks
from evomerge.files import nested_leaves, write_text_atomic
from evomerge.hub import ModelSource

LOG = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)
FULL = "full-v1"
SAMPLED = "sampled-v1"
CONTENT = "sha256"
COMMIT = "commit"
SAMPLE_COUNT = 8
SAMPLE_BYTES = 64 * 1024
HEADER_LIMIT = 100 * 1024 * 1024  # safetensors caps its own header at 100 MB
CACHE_FILE = "file-digests.json"
# A file changed again within the clock's granularity of its last write keeps the same stat;
# a digest is cached only once the file has been left alone for longer than that.
SETTLED_NS = 3_000_000_000
SAID_BYTES = 1 << 30  # hashing a file this large is said on the terminal
HUB_BLOB = re.compile(r"[0-9a-f]{64}")


def input_fingerprints(models: Iterable[ModelSource], eval_sets: Iterable) -> dict[str, str]:
    """Path -> digest of every weight, config and tokenizer file of the local models, hub model ->
    its commit, and every eval file -> its digest."""
    digests: dict[str, str] = {}
    cache = DigestCache.load()
    for model in models:
        if model.is_hub:
            digests[model.exported] = f"{COMMIT}:{model.commit}"
        else:
            digests.update(model_folder_digests(Path(model.folder), cache))
    cache.save()
    for eval_set in eval_sets:
        for path in eval_files(eval_set):
            digests[str(path)] = content_digest(path)
        digests.update(dataset_fingerprints(eval_set))
    return dict(sorted(digests.items()))


def first_change(journaled: dict[str, str], current: dict[str, str]) -> str | None:
    """'PATH: changed since the run started' (or missing, or new) for the first difference, else None."""
    for path, digest in journaled.items():
        now = current.get(path)
        if now is None:
            return f"{path}: missing since the run started"
        if _scheme(now) != _scheme(digest):
            now = _in_scheme(Path(path), _scheme(digest))
        if now is not None and now != digest:
            return f"{path}: changed since the run started"
    added = sorted(current.keys() - journaled.keys())
    return f"{added[0]}: new since the run started" if added else None


def checked_inputs(
    last: dict[str, str] | None, current: dict[str, str], accept_changed: bool, run_dir
) -> dict[str, str]:
    """`current`; refused (one line naming the file) when it differs from the last start's inputs
    unless `accept_changed`. A run journaled before input fingerprints existed has nothing to compare."""
    change = first_change(last, current) if last is not None else None
    if change and not accept_changed:
        raise UserError(
            f"{change}; restore it, or run 'evomerge resume {run_dir} --accept-changed-inputs' to go on with the changed inputs"
        )
    if change:
        LOG.warning("%s; going on with the changed inputs (--accept-changed-inputs)", change)
    return current


def model_folder_digests(folder: Path, cache: DigestCache | None = None) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    cache = DigestCache({}) if cache is None else cache
    digests = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix in WEIGHT_SUFFIXES:
            digests[str(path)] = full_digest(path, cache)
        elif path.name in MODEL_FILES or path.name.endswith(".index.json"):
            digests[str(path)] = content_digest(path)
    return digests


def full_digest(path: Path, cache: DigestCache) -> str:
    """The file's SHA-256: its hub blob's name, else the cache's entry for its stat, else read whole."""
    blob = Path(os.path.realpath(path))
    if blob.parent.name == "blobs" and HUB_BLOB.fullmatch(blob.name):
        return f"{FULL}:{blob.name}"
    key = _stat_key(path)
    digest = cache.get(str(path), key)
    if digest is None:
        if key[0] >= SAID_BYTES:
            print(f"fingerprinting {path} ({key[0] / 1e9:.1f} GB, read once and cached)", file=sys.stderr, flush=True)
        digest = f"{FULL}:{file_sha256(path)}"
        if time.time_ns() - key[1] > SETTLED_NS:
            cache.put(str(path), key, digest)
    return digest


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class DigestCache:
    """Weight-file digests by path, valid while the file's stat (size, mtime, ctime, inode, device)
    is unchanged; one JSON file under the user's cache folder, shared by every run."""

    def __init__(self, entries: dict[str, dict], path: Path | None = None):
        self.entries = entries
        self.path = path
        self.changed = False

    @classmethod
    def load(cls) -> DigestCache:
        path = cache_path()
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))["files"] if path else {}
        except (OSError, ValueError, KeyError, TypeError):
            entries = {}  # none yet, or unreadable: every file is read once more
        return cls(entries if isinstance(entries, dict) else {}, path)

    def get(self, path: str, key: list[int]) -> str | None:
        entry = self.entries.get(path)
        return entry.get("digest") if isinstance(entry, dict) and entry.get("stat") == key else None

    def put(self, path: str, key: list[int], digest: str) -> None:
        self.entries[path] = {"stat": key, "digest": digest}
        self.changed = True

    def save(self) -> None:
        """Written atomically, without the entries of files gone or changed since; a cache that
        cannot be written (a read-only home) only costs a full read next time."""
        if not self.changed or self.path is None:
            return
        kept = {p: e for p, e in self.entries.items() if isinstance(e, dict) and _stat_key_or_none(p) == e.get("stat")}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps({"files": kept}, indent=1, sort_keys=True))
        except OSError as error:
            LOG.debug("input digest cache %s not written: %s", self.path, error)
        self.changed = False


def cache_path() -> Path | None:
    """`$XDG_CACHE_HOME/evomerge/file-digests.json` (`~/.cache` by default); None without a home folder."""
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "evomerge" / CACHE_FILE
    except RuntimeError:
        return None


def _stat_key(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def _stat_key_or_none(path: str) -> list[int] | None:
    try:
        return _stat_key(Path(path))
    except OSError:
        return None


def _in_scheme(path: Path, scheme: str) -> str | None:
    """The file's digest in an older weight scheme, to compare with a run journaled in it; None
    when it cannot be computed (another scheme, or no such file), which skips the file."""
    if scheme == SAMPLED and path.is_file():
        return sampled_digest(path)
    return None


def sampled_digest(path: Path) -> str:
    """Size, safetensors header and SAMPLE_COUNT evenly spaced byte ranges: no full read."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if path.suffix == ".safetensors":
            length = handle.read(8)
            digest.update(length)
            digest.update(handle.read(min(int.from_bytes(length, "little"), HEADER_LIMIT)))
        span = max(size - SAMPLE_BYTES, 0)
        for index in range(SAMPLE_COUNT):
            handle.seek(span * index // (SAMPLE_COUNT - 1))
            digest.update(handle.read(SAMPLE_BYTES))
    return f"{SAMPLED}:{digest.hexdigest()[:32]}"


def content_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return f"{CONTENT}:{digest.hexdigest()[:32]}"


def eval_files(eval_set) -> list[Path]:
    """Every file the tasks of one eval set read: YAMLs, included YAMLs, `!function` code, data."""
    files: set[Path] = set()
    resolved = resolve_tasks(eval_set)
    for path in resolved.yaml_paths():
        files.update(_yaml_and_code(Path(path)))
    for leaf in resolved.leaves:
        files.update(_data_files(leaf.overrides))
    return sorted(files)


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval YAMLs without running their tags: `!function utils.f` becomes ('function', 'utils.f')."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> tuple[str, object]:
    return suffix, loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else None


_TaskYamlLoader.add_multi_constructor("!", _tag)


def _yaml_and_code(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """The YAML, the YAMLs it includes (recursively) and the modules its `!function`s name."""
    seen = set() if seen is None else seen
    if path in seen or not path.is_file():
        return seen
    seen.add(path)
    loader = _TaskYamlLoader(path.read_text(encoding="utf-8"))
    try:
        config = loader.get_single_data()
    finally:
        loader.dispose()
    if not isinstance(config, dict):
        return seen
    includes = config.get("include") or []
    for include in [includes] if isinstance(includes, str) else includes:
        _yaml_and_code(path.parent / str(include), seen)
    for module in _function_modules(config):
        code = path.parent / f"{module}.py"
        if code.is_file():
            seen.add(code)
    return seen


def _function_modules(value) -> Iterator[str]:
    for leaf in nested_leaves(value):
        if isinstance(leaf, tuple) and leaf[0] == "function" and isinstance(leaf[1], str):
            yield leaf[1].rpartition(".")[0]


def _data_files(overrides: dict) -> set[Path]:
    dataset_kwargs = overrides.get("dataset_kwargs") or {}
    patterns = list(_strings(dataset_kwargs.get("data_files")))
    roots = [*_strings(dataset_kwargs.get("data_dir")), *_strings(overrides.get("dataset_path"))]
    files = {Path(p) for pattern in patterns if "://" not in pattern for p in glob.glob(pattern)}
    for root in map(Path, roots):
        files.update(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())
    return {path for path in files if path.is_file()}


def _strings(value) -> Iterator[str]:
    return (str(leaf) for leaf in nested_leaves(value) if leaf is not None)


def _scheme(digest: str) -> str:
    return digest.partition(":")[0]
