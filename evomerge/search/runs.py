"""Creating a run directory and opening it again: the frozen spec comes first, and resume checks it.

`create_run_dir` writes `spec.yaml` before anything else, then journals its SHA-256 as the first
event (`run_created`), so a spec edited at any later moment, even before the search journaled
`run_started`, is refused by `open_ledger`. Runs created before that event existed are checked as
they always were: the spec's fingerprint against the first `run_started` (`Ledger.frozen_spec_check`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from evomerge.errors import UserError
from evomerge.files import write_bytes_atomic
from evomerge.rundir.events import EventName
from evomerge.rundir.journal import Journal
from evomerge.rundir.layout import RunDir
from evomerge.rundir.ledger import Ledger
from evomerge.spec import Spec, parse_frozen_spec


def create_run_dir(spec: Spec) -> Path:
    """A new run directory with a frozen spec; refuses to reuse an existing run."""
    run = RunDir.inside(spec.runs_dir, spec.name)
    if run.journal.exists():
        raise UserError(
            f"name: run '{spec.name}' already exists in {run.root.parent}; use 'evomerge resume {run}' or pick another name"
        )
    # Frozen with absolute paths, so the run does not depend on where it is resumed from.
    frozen = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False).encode("utf-8")
    try:
        run.root.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(run.spec, frozen)
    except OSError as error:
        raise UserError(f"runs_dir: cannot write {run} ({error.strerror}); choose a writable runs_dir") from None
    journal = Journal(run)
    try:
        journal.append(EventName.CREATED, spec_sha256=_sha256(frozen), spec_fingerprint=spec.fingerprint())
    finally:
        journal.close()
    return run.root


def open_run(run_dir: Path | RunDir) -> tuple[RunDir, Spec, list[dict]]:
    """(run, frozen spec, journal events) of an existing run, refused when its spec was changed or
    damaged; the `Search` its caller opens reads the journal again, and tells its damage."""
    spec, ledger = open_ledger(run_dir, warn=False)
    return ledger.run, spec, ledger.events


def open_ledger(run_dir: Path | RunDir, warn: bool = True) -> tuple[Spec, Ledger]:
    """(frozen spec, the run's ledger) of an existing run, refused when its spec was changed or damaged."""
    run = RunDir.of(run_dir)
    if not run.spec.is_file():
        raise UserError(f"{run}: not a run directory (no {run.spec.name}); give runs/NAME")
    ledger = Ledger.read(run, for_search=True, warn=warn)
    frozen = run.spec.read_bytes()
    check, expected = ledger.frozen_spec_check()
    if check == "sha256" and _sha256(frozen) != expected:
        raise _changed(run)
    spec = _parse_frozen(run, frozen)
    if check == "fingerprint" and expected != spec.fingerprint():
        raise _changed(run)
    return spec, ledger


def _parse_frozen(run: RunDir, frozen: bytes) -> Spec:
    try:
        data = yaml.safe_load(frozen.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{run.spec}: the frozen spec cannot be read ({detail}); restore it from a backup, or start a new run"
        ) from None
    return parse_frozen_spec(data, str(run.spec), run.root)


def _changed(run: RunDir) -> UserError:
    return UserError(
        f"{run.spec}: the spec was changed after the run started; restore it, or start a new run for the new spec"
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
