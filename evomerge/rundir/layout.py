"""`RunDir`: the one place that knows what a run directory holds and what its files are called.

runs/NAME/spec.yaml       the frozen spec (written first, before anything else)
runs/NAME/journal.jsonl   the append-only journal, the run's source of truth
runs/NAME/optimizer/      optimizer snapshots, each named in the journal with its SHA-256
runs/NAME/optuna.log      TPE and NSGA-II runs: Optuna's journal storage (for optuna-dashboard)
runs/NAME/ray.log         Ray's own log lines (start-up notices, warnings), kept off the terminal
runs/NAME/report/         `evomerge report` output
runs/NAME/tensorboard/    with `logging: {tensorboard: true}`: TensorBoard's event files
runs/NAME/.lock           held by the one process working on the run
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import UserError


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of(cls, run_dir: str | os.PathLike | RunDir) -> RunDir:
        return run_dir if isinstance(run_dir, RunDir) else cls(Path(run_dir))

    @classmethod
    def inside(cls, runs_dir: str | os.PathLike, name: str) -> RunDir:
        """runs_dir/name, refused unless `name` is one plain path component that stays inside runs_dir.

        The spec checks the name too; this is the check at the place that writes, so a name that
        slipped past it (or a symlink planted at runs_dir/name) never lets a run overwrite files
        elsewhere.
        """
        parent = Path(runs_dir).expanduser().resolve()
        if name in ("", ".", "..") or Path(name).name != name or "/" in name or os.sep in name:
            raise UserError(
                f"name: '{name}' is not a plain folder name; give the run a name such as my-merge (letters, digits, '.', '_', '-')"
            )
        root = parent / name
        if root.resolve().parent != parent:
            raise UserError(
                f"name: {root} resolves to {root.resolve()}, outside runs_dir {parent}; remove that link or pick another name"
            )
        return cls(root)

    @property
    def spec(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def journal(self) -> Path:
        return self.root / "journal.jsonl"

    @property
    def snapshots(self) -> Path:
        return self.root / "optimizer"

    def snapshot(self, file_name: str) -> Path:
        return self.snapshots / file_name

    @property
    def optuna_log(self) -> Path:
        return self.root / "optuna.log"

    @property
    def ray_log(self) -> Path:
        return self.root / "ray.log"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def looks_like_a_run(self) -> bool:
        """A folder holding a journal, or a frozen spec beside the lock: what only `search` creates."""
        return self.journal.exists() or (self.spec.is_file() and self.lock.exists())

    def __str__(self) -> str:
        return str(self.root)

    def __fspath__(self) -> str:
        return str(self.root)


def run_folder_near(path: str | os.PathLike, depth: int = 2) -> tuple[str, Path] | None:
    """('is' | 'is inside' | 'contains', the run folder) when `path` is, lies in or holds a run directory.

    Holding is looked for `depth` levels down: a runs_dir holds its runs one level down, the folder
    that holds a runs_dir two. Anything that would write or replace `path` must refuse all three.
    """
    target = Path(path).expanduser().resolve()
    for folder in (target, *target.parents):
        if RunDir(folder).looks_like_a_run():
            return ("is" if folder == target else "is inside"), folder
    found = _run_below(target, depth)
    return ("contains", found) if found is not None else None


def _run_below(folder: Path, depth: int) -> Path | None:
    if depth == 0 or not folder.is_dir():
        return None
    try:
        children = [entry for entry in os.scandir(folder) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return None
    for child in children:
        if RunDir(Path(child.path)).looks_like_a_run():
            return Path(child.path)
    for child in children:
        found = _run_below(Path(child.path), depth - 1)
        if found is not None:
            return found
    return None
