"""Starting and resuming a search: the checks that come before any run directory or Ray process.

`start_search` checks the spec, the local devices and the run directory's place, connects to Ray,
then creates the run and searches; `resume_search` reopens a run (frozen spec, journal, a larger
budget if asked) and goes on, its hub models at the commits its first start pinned and its hub
datasets at the commits its input fingerprints hold. Both hand the work to `loop.Search`.
"""

from __future__ import annotations

import os
from pathlib import Path

from evomerge.errors import UserError
from evomerge.preflight import preflight
from evomerge.rundir.layout import RunDir
from evomerge.rundir.ledger import Ledger
from evomerge.search.budget import BudgetRequest, effective_spec, extended_spec, journal_budget, requested_budget
from evomerge.search.loop import Search
from evomerge.search.progress import ProgressSettings
from evomerge.search.runs import create_run_dir, open_ledger
from evomerge.spec import Spec


def start_search(
    spec: Spec,
    address: str | None = None,
    progress: bool | ProgressSettings = True,
    source: str = "spec",
    pins: dict[str, str] | None = None,
    dataset_revisions: dict[str, str] | None = None,
) -> Path:
    """A new run; a lock's `pins` (model name -> commit) and `dataset_revisions` hold hub models and
    datasets at those commits."""
    from evomerge.search.cluster import ClusterSession

    refuse_unusable_run_dir(spec)  # in a moment, before the slow checks
    prepared = preflight(spec, source, pins, dataset_revisions)
    _check_local_devices(spec, address, source)
    # Ray before the run directory: a failed connect leaves no empty run blocking the name.
    with ClusterSession(spec, address):
        run_dir = create_run_dir(spec)
        Search(prepared, run_dir, address, progress).run()
    return run_dir


def refuse_unusable_run_dir(spec: Spec) -> None:
    """What create_run_dir would refuse, found before Ray takes its seconds to start."""
    run = RunDir.inside(spec.runs_dir, spec.name)
    if run.journal.exists():
        create_run_dir(spec)  # refuses an existing run with its own line, before writing anything
    existing = next(folder for folder in (run.root, *run.root.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"runs_dir: cannot write {run.root} ({existing} is not a writable folder); choose a writable runs_dir"
        )


def _check_local_devices(spec: Spec, address: str | None, source: str) -> None:
    """A local run that asks for CUDA on a machine without it fails before any run dir exists."""
    if address is None and spec.workers.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                f"{source}: workers.device: cuda was asked for but this machine has no GPU; use device: cpu or auto, or --address a GPU cluster"
            )


def resume_search(
    run_dir: Path,
    address: str | None = None,
    progress: bool | ProgressSettings = True,
    spec_path: Path | None = None,
    accept_changed_inputs: bool = False,
    budget: BudgetRequest | None = None,
) -> Ledger:
    """Continue a run, with a larger `budget` if asked; refused when its frozen spec, or (unless
    accepted) its inputs, changed, or when a given spec differs from it beyond the budget. Returns the
    run's ledger as the search left it (the journal is read once)."""
    frozen, ledger = open_ledger(Path(run_dir).resolve())
    run, spec = ledger.run, effective_spec(frozen, ledger)
    request = budget or BudgetRequest()
    if spec_path is not None:
        from evomerge.spec import load_spec

        from_file = requested_budget(load_spec(spec_path), spec, str(spec_path))
        request = request if not request.empty else from_file  # the flags win over the file
    extended = extended_spec(spec, request, len(ledger.trials), ledger.docs_scored)
    prepared = preflight(extended, str(run.spec), *_journaled_commits(ledger))
    journal_budget(ledger, spec, extended)
    Search(prepared, run, address, progress, accept_changed_inputs=accept_changed_inputs, ledger=ledger).run()
    return ledger


def _journaled_commits(ledger: Ledger) -> tuple[dict[str, str], dict[str, str]]:
    """(model name -> the commit the run's first start pinned, dataset -> the commit its latest input
    fingerprints hold): a resumed run reads the very files it started with, offline or not."""
    from evomerge.evaluation.hub_data import revisions_from_fingerprints

    models = {name: pin["commit"] for name, pin in ledger.pins.items()}
    inputs = ledger.last_inputs
    return models, revisions_from_fingerprints(inputs) if inputs is not None else {}
