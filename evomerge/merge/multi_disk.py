"""Materialize a multi-document merge YAML: each named merge into its own folder, then the final one into OUT.

The named merges are written, in dependency order, either to INTERMEDIATE_DIR/NAME (kept, and a
complete one already there is reused, as `mergekit-multi` does by default) or, without an
intermediate folder, into a hidden staging folder beside OUT that is removed once the final merge is
written, fails or is interrupted. The final merge reads them there. Each merge is one ordinary
single-document merge, done by the caller's `merge_one` (the same code `evomerge merge CONFIG` runs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from evomerge.merge.config import MergeConfig
from evomerge.merge.multi import MultiMerge, with_merge_folders
from evomerge.merge.output import StagedFolder, check_output_folder

# (config, output folder, label for messages, force) -> None: one merge written to its folder.
MergeOne = Callable[[MergeConfig, Path, str, bool], None]

# A folder holding config.json and one of these is a finished merge (mergekit-multi's test, so either tool's is reused).
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def is_complete_merge(folder: Path) -> bool:
    """Whether `folder` holds a finished model: its config and its weights."""
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in _WEIGHT_FILES)


def merge_documents(
    multi: MultiMerge,
    out_dir: Path,
    merge_one: MergeOne,
    *,
    config_file: Path,
    intermediate_dir: Path | None,
    force: bool,
    report: Callable[[str], None] = lambda line: None,
) -> None:
    """Write every named merge, then the final merge into `out_dir` (replaced whole only with `force`).

    OUT is checked before the first merge, so a bad OUT costs no intermediate merge.
    """
    check_output_folder(out_dir, _protected(multi, config_file, intermediate_dir), force)
    if intermediate_dir is not None:
        folders = _merge_intermediates(multi, Path(intermediate_dir), merge_one, force, report)
        merge_one(with_merge_folders(multi.final, folders), out_dir, multi.final_label, force)
        return
    target = Path(out_dir).expanduser().resolve()
    with StagedFolder(target, shown=str(out_dir)) as staging:  # never published: removed on the way out
        folders = _merge_intermediates(multi, staging.path, merge_one, False, report)
        merge_one(with_merge_folders(multi.final, folders), out_dir, multi.final_label, force)


def _merge_intermediates(
    multi: MultiMerge, folder: Path, merge_one: MergeOne, force: bool, report: Callable[[str], None]
) -> dict[str, str]:
    """Each named merge written (or found complete) in folder/NAME; its name -> that folder."""
    folders: dict[str, str] = {}
    for merge in multi.intermediates:
        out = folder / merge.name
        if is_complete_merge(out):
            report(f"{merge.label}: reusing the merge already in {out} (delete it to merge again)")
        else:
            merge_one(with_merge_folders(merge.config, folders), out, merge.label, force)
            report(f"{merge.label}: merged into {out}")
        folders[merge.name] = str(out)
    return folders


def _protected(multi: MultiMerge, config_file: Path, intermediate_dir: Path | None) -> dict[str | Path, str]:
    """What OUT must not be, hold or lie in: the config, the intermediate folder and every local input model."""
    roles: dict[str | Path, str] = {
        model: "the input model" for model in multi.source_models() if Path(model).expanduser().exists()
    }
    roles[config_file] = "the merge config"
    if intermediate_dir is not None:
        roles[intermediate_dir] = "the intermediate folder"
    return roles
