"""`evomerge merge`: materialize a mergekit YAML (or a multi-document one, `merge/multi.py`) as a model folder, with its model card."""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from evomerge.cli.app import DebugOption, app, user_errors_exit_2
from evomerge.errors import Stopped, UserError

if TYPE_CHECKING:
    from evomerge.merge.multi import MultiMerge


@app.command()
@user_errors_exit_2
def merge(
    config: Path = typer.Argument(
        ..., metavar="CONFIG", help="A mergekit merge YAML, or a multi-document one as mergekit-multi reads."
    ),
    out_dir: Path = typer.Argument(
        ..., metavar="OUT", help="Folder for the merged model: new or empty, outside every input model."
    ),
    device: str = typer.Option("cpu", help="cpu or cuda: where the merge math runs."),
    seed: int = typer.Option(0, help="Seed for random methods (dare_*, della*)."),
    shard_size_gb: float = typer.Option(2.0, help="Largest safetensors shard, in GB."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT whole (never mixed with old files)."),
    allow_non_finite: bool = typer.Option(
        False, "--allow-non-finite", help="Write the model even if a merged tensor holds NaN or inf."
    ),
    no_model_card: bool = typer.Option(False, "--no-model-card", help="Do not write OUT/README.md."),
    intermediate_dir: Path | None = typer.Option(
        None,
        "--intermediate-dir",
        "-I",
        help="Multi-document CONFIG: keep its named merges in DIR/NAME and reuse complete ones (default: a staging folder beside OUT, removed after).",
    ),
    debug: bool = DebugOption,
):
    """Materialize a mergekit YAML as a model folder (same tensors as mergekit-yaml), with a model card."""
    materialize(config, out_dir, device, seed, shard_size_gb, force, allow_non_finite, no_model_card, intermediate_dir)


def materialize(
    config: Path,
    out_dir: Path,
    device: str,
    seed: int,
    shard_size_gb: float = 2.0,
    force: bool = False,
    allow_non_finite: bool = False,
    no_model_card: bool = False,
    intermediate_dir: Path | None = None,
) -> None:
    """What `merge` does, shared with `export --merge`."""
    from evomerge.merge.config import load_merge_config
    from evomerge.merge.multi import load_documents

    if device.startswith("cuda"):
        require_cuda()
    refuse_run_folders(out_dir, "write the merged model")
    multi = load_documents(config)
    write = functools.partial(
        _merge_one,
        config_file=config,
        device=device,
        seed=seed,
        max_shard_bytes=int(shard_size_gb * 1024**3),
        allow_non_finite=allow_non_finite,
    )
    if multi is not None:
        _materialize_documents(multi, config, out_dir, write, seed, force, no_model_card, intermediate_dir)
        return
    if intermediate_dir is not None:
        raise UserError(f"--intermediate-dir: {config} holds one merge, so nothing goes there; leave the option out")
    merge_config = load_merge_config(config)
    card = None if no_model_card else _model_card(config, merge_config, out_dir, seed)
    with _sigterm_as_interrupt():  # a plain `kill` or a job's time limit: the staging folder is removed
        write(merge_config, out_dir, str(config), force, model_card=card)


def _materialize_documents(
    multi: MultiMerge,
    config: Path,
    out_dir: Path,
    write: Callable[..., None],
    seed: int,
    force: bool,
    no_model_card: bool,
    intermediate_dir: Path | None,
) -> None:
    """`materialize` for a multi-document YAML: the named merges, then the final one with the model card."""
    from evomerge.merge.multi_disk import merge_documents

    if intermediate_dir is not None:
        refuse_run_folders(intermediate_dir, "keep the intermediate merges")
    card = None if no_model_card else _model_card(config, multi.final, out_dir, seed, multi.source_models())

    def merge_one(merge_config, folder: Path, label: str, replace: bool) -> None:
        final = label == multi.final_label
        write(merge_config, folder, label, replace, model_card=card if final else None, quiet=not final)

    with _sigterm_as_interrupt():
        merge_documents(
            multi,
            out_dir,
            merge_one,
            config_file=config,
            intermediate_dir=intermediate_dir,
            force=force,
            report=lambda line: typer.echo(line, err=True),
        )


def _merge_one(
    merge_config,
    out_dir: Path,
    source: str,
    force: bool,
    *,
    config_file: Path,
    device: str,
    seed: int,
    max_shard_bytes: int,
    allow_non_finite: bool,
    model_card: str | None = None,
    quiet: bool = False,
) -> None:
    """One merge config written to out_dir by the engine; `source` names it in messages."""
    from evomerge.merge.config import with_local_folders
    from evomerge.merge.engine import NonFiniteOutput, merge_to_disk

    try:
        validated = merge_to_disk(
            with_local_folders(merge_config, source),  # hub IDs fetched; the card keeps them
            out_dir,
            device=device,
            seed=seed,
            progress=sys.stderr.isatty(),
            max_shard_bytes=max_shard_bytes,
            config_file=config_file,
            force=force,
            allow_non_finite=allow_non_finite,
            model_card=model_card,
        )
    except NonFiniteOutput as error:
        raise UserError(
            f"{source}: {error} (a NaN, inf or huge weight or lambda?); fix the parameters, or pass --allow-non-finite to write it anyway"
        ) from None
    except UserError as error:
        raise UserError(_naming_document(str(error), str(config_file), source)) from None
    if not quiet:
        typer.echo(f"wrote {len(validated.plan.tensors)} tensors ({validated.plan.num_layers} layers) to {out_dir}")


def _naming_document(message: str, config_file: str, source: str) -> str:
    """An engine message about CONFIG, said of the document `source` names (unchanged for a one-merge file)."""
    prefix = f"{config_file}: "
    return source + ": " + message.removeprefix(prefix) if message.startswith(prefix) else message


def refuse_run_folders(path: Path, doing: str) -> None:
    """Refuse a path that is, lies in or holds a run directory: `--force` replaces merges, never runs."""
    from evomerge.rundir.layout import run_folder_near

    found = run_folder_near(path)
    if found is not None:
        relation, run = found
        raise UserError(
            f"{path}: {relation} the run directory '{run}'; {doing} outside every run and runs_dir (--force replaces only an earlier merge)"
        )


def check_export_output(output: Path, run_dir: Path, config_text: str, force: bool) -> None:
    """`export -o FILE` never overwrites a run's files or an input model's, nor any file without --force."""
    refuse_run_folders(output, "write the YAML")
    target = output.expanduser().resolve()
    for protected in _models_of(run_dir, config_text):
        if target == protected or protected in target.parents:
            raise UserError(
                f"-o: '{output}' is {'' if target == protected else 'inside '}the input model '{protected}'; write the YAML outside every input"
            )
    if target.exists() and not target.is_dir() and not force:
        raise UserError(f"-o: '{output}' exists; choose another path, or pass --force to replace it")


def _models_of(run_dir: Path, config_text: str) -> set[Path]:
    """Local folders and files the run reads its models from: the exported config's and the frozen spec's."""
    import yaml

    from evomerge.rundir.layout import RunDir

    found: set[Path] = set()
    documents = [config_text]
    with contextlib.suppress(OSError):
        documents.append(RunDir.of(run_dir).spec.read_text(encoding="utf-8", errors="replace"))
    for text in documents:
        with contextlib.suppress(yaml.YAMLError, RecursionError):
            for document in yaml.safe_load_all(text):  # every merge of a multi-document config
                _collect_paths(document, found, inside_models=False)
    return found


def _collect_paths(node, found: set[Path], inside_models: bool) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            in_models = inside_models or key in ("models", "model", "base_model", "tokenizer_source")
            _collect_paths(value, found, in_models)
    elif isinstance(node, list):
        for value in node:
            _collect_paths(value, found, inside_models)
    elif isinstance(node, str) and inside_models and node:
        path = Path(node).expanduser().resolve()
        if path.exists():
            found.add(path)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while the block runs, so cleanup code runs as on Ctrl-C."""

    def interrupt(signum, frame):
        raise Stopped(signum)

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _model_card(config_path: Path, merge_config, out_dir: Path, seed: int, source_models=None) -> str:
    from evomerge.merge.card import render_model_card

    text = config_path.read_text(encoding="utf-8", errors="replace")
    title = out_dir.resolve().name or "merged model"
    return render_model_card(title, merge_config, text, seed, _search_origin(text), source_models)


def _search_origin(config_text: str):
    """The run an exported config came from, with its scores if the run directory is still readable."""
    from evomerge.merge.card import ScoreRow, SearchOrigin, parse_origin
    from evomerge.rundir.results import leaderboard, load_trials

    found = parse_origin(config_text)
    if found is None:
        return None
    run_dir, trial = found
    try:
        rows = leaderboard(load_trials(Path(run_dir))[1])
    except (UserError, OSError, ValueError) as error:  # a card must not fail a merge
        return SearchOrigin(run_dir, trial, unreadable=str(error))
    scores = {
        row["trial"]: ScoreRow(row["label"], row["search"], row["search_se"], row["heldout"], row["heldout_se"])
        for row in rows
    }
    baselines = tuple(scores[row["trial"]] for row in rows if row["kind"] != "optimizer" and row["trial"] != trial)
    return SearchOrigin(run_dir, trial, scores.get(trial), baselines)


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError("--device: CUDA is not available on this machine; use --device cpu")
