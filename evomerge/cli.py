"""The `evomerge` command line: a thin layer over the library, one function per command.

User errors print one line and exit 2 (a traceback only with --debug); everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from pathlib import Path

import typer

from evomerge.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Busy-waiting OpenMP threads stall whenever another process holds a core (a 2-core laptop, a
# node shared with search workers): a TIES merge took 25 s instead of 9 s. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    help="Evolutionary search for LLM merge recipes, exported as mergekit YAML.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DebugOption = typer.Option(False, "--debug", help="Show full tracebacks.")
QuietOption = typer.Option(False, "--quiet", "-q", help="Print nothing but errors and the final table.")
LogEveryOption = typer.Option(
    None,
    "--log-every",
    metavar="N",
    help="Without a terminal (nohup, SLURM, a pipe): a status line every N evaluations (default 25), and at least once a minute.",
)


@app.callback()
def _commands() -> None:
    """Evolutionary search for LLM merge recipes, exported as mergekit YAML."""


def user_errors_exit_2(command):
    """Turn a UserError into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            if kwargs.get("debug"):
                raise
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


@app.command()
@user_errors_exit_2
def merge(
    config: Path = typer.Argument(..., metavar="CONFIG", help="A mergekit merge YAML."),
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
    debug: bool = DebugOption,
):
    """Materialize a mergekit YAML as a model folder (same tensors as mergekit-yaml), with a model card."""
    _materialize(config, out_dir, device, seed, shard_size_gb, force, allow_non_finite, no_model_card)


def _materialize(
    config: Path,
    out_dir: Path,
    device: str,
    seed: int,
    shard_size_gb: float = 2.0,
    force: bool = False,
    allow_non_finite: bool = False,
    no_model_card: bool = False,
) -> None:
    """What `merge` does, shared with `export --merge`."""
    from evomerge.merge.config import load_merge_config
    from evomerge.merge.engine import NonFiniteOutput, merge_to_disk

    if device.startswith("cuda"):
        _require_cuda()
    merge_config = load_merge_config(config)
    card = None if no_model_card else _model_card(config, merge_config, out_dir, seed)
    try:
        with _sigterm_as_interrupt():  # a plain `kill` or a job's time limit: the staging folder is removed
            validated = merge_to_disk(
                merge_config,
                out_dir,
                device=device,
                seed=seed,
                progress=sys.stderr.isatty(),
                max_shard_bytes=int(shard_size_gb * 1024**3),
                config_file=config,
                force=force,
                allow_non_finite=allow_non_finite,
                model_card=card,
            )
    except NonFiniteOutput as error:
        raise UserError(
            f"{config}: {error} (a NaN, inf or huge weight or lambda?); fix the parameters, or pass --allow-non-finite to write it anyway"
        ) from None
    typer.echo(f"wrote {len(validated.plan.tensors)} tensors ({validated.plan.num_layers} layers) to {out_dir}")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while the block runs, so cleanup code runs as on Ctrl-C."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _model_card(config_path: Path, merge_config, out_dir: Path, seed: int) -> str:
    from evomerge.merge.card import render_model_card

    text = config_path.read_text(encoding="utf-8", errors="replace")
    title = out_dir.resolve().name or "merged model"
    return render_model_card(title, merge_config, text, seed, _search_origin(text))


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


@app.command()
@user_errors_exit_2
def validate(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    gpu_memory: str | None = typer.Option(
        None,
        "--gpu-memory",
        metavar="SIZE",
        help="Plan for GPUs of this size (80GiB, 141GB) instead of this machine's.",
    ),
    gpus: int | None = typer.Option(None, "--gpus", help="GPUs per node to plan for [default: this machine's, or 1]."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the checks' summary and the memory plan as one JSON object."
    ),
    debug: bool = DebugOption,
):
    """Check a spec (models, method, genome, tasks) and plan each worker's memory, without reading any weight."""
    import json

    from evomerge.preflight import preflight
    from evomerge.spec import load_spec

    spec = load_spec(spec_path)
    gpu_bytes, gpu_count = _planned_gpus(spec, gpu_memory, gpus)
    prepared = preflight(spec, str(spec_path))
    plan = _memory_plan(spec, gpu_bytes, gpu_count)
    summary = {
        "method": spec.merge.method,
        "experts": len(spec.models.experts),
        "genes": prepared.genome.dim,
        "optimizer": spec.optimizer.name,
        "tasks": [t.name for t in spec.evaluation.tasks],
    }
    if as_json:
        typer.echo(json.dumps({"ok": plan.fits, **summary, **plan.as_json()}, indent=2))
    else:
        typer.echo(
            f"ok: {spec.merge.method} over {len(spec.models.experts)} experts, {prepared.genome.dim} genes, {spec.optimizer.name}, tasks: {', '.join(summary['tasks'])}"
        )
        for line in plan.lines():
            typer.echo(line)
    if not plan.fits:
        raise UserError(
            f"{spec_path}: workers: a worker needs {plan.bytes_per_device / 1e9:.1f} GB per device, more than {plan.capacity / 1e9:.1f} GB; {plan.fix}"
        )


