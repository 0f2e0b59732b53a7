"""Local data paths in task YAMLs, anchored at the YAML's own folder.

lm-eval's json/csv loaders resolve relative paths against the current directory, which differs
between a laptop, a Ray worker and CI; evomerge rewrites them absolute and checks they exist.
"""

from __future__ import annotations

import copy
import glob
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evomerge.errors import UserError
from evomerge.files import nested_leaves


def absolute_paths(config: dict, yaml_dir: Path) -> dict[str, Any]:
    """Config keys whose relative local paths must be anchored at the YAML's folder."""
    overrides: dict[str, Any] = {}
    dataset_kwargs = copy.deepcopy(config.get("dataset_kwargs") or {})
    for key in ("data_files", "data_dir"):
        if dataset_kwargs.get(key):
            dataset_kwargs[key] = map_paths(dataset_kwargs[key], yaml_dir)
            overrides["dataset_kwargs"] = dataset_kwargs
    dataset_path = config.get("dataset_path")
    # Only an explicitly relative path: "json" or "org/name" are loader or hub names.
    if isinstance(dataset_path, str) and dataset_path.startswith(("./", "../")):
        overrides["dataset_path"] = str((yaml_dir / dataset_path).resolve())
    return overrides


def map_paths(value: Any, yaml_dir: Path) -> Any:
    """Apply `_absolute` to every path in a data_files value (str, list, or split -> either)."""
    if isinstance(value, dict):
        return {split: map_paths(paths, yaml_dir) for split, paths in value.items()}
    if isinstance(value, list):
        return [map_paths(path, yaml_dir) for path in value]
    return _absolute(str(value), yaml_dir)


def _absolute(path: str, yaml_dir: Path) -> str:
    if "://" in path:
        return path
    return str((yaml_dir / Path(path).expanduser()).resolve())


def _local_paths(value: Any) -> Iterator[str]:
    return (str(path) for path in nested_leaves(value) if "://" not in str(path))


def check_data_files_exist(overrides: dict, name: str, yaml_path: Path, field: str) -> None:
    dataset_kwargs = overrides.get("dataset_kwargs", {})
    for key in ("data_files", "data_dir"):
        for path in _local_paths(dataset_kwargs.get(key, [])):
            # glob also accepts literal paths, and data_files may be patterns like data/*.jsonl
            if not glob.glob(path):
                raise UserError(
                    f"{field}.name: task '{name}' ({yaml_path}) reads '{path}', which does not exist; "
                    f"fix dataset_kwargs.{key} in that YAML (relative paths start at the YAML's folder)"
                )
