"""`evomerge validate` (every check and the memory plan, before any weight) and `evomerge eval`."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import tempfile
from pathlib import Path

import typer

from evomerge.cli.app import DebugOption, RefusedWithFigures, app, user_errors_exit_2
from evomerge.cli.merging import require_cuda
from evomerge.errors import UserError

GPUS_PER_NODE_LIMIT = 256


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

    from evomerge.spec import load_spec

    spec = load_spec(spec_path)  # before the heavy imports: a spec's mistakes are told without torch

    from evomerge.evaluation.hub_data import locked_dataset_revisions
    from evomerge.lock import model_pins, read_lock
    from evomerge.preflight import preflight
    from evomerge.search.start import refuse_unusable_run_dir

    gpu_bytes, gpu_count = _planned_gpus(spec, gpu_memory, gpus)
    refuse_unusable_run_dir(spec)  # a runs_dir that is a file: said now, not after Ray's start
    lock = read_lock(spec_path)
    prepared = preflight(spec, str(spec_path), model_pins(lock), locked_dataset_revisions(lock))
    summary = {
        "method": spec.merge.method,
        "experts": len(spec.models.experts),
        "genes": prepared.genome.dim,
        "optimizer": spec.optimizer.name,
        "tasks": [t.name for t in spec.evaluation.tasks],
        "search_docs_per_candidate": prepared.search_docs,  # what budget.max_docs is counted in
        "models": prepared.sources.exported(),  # hub models as org/name@commit: the files a search reads
    }
    merged = "layer paths (passthrough)" if spec.search.layers else " or ".join(spec.merge.methods)
    if spec.search.phased:
        merged += f" for {spec.search.params_evals(spec.budget.max_evals)} evaluations, then layer paths with its winner as one more source,"
    ok = f"ok: {merged} over {len(spec.models.experts)} experts, {prepared.genome.dim} genes, {spec.optimizer.name}, tasks: {', '.join(summary['tasks'])} ({prepared.search_docs:,} search documents per candidate)"
    ok += _hub_models_line(prepared.sources, spec_path, bool(model_pins(lock)))
    if spec.workers.device == "cuda" and gpu_bytes is None:  # GPU workers, planned from a machine without one
        note = (
            "memory plan: skipped, this machine has no GPU; add --gpu-memory SIZE [--gpus N] to plan for the GPU nodes"
        )
        typer.echo(
            json.dumps({"ok": True, **summary, "fits": None, "note": note}, indent=2) if as_json else f"{ok}\n{note}"
        )
        return
    plan = _memory_plan(spec, prepared.sources.folder(spec.models.base), gpu_bytes, gpu_count)
    if not plan.fits:  # with --json, the refusal's object holds the summary and the plan too
        if not as_json:
            typer.echo("\n".join([ok, *plan.lines()]))
        raise RefusedWithFigures(
            f"{spec_path}: workers: a worker needs {plan.bytes_per_device / 1e9:.1f} GB per device, more than {plan.capacity / 1e9:.1f} GB; {plan.fix}",
            {**summary, **plan.as_json()},
        )
    typer.echo(
        json.dumps({"ok": True, **summary, **plan.as_json()}, indent=2) if as_json else "\n".join([ok, *plan.lines()])
    )


def _hub_models_line(sources, spec_path: Path, locked: bool) -> str:
    """'\nhub models: org/name@commit, ...' (and the lock they come from), or '' without hub models."""
    from evomerge.lock import lock_path

    hub = [source.exported for source in sources.values() if source.is_hub]
    where = f" (locked by {lock_path(spec_path).name})" if locked else ""
    return f"\nhub models: {', '.join(hub)}{where}" if hub else ""


def _planned_gpus(spec, gpu_memory: str | None, gpus: int | None) -> tuple[int | None, int | None]:
    """(bytes per GPU, GPUs per node) to plan for: the flags, else this machine's GPUs, else (None, None) for CPU workers."""
    from evomerge.merge.memory_plan import parse_bytes

    if gpus is not None and not 1 <= gpus <= GPUS_PER_NODE_LIMIT:
        raise UserError(f"--gpus: GPUs per node, from 1 to {GPUS_PER_NODE_LIMIT}, got {gpus}")
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