def _planned_gpus(spec, gpu_memory: str | None, gpus: int | None) -> tuple[int | None, int | None]:
    """(bytes per GPU, GPUs per node) to plan for: the flags, else this machine's GPUs, else (None, None) for CPU workers."""
    from evomerge.merge.memory_plan import parse_bytes

    if gpus is not None and gpus < 1:
        raise UserError(f"--gpus: must be at least 1, got {gpus}")
    if gpu_memory is not None:
        if spec.workers.device == "cpu":
            raise UserError(
                "--gpu-memory: the spec runs CPU workers (workers.device: cpu); drop the flag or set device: cuda"
            )
        try:
            return parse_bytes(gpu_memory, "--gpu-memory"), gpus or 1
        except ValueError as error:
            raise UserError(str(error)) from None
    import torch

    if spec.workers.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, gpus or torch.cuda.device_count()
    if gpus is not None:
        raise UserError("--gpus: this machine has no GPU to measure; add --gpu-memory SIZE (for example 80GiB)")
    return None, None


def _memory_plan(spec, gpu_bytes: int | None, gpus: int | None):
    from evomerge.merge.io import inspect_model_folder, parse_dtype
    from evomerge.merge.memory_plan import SCORER_TOKEN_BUDGET, PlanRequest, plan_memory
    from evomerge.merge.methods import METHODS

    dtype = parse_dtype(spec.merge.dtype, "merge.dtype")
    request = PlanRequest(
        base=inspect_model_folder(spec.models.base, "models.base"),
        experts=len(spec.models.experts),
        method=METHODS[spec.merge.method],
        work_dtype=dtype,
        model_dtype=dtype,
        gpus_per_worker=spec.workers.gpus_per_worker,
        gpu_bytes=gpu_bytes,
        gpus=gpus,
        token_budget=spec.evaluation.token_budget or SCORER_TOKEN_BUDGET,
        cpu_workers=spec.workers.count or 2,
    )
    return plan_memory(request)


