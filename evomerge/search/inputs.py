"""Fingerprints of what a search reads besides its spec: the model folders and the evaluation files.

Journaled at `run_started`; `resume` recomputes them and refuses a run whose inputs changed, so the
scores of old and new weights or data never mix in one run. Weight files are not read whole (a 7B
expert is 15 GB): their size, the safetensors header (every tensor's name, dtype, shape and
offsets) and a hash of a few fixed byte ranges catch a replaced, retrained, truncated or re-sharded
file in milliseconds. Configs, tokenizer files, task YAMLs (with what they include and the code
their `!function`s name) and data files are hashed whole.

A hub model is fingerprinted by its pinned commit (keyed `org/name@commit`, not by a cache path,
so a run resumes on a machine with another HF_HOME): the hub never changes a commit's files.

Each digest starts with its scheme ("sampled-v1:", "sha256:"), so a later version that samples
differently skips a file it cannot compare instead of calling it changed.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

from evomerge.evaluation.hub_data import dataset_fingerprints
from evomerge.evaluation.tasks import resolve_tasks
from evomerge.hub import ModelSource

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
SAMPLED = "sampled-v1"
CONTENT = "sha256"
COMMIT = "commit"
SAMPLE_COUNT = 8
SAMPLE_BYTES = 64 * 1024
HEADER_LIMIT = 100 * 1024 * 1024  # safetensors caps its own header at 100 MB


def input_fingerprints(models: Iterable[ModelSource], eval_sets: Iterable) -> dict[str, str]:
    """Path -> digest of every weight, config and tokenizer file of the local models, hub model ->
    its commit, and every eval file -> its digest."""
    digests: dict[str, str] = {}
    for model in models:
        if model.is_hub:
            digests[model.exported] = f"{COMMIT}:{model.commit}"
        else:
            digests.update(model_folder_digests(Path(model.folder)))
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
        if _scheme(now) == _scheme(digest) and now != digest:
            return f"{path}: changed since the run started"
    added = sorted(current.keys() - journaled.keys())
    return f"{added[0]}: new since the run started" if added else None


def model_folder_digests(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        return {}
    digests = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix in WEIGHT_SUFFIXES:
            digests[str(path)] = sampled_digest(path)
        elif path.name in MODEL_FILES or path.name.endswith(".index.json"):
            digests[str(path)] = content_digest(path)
    return digests


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
    if isinstance(value, tuple) and value[0] == "function" and isinstance(value[1], str):
        yield value[1].rpartition(".")[0]
    elif isinstance(value, dict):
        for item in value.values():
            yield from _function_modules(item)
    elif isinstance(value, list):
        for item in value:
            yield from _function_modules(item)


def _data_files(overrides: dict) -> set[Path]:
    dataset_kwargs = overrides.get("dataset_kwargs") or {}
    patterns = list(_strings(dataset_kwargs.get("data_files")))
    roots = [*_strings(dataset_kwargs.get("data_dir")), *_strings(overrides.get("dataset_path"))]
    files = {Path(p) for pattern in patterns if "://" not in pattern for p in glob.glob(pattern)}
    for root in map(Path, roots):
        files.update(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())
    return {path for path in files if path.is_file()}


def _strings(value) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif value is not None:
        yield str(value)


def _scheme(digest: str) -> str:
    return digest.partition(":")[0]
