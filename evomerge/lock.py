"""The lock `evomerge prefetch` writes next to a spec: the exact hub files a run reads.

`<spec stem>.lock.yaml` holds every hub model's commit (with the revision asked for and its size on
disk) and every hub dataset's revision (its entries are `evaluation.hub_data`'s to write and read). When it exists, `validate` and `search` resolve the spec's
models at the locked commits, so compute nodes with HF_HUB_OFFLINE=1 read exactly the files the
login node fetched. A lock that does not name a model leaves that model to ordinary resolution.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from evomerge.errors import UserError
from evomerge.files import write_text_atomic

HEADER = (
    "# Written by `evomerge prefetch`: the exact hub files this spec's runs read.\n"
    "# validate and search resolve models at these commits; delete this file to follow the hub again.\n"
)


def lock_path(spec_path: str | Path) -> Path:
    spec_path = Path(spec_path)
    return spec_path.with_name(f"{spec_path.stem}.lock.yaml")


def read_lock(spec_path: str | Path) -> dict | None:
    """The lock next to `spec_path` as {"models": {...}, "datasets": [...]}, or None when there is none."""
    path = lock_path(spec_path)
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserError(
            f"{path}: cannot read the lock ({type(error).__name__}); run 'evomerge prefetch {spec_path}' again, or delete it"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
        raise UserError(f"{path}: not a lock written by evomerge prefetch; run 'evomerge prefetch {spec_path}' again")
    return {"models": data.get("models") or {}, "datasets": data.get("datasets") or []}


def model_pins(lock: dict | None) -> dict[str, str]:
    """Model name -> locked commit, from a lock `read_lock` returned (empty without one)."""
    models = (lock or {}).get("models", {})
    return {name: entry["commit"] for name, entry in models.items() if isinstance(entry, dict) and entry.get("commit")}


def write_lock(spec_path: str | Path, models: dict[str, dict], datasets: list[dict]) -> Path:
    """Write the lock next to `spec_path` atomically; returns its path."""
    path = lock_path(spec_path)
    body = yaml.safe_dump({"models": models, "datasets": datasets}, sort_keys=False, default_flow_style=False)
    try:
        write_text_atomic(path, HEADER + body)
    except OSError as error:
        raise UserError(
            f"{path}: cannot write the lock ({error.strerror or error}); make the spec's folder writable"
        ) from None
    return path