@app.command("eval")
@user_errors_exit_2
def eval_model(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    model: Path = typer.Option(..., "--model", help="A model folder, or a mergekit YAML merged in memory."),
    split: str = typer.Option("search", "--split", help="search (evaluation.tasks) or heldout (heldout_tasks)."),
    backend: str | None = typer.Option(None, "--backend", help="native or lm_eval; default: the spec's."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    debug: bool = DebugOption,
):
    """Score a model on the spec's tasks exactly as the search scores a candidate (same docs, same seeds)."""
    import json

    from evomerge.evaluation.backend import BackendName
    from evomerge.evaluation.config import EvalSetName
    from evomerge.spec import load_spec

    spec = load_spec(spec_path)
    eval_sets = spec.evaluation.eval_sets()
    if split not in {name.value for name in EvalSetName}:
        raise UserError(f"--split: unknown split '{split}'; choose search or heldout")
    if split not in eval_sets:
        raise UserError(f"--split {split}: {spec_path} has no evaluation.heldout_tasks; use --split search")
    if backend is not None and backend not in {name.value for name in BackendName}:
        raise UserError(f"--backend: unknown backend '{backend}'; choose native or lm_eval")
    result = _score_as_a_worker(spec, model, eval_sets[split], backend)
    used = backend or spec.evaluation.backend.value
    if as_json:
        figures = {"score": result.score, "metrics": result.metrics, "n_docs": result.n_docs}
        typer.echo(json.dumps(figures | {"backend": used, "seconds": round(result.seconds, 4)}))
        return
    for task, value in result.metrics.items():
        typer.echo(f"{task:>32}: {value:.4f} ({result.n_docs[task]} docs)")
    typer.echo(f"{'score':>32}: {result.score:.4f} ({used}, {result.seconds:.2f} s scoring)")


def _score_as_a_worker(spec, model: Path, eval_set, backend: str | None):
    """A worker's device, dtype, threads and merge seed for `evomerge eval`."""
    import torch

    from evomerge.evaluation.standalone import score_model

    device = spec.workers.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        _require_cuda()
    else:
        # CPU reductions depend on the thread count: score with a worker's.
        torch.set_num_threads(max(1, int(spec.workers.cpus_per_worker)))
    return score_model(
        model,
        eval_set,
        device=device,
        dtype=spec.merge.dtype,
        seed=spec.optimizer.seed,
        backend=backend,
        trust_remote_code=spec.trust_remote_code,
    )


@app.command()
@user_errors_exit_2
def search(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    address: str | None = typer.Option(
        None, help="Join a Ray cluster (auto or HOST:PORT); default starts a local one."
    ),
    quiet: bool = QuietOption,
    log_every: int | None = LogEveryOption,
    debug: bool = DebugOption,
):
    """Run a search; results go to runs/NAME/."""
    from evomerge.search.start import start_search
    from evomerge.spec import load_spec

    progress = _progress_settings(quiet, log_every)
    run_dir = start_search(load_spec(spec_path), address, progress=progress, source=str(spec_path))
    _print_summary(run_dir)


@app.command()
@user_errors_exit_2
def resume(
    run_dir: Path = typer.Argument(..., help="runs/NAME"),
    address: str | None = typer.Option(None),
    spec_path: Path | None = typer.Option(
        None,
        "--spec",
        help="Refuse to resume if this spec differs from the frozen one (a larger budget in it extends the run).",
    ),
    accept_changed_inputs: bool = typer.Option(
        False,
        "--accept-changed-inputs",
        help="Resume although a model or evaluation file changed since the run started (its scores then mix old and new inputs).",
    ),
    max_evals: int | None = typer.Option(
        None, "--max-evals", help="Give a stopped or finished run this larger budget.max_evals (journaled)."
    ),
    time_limit_min: float | None = typer.Option(
        None, "--time-limit-min", help="Give the run this larger budget.time_limit_min (journaled)."
    ),
    quiet: bool = QuietOption,
    log_every: int | None = LogEveryOption,
    debug: bool = DebugOption,
):
    """Continue a stopped or crashed search exactly where it was, with more budget if asked."""
    from evomerge.search.budget import BudgetRequest
    from evomerge.search.start import resume_search

    resume_search(
        run_dir,
        address,
        progress=_progress_settings(quiet, log_every),
        spec_path=spec_path,
        accept_changed_inputs=accept_changed_inputs,
        budget=BudgetRequest(max_evals, time_limit_min),
    )
    _print_summary(run_dir)


@app.command()
@user_errors_exit_2
def status(
    run_dir: Path = typer.Argument(...), as_json: bool = typer.Option(False, "--json"), debug: bool = DebugOption
):
    """Completed and failed trials, best score and trial, evaluations per minute."""
    import json

    from evomerge.rundir.results import load_trials, status_of
    from evomerge.rundir.verdict import build_verdict

    events, trials = load_trials(run_dir)
    figures = status_of(run_dir, events, trials)
    verdict = build_verdict(run_dir, events, trials)
    figures["export_command"] = verdict.export_command
    figures["advice"] = verdict.advice
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
        return
    for key in ("run", "asked", "completed", "failed", "in_flight", "best_score", "best_trial", "best_label"):
        typer.echo(f"{key:>15}: {figures[key]}")
    typer.echo(f"{'evals_per_min':>15}: {figures['evals_per_min']} (evolved candidates; the baseline phase excluded)")
    for key in ("heldout_winner", "finished"):
        typer.echo(f"{key:>15}: {figures[key]}")
    if figures["pareto_front"]:
        typer.echo(
            f"{'pareto front':>15}: "
            + "; ".join(f"trial {p['trial']} {[round(v, 4) for v in p['objectives']]}" for p in figures["pareto_front"])
        )
    if verdict.export_command:
        typer.echo(f"{'export':>15}: {verdict.export_command}")
    if verdict.advice:
        typer.echo(verdict.advice)


@app.command()
@user_errors_exit_2
def export(
    run_dir: Path = typer.Argument(...),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the YAML here instead of stdout."),
    trial: int | None = typer.Option(None, help="Export this trial instead of the held-out winner."),
    pareto: bool = typer.Option(
        False, "--pareto", help="List the Pareto front of a multi-objective run (export one with --trial)."
    ),
    merge_to: Path | None = typer.Option(
        None,
        "--merge",
        metavar="OUT",
        help="Also materialize it in OUT, as `evomerge merge` would, with the run's optimizer.seed for dare/della.",
    ),
    device: str = typer.Option("cpu", help="With --merge: cpu or cuda, where the merge math runs."),
    force: bool = typer.Option(False, "--force", help="With --merge: replace a non-empty OUT whole."),
    debug: bool = DebugOption,
):
    """Write a trial as a standard mergekit YAML (the held-out winner by default); --merge OUT builds it too."""
    from evomerge.merge.card import origin_comment
    from evomerge.rundir.results import describe, export_trial, load_trials, pareto_trials

    if pareto:
        front = pareto_trials(load_trials(run_dir)[1])
        if not front:
            raise UserError(
                f"--pareto: {run_dir} has no multi-objective trials; declare evaluation.objectives in the spec"
            )
        for point in front:
            typer.echo(
                f"trial {point['trial']:>5}  {point['label']:<28} objectives {', '.join(f'{v:.4f}' for v in point['objectives'])}"
            )
        return

    chosen, text = export_trial(run_dir, trial)
    header, _, body = text.partition("\n")
    text = f"{header}\n{origin_comment(str(Path(run_dir).resolve()), chosen.trial_id)}{body}"
    if merge_to is not None:
        _export_and_merge(run_dir, chosen.trial_id, text, output, merge_to, device, force)
    elif output is None:
        typer.echo(text)
    else:
        _write_export(output, text)
        typer.echo(f"wrote {describe(chosen)} to {output}", err=True)


def _export_and_merge(
    run_dir: Path, trial: int, text: str, output: Path | None, out_dir: Path, device: str, force: bool
) -> None:
    """Write the exported YAML (to -o, else a temporary file) and materialize it in out_dir."""
    import tempfile

    from evomerge.rundir.results import run_merge_seed

    seed = run_merge_seed(run_dir)
    with tempfile.TemporaryDirectory(prefix="evomerge-export-") as folder:
        config = output if output is not None else Path(folder) / f"{Path(run_dir).resolve().name}-trial-{trial}.yaml"
        _write_export(config, text)
        _materialize(config, out_dir, device, seed, force=force)
    typer.echo(
        f"exported trial {trial} of {run_dir}" + (f" to {output}" if output else "") + f" and merged it in {out_dir}",
        err=True,
    )


def _write_export(output: Path, text: str) -> None:
    from evomerge.files import write_text_atomic

    if output.is_dir():
        raise UserError(f"-o: '{output}' is a folder; give a file path such as '{output / 'best.yaml'}'")
    if not output.parent.is_dir():
        raise UserError(f"-o: folder '{output.parent}' does not exist; create it first or choose another path")
    try:
        write_text_atomic(output, text)
    except OSError as error:
        raise UserError(
            f"-o: cannot write '{output}' ({error.strerror or error}); choose a writable location"
        ) from None


@app.command()
@user_errors_exit_2
def report(
    run_dir: Path = typer.Argument(...),
    out_dir: Path | None = typer.Option(
        None, "-o", "--out", help="Folder for report.html and its PNGs (default RUN_DIR/report)."
    ),
    debug: bool = DebugOption,
):
    """Write report.html with plots: scores over evaluations, per-task metrics, per-layer heatmaps, baselines, Pareto front."""
    from evomerge.rundir.report import write_report

    typer.echo(f"wrote {write_report(run_dir, out_dir)}")


def _progress_settings(quiet: bool, log_every: int | None):
    """The live bar on a terminal, status lines in a log (nohup, SLURM, a pipe), nothing with --quiet."""
    from evomerge.search.progress import DEFAULT_LOG_EVERY, ProgressSettings

    if log_every is not None and log_every < 1:
        raise UserError(f"--log-every: must be at least 1 evaluation, got {log_every}")
    return ProgressSettings.for_stream(sys.stderr, quiet=quiet, log_every=log_every or DEFAULT_LOG_EVERY)


def _print_summary(run_dir) -> None:
    """The verdict a search or resume ends with: the table, margins in SE, the winner and its export."""
    from rich.console import Console
    from rich.table import Table

    from evomerge.rundir.results import load_trials
    from evomerge.rundir.verdict import build_verdict

    events, trials = load_trials(run_dir)
    verdict = build_verdict(run_dir, events, trials)
    tasks = verdict.tasks
    table = Table(title=f"{run_dir}: baselines and evolved merges; per-task columns: {verdict.basis} scores")
    for column in ("trial", "merge", "search score", "held-out score", *tasks):
        table.add_column(column, justify="left" if column == "merge" else "right")
    for row in verdict.rows:
        per_task = row.on(verdict.basis)
        table.add_row(
            str(row.trial),
            row.name + (" (winner: export gives this)" if row.winner else ""),
            str(row.search) if row.search else "-",
            str(row.heldout) if row.heldout else "-",
            *(f"{per_task.tasks[task]:.4f}" if per_task and task in per_task.tasks else "-" for task in tasks),
            style="bold" if row.winner else None,
        )
    console = Console()
    if not console.is_terminal:  # a log file: the table at its natural width, not wrapped at 80 columns
        console = Console(width=1000)
    console.print(table)
    for line in verdict.lines():
        typer.echo(line)


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UserError("--device: CUDA is not available on this machine; use --device cpu")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
