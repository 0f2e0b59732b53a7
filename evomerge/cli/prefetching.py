"""`evomerge prefetch`: fetch every hub model and dataset a spec reads, and lock their revisions.

Run on a machine with internet (a cluster's login node) with the HF_HOME the compute nodes read;
then `validate` and `search` there, with HF_HUB_OFFLINE=1, resolve every model at its locked commit
from that cache (docs/CLUSTER.md).
"""

from __future__ import annotations

from pathlib import Path

import typer

from evomerge.cli.app import DebugOption, app, user_errors_exit_2


@app.command()
@user_errors_exit_2
def prefetch(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    update: bool = typer.Option(
        False, "--update", help="Follow the revisions the spec asks for again instead of the lock's commits."
    ),
    debug: bool = DebugOption,
):
    """Download every hub model and dataset SPEC reads into the caches and write SPEC's lock (SPEC.lock.yaml)."""
    from evomerge.hub import folder_size, resolve_models
    from evomerge.lock import model_pins, read_lock, write_lock
    from evomerge.preflight import model_fields
    from evomerge.spec import load_spec

    spec = load_spec(spec_path)
    lock = None if update else read_lock(spec_path)
    sources = resolve_models(model_fields(spec), str(spec_path), model_pins(lock))
    models = {}
    for name, source in sources.items():
        if source.is_hub:
            models[name] = {**source.pin(), "size": folder_size(source.folder)}
            typer.echo(f"model    {source.exported}  {human_size(models[name]['size'])}  ({source.folder})")
    datasets = _fetch_datasets(spec, lock)
    for dataset in datasets:
        what = dataset["path"] + (f" ({dataset['name']})" if dataset.get("name") else "")
        typer.echo(f"dataset  {what}@{dataset.get('revision')}  {human_size(dataset.get('size'))}")
    path = write_lock(spec_path, models, datasets)
    total = sum(entry["size"] for entry in models.values()) + sum(d.get("size") or 0 for d in datasets)
    typer.echo(f"wrote {path}: {len(models)} hub models and {len(datasets)} hub datasets, {human_size(total)} in all")


def _fetch_datasets(spec, lock: dict | None) -> list[dict]:
    """Every hub dataset the spec's tasks read, downloaded into the datasets cache: one lock entry each."""
    from evomerge.evaluation.hub_data import fetch_datasets, locked_dataset_revisions

    return fetch_datasets(list(spec.evaluation.eval_sets().values()), locked_dataset_revisions(lock) or None)


def human_size(size: int | None) -> str:
    if size is None:
        return "size unknown"
    units, value, index = ("B", "KB", "MB", "GB", "TB"), float(size), 0
    while value >= 1000 and index < len(units) - 1:
        value, index = value / 1000, index + 1
    return f"{size:,} B" if index == 0 else f"{value:,.1f} {units[index]}"