def _memory_plan(spec, base_folder: str, gpu_bytes: int | None, gpus: int | None):
    if spec.search.layers:  # one device per worker, every source whole (merge/layer_memory.py)
        from evomerge.merge.layer_memory import plan_for_spec

        return plan_for_spec(spec, base_folder, gpu_bytes, gpus)
    if spec.search.phased:  # a parameter phase's workers, then a layer phase's with the winner as one more source
        from evomerge.search.phases import layer_spec
        from evomerge.search_space import DEFAULT_SEARCH_SPACE

        phases = [_memory_plan(spec.model_copy(update={"search": DEFAULT_SEARCH_SPACE}), base_folder, gpu_bytes, gpus)]
        phases.append(_memory_plan(layer_spec(spec), base_folder, gpu_bytes, gpus))
        return max(phases, key=lambda plan: (not plan.fits, plan.bytes_per_device))
    from evomerge.merge.io import parse_dtype
    from evomerge.merge.registry import METHODS

    dtype = parse_dtype(spec.merge.dtype, "merge.dtype")
    plans = [_method_plan(spec, METHODS[name], base_folder, dtype, gpu_bytes, gpus) for name in spec.merge.methods]
    # A method gene: workers merge any listed method, so the most demanding one's plan holds.
    return max(plans, key=lambda plan: (not plan.fits, plan.bytes_per_device))


def _method_plan(spec, method, base_folder: str, dtype, gpu_bytes: int | None, gpus: int | None):
    from evomerge.evaluation.vllm_memory import plan_for_backend
    from evomerge.merge.io import inspect_model_folder
    from evomerge.merge.memory_plan import SCORER_TOKEN_BUDGET, PlanRequest

    request = PlanRequest(
        base=inspect_model_folder(base_folder, "models.base"),
        experts=len(spec.models.experts),
        method=method,
        work_dtype=dtype,
        model_dtype=dtype,
        gpus_per_worker=spec.workers.gpus_per_worker,
        gpu_bytes=gpu_bytes,
        gpus=gpus,
        token_budget=spec.evaluation.token_budget or SCORER_TOKEN_BUDGET,
        cpu_workers=spec.workers.count or 2,
        gpu_workers=spec.workers.count,
    )
    return plan_for_backend(request, spec.evaluation)


