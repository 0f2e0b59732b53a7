"""The output folder of a disk merge: never an input, never half written, never a mix of two merges.

`check_output_folder` refuses, before anything is read or written, an OUT that is, holds or lies
inside an input (a merge there would truncate the very file it is reading), an OUT that is a
file or lies under one, and a non-empty OUT unless the caller forces its replacement. Missing parent
folders of OUT are created (as `mergekit-yaml` does), and removed again if the merge fails.

`StagedFolder` is where the merge is written: a hidden folder beside OUT, on the same filesystem,
renamed into place only once every file in it is complete and synced. A merge that fails or is
killed at any point leaves OUT as it was; an error removes the staging folder (a SIGKILL cannot,
and leaves a hidden `.OUT.evomerge-staging-*` folder beside OUT, never anything in it).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from evomerge.errors import UserError
from evomerge.files import fsync_folder

STAGING_MARK = "evomerge-staging"
REPLACED_MARK = "evomerge-replaced"


def check_output_folder(out_dir: str | Path, inputs: Mapping[str | Path, str], force: bool) -> Path:
    """The resolved OUT, after every check that needs no writing; `inputs` maps each input path to what it is."""
    target = Path(out_dir).expanduser().resolve()  # a link to an input folder is that input
    for given, what in inputs.items():
        _refuse_overlap(out_dir, target, Path(given).expanduser().resolve(), f"{what} '{given}'")
    # --force replaces OUT whole: never let that be the folder the user is working in.
    _refuse_overlap(out_dir, target, Path.cwd().resolve(), "the current folder", inside_ok=True)
    if target.exists() and not target.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; give the path of a new folder for the merged model")
    existing = next(folder for folder in target.parents if folder.exists())
    if not existing.is_dir():
        raise UserError(f"{out_dir}: '{existing}' is a file, not a folder; give OUT a path under a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UserError(f"{out_dir}: folder is not empty; choose a new folder, or pass --force to replace it whole")
    return target


def _refuse_overlap(out_dir: str | Path, target: Path, protected: Path, what: str, inside_ok: bool = False) -> None:
    if target == protected:
        relation = "is"
    elif target in protected.parents:
        relation = "contains"
    elif protected in target.parents and not inside_ok:
        relation = "is inside"
    else:
        return
    raise UserError(f"{out_dir}: {relation} {what}; write the merged model to a folder outside every input")


class StagedFolder:
    """A hidden folder beside `target`: `publish` renames it into place, leaving the block discards it."""

    def __init__(self, target: Path, shown: str | None = None):
        self.target = target
        self.shown = shown or str(target)  # OUT as the user wrote it, for messages
        self.path = target.with_name(f".{target.name}.{STAGING_MARK}-{os.getpid()}-{secrets.token_hex(4)}")
        self.published = False
        self.created: list[Path] = []  # parent folders of OUT this merge made, outermost first

    def __enter__(self) -> StagedFolder:
        try:
            for folder in reversed(self.target.parents):
                if not folder.exists():
                    os.mkdir(folder)
                    self.created.append(folder)
            os.mkdir(self.path)  # mode from the umask, as a plain mkdir of OUT would have
        except OSError as error:
            self._remove_created()
            raise UserError(
                f"{self.shown}: cannot write in '{self.target.parent}' ({error.strerror}); choose a writable location"
            ) from None
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if not self.published:
            shutil.rmtree(self.path, ignore_errors=True)
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self.created):
            try:
                folder.rmdir()  # only while empty: never anything another process put there meanwhile
            except OSError:
                return

    def publish(self) -> None:
        """Rename the complete folder to `target`, replacing an existing one whole."""
        fsync_folder(self.path)
        replaced = None
        if self.target.is_dir() and any(self.target.iterdir()):
            # rename() cannot replace a non-empty folder; moving the old one aside first keeps OUT always
            # either the old merge or the new one, never a mix (only briefly absent between the renames).
            replaced = self.target.with_name(f".{self.target.name}.{REPLACED_MARK}-{secrets.token_hex(4)}")
            os.rename(self.target, replaced)
        os.replace(self.path, self.target)
        self.published = True
        fsync_folder(self.target.parent)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
