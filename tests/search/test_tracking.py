"""Optional logging: off by default, a clear spec error when the backend is missing, and the
trial values reach the backend when it is there."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from evomerge.errors import UserError
from evomerge.preflight import check_available
from evomerge.rundir.events import TrialResult
from evomerge.rundir.trials import Trial
from evomerge.search.tracking import Tracker
from evomerge.spec import parse_spec

BASE = {"name": "t", "models": {"base": "/b", "experts": ["/e"]}, "evaluation": {"tasks": ["x"]}}


def spec_with(**logging):
    return parse_spec({**BASE, "logging": logging}, "spec.yaml", Path("/"))


def test_off_by_default_and_needs_no_package():
    spec = parse_spec(BASE, "spec.yaml", Path("/"))
    check_available(spec)
    assert Tracker(spec, Path("/tmp")).backends == []


def test_a_missing_backend_is_a_spec_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match="logging.wandb: wandb is not installed"):
        check_available(spec_with(wandb=True))


def test_trials_reach_the_backend(monkeypatch, tmp_path):
    logged = []
    fake = types.SimpleNamespace(
        init=lambda **kwargs: types.SimpleNamespace(
            log=lambda values, step: logged.append((step, values)), finish=lambda: None
        )
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = Tracker(spec_with(wandb=True), tmp_path)
    result = TrialResult(trial=0, ok=True, score=0.5, metrics={"x": 0.5})
    trial = Trial(0, "optimizer", "trial 0", {}, status="completed", result=result)
    tracker.log_trial(trial, best=0.5)
    tracker.close()
    assert logged == [(1, {"score": 0.5, "best_so_far": 0.5, "task/x": 0.5})]