@app.command("eval")
@user_errors_exit_2
def eval_model(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    model: str = typer.Option(
        ..., "--model", help="A model folder, a hub ID (org/name[@revision]), or a mergekit YAML merged in memory."
    ),
    split: str = typer.Option("search", "--split", help="search (evaluation.tasks) or heldout (heldout_tasks)."),
    backend: str | None = typer.Option(None, "--backend", help="native, lm_eval or vllm; default: the spec's."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    debug: bool = DebugOption,
):
    """Score a model on the spec's tasks exactly as the search scores a candidate (same docs, same seeds)."""
    import json

    from evomerge.evaluation.backend import BackendName
    from evomerge.evaluation.config import EvalSetName
    from evomerge.evaluation.hub_data import locked_dataset_revisions
    from evomerge.lock import model_pins, read_lock
    from evomerge.spec import load_spec

    spec = load_spec(spec_path)
    lock = read_lock(spec_path)
    eval_sets = spec.evaluation.eval_sets(locked_dataset_revisions(lock))
    if split not in {name.value for name in EvalSetName}:
        raise UserError(f"--split: unknown split '{split}'; choose search or heldout")
    if split not in eval_sets:
        raise UserError(f"--split {split}: {spec_path} has no evaluation.heldout_tasks; use --split search")
    if backend is not None and backend not in {name.value for name in BackendName}:
        raise UserError(f"--backend: unknown backend '{backend}'; choose native, lm_eval or vllm")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        from evomerge.evaluation.vllm_backend import INSTALL_HINT

        raise UserError(f"--backend vllm: vllm is not installed; {INSTALL_HINT}, or use --backend native")
    folder = _local_model(model, model_pins(lock))
    with _library_chatter_held_back(shown=debug):  # progress bars, lm-eval notices: as a search worker's
        result = _score_as_a_worker(spec, folder, eval_sets[split], backend)
    used = backend or spec.evaluation.backend.value
    if as_json:
        figures = {"score": result.score, "metrics": result.metrics, "n_docs": result.n_docs}
        typer.echo(json.dumps(figures | {"backend": used, "seconds": round(result.seconds, 4)}))
        return
    for task, value in result.metrics.items():
        typer.echo(f"{task:>32}: {value:.4f} ({result.n_docs[task]} docs)")
    typer.echo(f"{'score':>32}: {result.score:.4f} ({used}, {result.seconds:.2f} s scoring)")


def _local_model(model: str, pins: dict[str, str]) -> Path:
    """--model as a local path: a hub ID is fetched (or found in the cache; at its locked commit when
    the spec's lock names it) first."""
    from evomerge.hub import resolve_models

    return Path(resolve_models({model: "--model"}, "eval", pins, fetch_hint="hf download REPO").folder(model))


@contextlib.contextmanager
def _library_chatter_held_back(shown: bool):
    """Keep what the libraries print while a model loads and scores (progress bars, lm-eval notices)
    off the terminal, as a search worker's is; printed after all if scoring fails other than by a UserError."""
    if shown:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stderr(io.StringIO()) as python_level:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except UserError:
            raise
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.__stderr__.write(sink.read().decode(errors="replace") + python_level.getvalue())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _refuse_what_memory_cannot_hold(spec, model: Path, device: str) -> None:
    """The memory plan's resident bytes for one scoring, the model (and a merge's inputs), in host
    memory (every load passes through it) and on the GPU; refused, before any weight loads, when this
    machine cannot hold even those (the kernel's OOM killer would end it without a word). The
    scorer's workspace comes on top, so passing is no promise; failing is certain."""
    import torch

    from evomerge.evaluation.standalone import inspect_model
    from evomerge.merge.io import inspect_model_folder, parse_dtype
    from evomerge.merge.memory_plan import SCORER_TOKEN_BUDGET, PlanRequest, host_memory, plan_memory
    from evomerge.merge.registry import METHODS, SINGLE_MODEL

    dtype = parse_dtype(spec.merge.dtype, "merge.dtype")
    merge = inspect_model(model).merge
    folder = inspect_model_folder(str(model), "--model") if merge is None else next(iter(merge.folders.values()))
    request = PlanRequest(
        base=folder,
        experts=0 if merge is None else len(merge.folders) - 1,
        method=SINGLE_MODEL if merge is None else METHODS[merge.config.merge_method],
        work_dtype=dtype,
        model_dtype=dtype,
        token_budget=spec.evaluation.token_budget or SCORER_TOKEN_BUDGET,
        cpu_workers=1,
    )
    device_bytes = plan_memory(request).devices[0]
    # A plain folder loads once, as the model; a merge keeps its inputs resident beside the model.
    needed = device_bytes.resident - (device_bytes.sources if merge is None else 0)
    places = [("this machine's memory", host_memory())]
    if device == "cuda":
        places.append(("the GPU's memory", torch.cuda.get_device_properties(0).total_memory))
    for where, capacity in places:
        if needed > capacity:
            smaller = " or a smaller merge.dtype (bfloat16)" if dtype.itemsize > 2 else ""
            raise UserError(
                f"--model: scoring {model} in {spec.merge.dtype} needs at least {needed / 1e9:.1f} GB for its weights, more than {where} "
                f"({capacity / 1e9:.1f} GB); score it on a machine with more memory (workers.device: cuda on a GPU node){smaller}"
            )


def _score_as_a_worker(spec, model: Path, eval_set, backend: str | None):
    """A worker's device, dtype, threads and merge seed for `evomerge eval`."""
    import torch

    from evomerge.evaluation.standalone import score_model

    device = spec.workers.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        require_cuda()
    _refuse_what_memory_cannot_hold(spec, model, device)
    if device != "cuda":
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
