"""The spec's `optimizer:` section: one typed model per optimizer, told apart by `name`.

Every spelling older specs used still loads, the flat layout older versions froze included, and a
run's fingerprint hashes what it always hashed; a setting the named optimizer does not take is
refused in one line naming it.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.errors import UserError
from evomerge.optim import Optimizer, Problem, build_optimizer, make_optimizer
from evomerge.optim.base import SNAPSHOT_FORMAT
from evomerge.optim.settings import CMAESSettings, NSGA2Settings, RandomSettings, TPESettings
from evomerge.spec import parse_frozen_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]
# A spec frozen by an early version (CMA-ES, every flat optimizer field written out).
FROZEN = yaml.safe_load((REPO / "tests/fixtures/runs/v0-cmaes/spec.yaml").read_text())
FLAT_DEFAULTS = {"popsize": None, "sigma0": 0.25, "n_startup_trials": 10, "overlap": None}
TWO_OBJECTIVES = [{"name": "a", "tasks": ["tiny_add"]}, {"name": "b", "tasks": ["tiny_choice"]}]


def spec_data(optimizer: dict | None, version: int | None = 3, objectives: bool = False) -> dict:
    data = copy.deepcopy(FROZEN)
    if optimizer is None:
        del data["optimizer"]
    else:
        data["optimizer"] = optimizer
    if version is not None:
        data["version"] = version
    if objectives:
        data["evaluation"]["tasks"].append({"name": "tiny_choice", "weight": 1.0, "metric": "acc"})
        data["evaluation"]["heldout_tasks"] = []
        data["evaluation"]["objectives"] = TWO_OBJECTIVES
    return data


def user_spec(optimizer: dict | None, **kwargs):
    return parse_spec(spec_data(optimizer, **kwargs), "spec.yaml", Path("/tmp"))


def frozen_spec(optimizer: dict | None, **kwargs):
    return parse_frozen_spec(spec_data(optimizer, **kwargs), "spec.yaml", Path("/tmp"))


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        (None, CMAESSettings()),
        ({"seed": 3, "popsize": 8}, CMAESSettings(seed=3, popsize=8)),
        (
            {"name": "cmaes", "popsize": 12, "sigma0": 0.07, "overlap": False},
            CMAESSettings(popsize=12, sigma0=0.07, overlap=False),
        ),
        ({"name": "tpe", "seed": 7, "n_startup_trials": 3}, TPESettings(seed=7, n_startup_trials=3)),
        ({"name": "random", "seed": 9}, RandomSettings(seed=9)),
    ],
)
def test_every_spelling_of_a_single_objective_optimizer_loads(optimizer, expected):
    assert user_spec(optimizer).optimizer == expected


def test_nsga2_takes_its_population_as_popsize():
    settings = user_spec({"name": "nsga2", "popsize": 8}, objectives=True).optimizer
    assert settings == NSGA2Settings(popsize=8) and settings.population == 8
    assert user_spec({"name": "nsga2"}, objectives=True).optimizer.population == 16


@pytest.mark.parametrize("name", ["cmaes", "tpe", "random"])
def test_the_flat_layout_at_its_defaults_loads_for_every_optimizer(name):
    """A spec copied from a frozen run of an older version spells out every optimizer's fields."""
    settings = user_spec({"name": name, "seed": 2, **FLAT_DEFAULTS}).optimizer
    assert settings.name == name and settings.seed == 2
    assert set(settings.model_dump()) <= {"name", "seed", *FLAT_DEFAULTS}


@pytest.mark.parametrize(
    ("optimizer", "words"),
    [
        (
            {"name": "tpe", "sigma0": 0.5},
            ["optimizer.sigma0: not a setting of tpe (a setting of cmaes)", "n_startup_trials"],
        ),
        (
            {"name": "random", "popsize": 8},
            ["optimizer.popsize: not a setting of random (a setting of cmaes and nsga2)"],
        ),
        ({"name": "cmaes", "popsise": 8}, ["optimizer.popsise: not a setting of cmaes (did you mean 'popsize'?)"]),
        ({"name": "cmaes", "sigma0": 2}, ["optimizer.sigma0: Input should be less than or equal to 1"]),
        ({"name": "cma-es"}, ["optimizer.name: unknown optimizer 'cma-es'", "(did you mean 'cmaes'?)"]),
    ],
)
def test_a_setting_the_optimizer_does_not_take_is_refused_in_one_line(optimizer, words):
    with pytest.raises(UserError) as refusal:
        user_spec(optimizer)
    message = str(refusal.value)
    assert "\n" not in message and message.startswith("spec.yaml: optimizer.")
    assert all(word in message for word in words), message


# What these specs hashed to when one flat model held every optimizer's fields.
FINGERPRINTS = {
    "fixture": (FROZEN["optimizer"], None, "171a2d624136b02c"),
    "cmaes-default": (None, 3, "03375717886ab869"),
    "cmaes-set": ({"name": "cmaes", "popsize": 8, "sigma0": 0.07, "overlap": False}, 3, "43ae687734a97819"),
    "cmaes-overlap": ({"name": "cmaes", "overlap": True, "seed": 3}, None, "0082bb8e4ef3e1da"),
    "tpe": ({"name": "tpe", "n_startup_trials": 4}, 3, "08cf5565b9278d30"),
    "tpe-flat": ({"name": "tpe", **FLAT_DEFAULTS}, None, "b8982958138200e9"),
    "random-flat": ({"name": "random", **FLAT_DEFAULTS}, 3, "e108f1ede08cb559"),
    "tpe-others-fields": ({"name": "tpe", "popsize": 8, "sigma0": 0.5}, 3, "c00dbe4d99c04fb0"),
}


@pytest.mark.parametrize("case", list(FINGERPRINTS))
def test_a_frozen_spec_keeps_its_fingerprint(case):
    optimizer, version, fingerprint = FINGERPRINTS[case]
    assert frozen_spec(optimizer, version=version).fingerprint() == fingerprint


def test_a_frozen_nsga2_spec_keeps_its_fingerprint():
    flat = {"name": "nsga2", "popsize": 6, "sigma0": 0.3, "n_startup_trials": 2}
    assert frozen_spec(flat, version=3, objectives=True).fingerprint() == "9cb58bf66ea8c562"
    assert frozen_spec({"name": "nsga2", "popsize": 8}, objectives=True).fingerprint() == "3616229f8472097f"


def test_another_optimizer_s_field_changes_the_fingerprint_of_a_frozen_spec_only_off_its_default():
    plain = frozen_spec({"name": "tpe"}).fingerprint()
    assert frozen_spec({"name": "tpe", "sigma0": 0.25}).fingerprint() == plain
    assert frozen_spec({"name": "tpe", "sigma0": 0.5}).fingerprint() != plain


@pytest.mark.parametrize("settings", [CMAESSettings(), TPESettings(), RandomSettings(), NSGA2Settings(popsize=4)])
def test_each_optimizer_is_built_from_its_own_settings(settings):
    problem = Problem(np.zeros(3), np.ones(3), np.full(3, 0.5), objectives=2 if settings.name == "nsga2" else 1)
    optimizer = build_optimizer(settings, problem)
    assert optimizer.name == settings.name
    np.testing.assert_array_equal(optimizer.ask().x, problem.x0)


@pytest.mark.parametrize(("version", "overlap", "barrier"), [(1, None, True), (2, None, False), (3, False, True)])
def test_cmaes_keeps_its_generation_barrier_in_version_1_runs_and_where_the_spec_asks(version, overlap, barrier):
    problem = Problem(np.zeros(3), np.ones(3), np.full(3, 0.5), search_version=version)
    optimizer = build_optimizer(CMAESSettings(popsize=2, overlap=overlap), problem)
    optimizer.ask(), optimizer.ask()
    assert (optimizer.ask() is None) == barrier


def test_an_nsga2_snapshot_pickled_when_nsga2_lived_in_the_tpe_module_restores():
    original = make_optimizer("nsga2", np.zeros(3), np.ones(3), np.full(3, 0.5), 4, objectives=2, popsize=4)
    for _ in range(6):
        ask = original.ask()
        original.tell(ask.trial_id, [-float(np.sum(ask.x**2)), float(ask.x[0])])
    # Protocol 0 names classes as text lines, so the module they were pickled from can be rewritten.
    blob = pickle.dumps({"format": SNAPSHOT_FORMAT, "optimizer": original}, protocol=0)
    old = blob.replace(b"cevomerge.optim.nsga2\n", b"cevomerge.optim.tpe\n")
    assert old != blob
    restored = Optimizer.restore(old)
    np.testing.assert_array_equal(restored.ask().x, original.ask().x)


def test_reading_optimizer_settings_imports_neither_cma_nor_optuna():
    code = "import sys, evomerge.spec; print(sorted({'cma', 'optuna'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"
