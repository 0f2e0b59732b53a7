"""End to end on CPU: `evomerge search` on a local Ray cluster with 2 CPU workers, then status,
export, merge with both tools, re-scoring; TPE; and a SIGKILLed search resumed to the same state.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from search_zoo import FIXTURE_EVALS, build_trained_zoo

from evomerge.rundir.journal import KILL_HOOK_VARIABLE

pytestmark = pytest.mark.slow
EVOMERGE = str(Path(sys.executable).with_name("evomerge"))


@pytest.fixture(scope="module")
def trained_zoo(tmp_path_factory):
    return build_trained_zoo(tmp_path_factory.mktemp("trained_zoo"))


def write_spec(folder: Path, zoo: dict, name: str, optimizer: dict, max_evals: int) -> Path:
    spec = {
        "name": name,
        "runs_dir": str(folder / "runs"),
        "models": {"base": zoo["base"], "experts": [zoo["even"], zoo["odd"]]},
        "merge": {"method": "ties"},
        "genome": {"layer_groups": 2},
        "optimizer": optimizer,
        "evaluation": {
            "include": [str(FIXTURE_EVALS)],
            "tasks": ["tiny_add"],
            "limit": 32,
            "seed": 3,
            "batch_size": 16,
        },
        "budget": {"max_evals": max_evals},
        "workers": {"count": 2},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(*args, check=True, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([EVOMERGE, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"evomerge {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}"
        )
    return result


def journal(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines() if line.strip()]


def best_optimizer_trial(run_dir: Path) -> dict:
    done = [e for e in journal(run_dir) if e["event"] == "completed" and e["trial"] >= 0]
    return max(done, key=lambda e: e["score"])


def rescore(model_dir: Path, spec_path: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation.evaluate import Evaluator
    from evomerge.preflight import preflight
    from evomerge.spec import load_spec

    torch.set_num_threads(1)
    settings = preflight(load_spec(spec_path)).eval_sets["search"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return Evaluator(model, AutoTokenizer.from_pretrained(model_dir), settings).evaluate().score


def check_export_round_trip(tmp_path: Path, run_dir: Path, spec_path: Path, mergekit_merge) -> None:
    best = best_optimizer_trial(run_dir)
    exported = tmp_path / "best.yaml"
    cli("export", run_dir, "--trial", best["trial"], "-o", exported)
    assert yaml.safe_load(exported.read_text())["slices"], "an evolved trial exports as per-layer-group slices"
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    cli("merge", exported, ours)
    mergekit_merge(exported, theirs)
    from safetensors.torch import load_file

    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6 * b[name].abs().max().item() + 1e-12), name
    assert rescore(ours, spec_path) == best["score"]


@pytest.mark.parametrize(
    "optimizer",
    [{"name": "cmaes", "seed": 1, "popsize": 4}, {"name": "tpe", "seed": 1, "n_startup_trials": 3}],
    ids=["cmaes", "tpe"],
)
def test_search_status_export_merge_rescore(tmp_path, trained_zoo, optimizer, mergekit_merge):
    spec_path = write_spec(tmp_path, trained_zoo, f"e2e-{optimizer['name']}", optimizer, max_evals=15)
    cli("validate", spec_path)
    cli("search", spec_path)
    run_dir = tmp_path / "runs" / f"e2e-{optimizer['name']}"
    status = json.loads(cli("status", run_dir, "--json").stdout)
    assert status["completed"] + status["failed"] == 15 and status["finished"]
    completed = [e for e in journal(run_dir) if e["event"] == "completed"]
    assert len(completed) == status["completed"]
    assert len({e["score"] for e in completed}) > 1, "merges of the trained zoo must score differently"
    assert {e["worker"].split("@")[0] for e in completed} == {"w0", "w1"}, "both workers took candidates"
    assert len({e["subset"] for e in completed}) == 1, "every worker and candidate scored the same documents"
    check_export_round_trip(tmp_path, run_dir, spec_path, mergekit_merge)


def optimizer_trials(run_dir: Path) -> dict[int, tuple]:
    events = journal(run_dir)
    asked = {e["trial"]: tuple(e["x"]) for e in events if e["event"] == "asked" and e["trial"] >= 0}
    scores = {e["trial"]: e["score"] for e in events if e["event"] == "completed" and e["trial"] >= 0}
    return {trial: (x, scores.get(trial)) for trial, x in asked.items()}


def test_killed_search_resumes_to_the_uninterrupted_state(tmp_path, trained_zoo):
    optimizer = {"name": "cmaes", "seed": 7, "popsize": 4, "overlap": False}  # timing-free asks
    reference_spec = write_spec(tmp_path, trained_zoo, "uninterrupted", optimizer, max_evals=19)
    cli("search", reference_spec)
    reference = optimizer_trials(tmp_path / "runs" / "uninterrupted")

    spec_path = write_spec(tmp_path, trained_zoo, "killed", optimizer, max_evals=19)
    run_dir = tmp_path / "runs" / "killed"
    # The driver SIGKILLs itself right after its 12th result (baselines done, the optimizer mid-
    # generation): polling the journal from here raced a driver that finishes 7 trials in 0.2 s.
    env = {**os.environ, KILL_HOOK_VARIABLE: "completed:12"}
    driver = subprocess.Popen(
        [EVOMERGE, "search", str(spec_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert driver.wait(timeout=300) == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # the local Ray cluster it started
    assert len([e for e in journal(run_dir) if e["event"] == "completed"]) == 12
    assert not any(e["event"] == "run_finished" for e in journal(run_dir))

    cli("resume", run_dir)
    events = journal(run_dir)
    finished = [e["trial"] for e in events if e["event"] in ("completed", "failed")]
    assert len(finished) == len(set(finished)), "no trial is completed twice"
    assert optimizer_trials(run_dir) == reference, "same asks and scores as the uninterrupted run"


def test_resume_refuses_a_changed_spec(tmp_path, trained_zoo):
    from evomerge.rundir.journal import Journal
    from evomerge.search.loop import create_run_dir
    from evomerge.spec import load_spec

    spec_path = write_spec(tmp_path, trained_zoo, "frozen", {"name": "random", "seed": 0}, max_evals=8)
    spec = load_spec(spec_path)
    run_dir = create_run_dir(spec)
    journal_file = Journal(run_dir)
    journal_file.append("run_started", spec_fingerprint=spec.fingerprint(), workers=2)
    journal_file.close()
    changed = yaml.safe_load(spec_path.read_text())
    changed["optimizer"]["seed"] = 1
    spec_path.write_text(yaml.safe_dump(changed))
    result = cli("resume", run_dir, "--spec", spec_path, check=False)
    assert result.returncode == 2 and "differs from the spec frozen" in result.stderr
    frozen = yaml.safe_load((run_dir / "spec.yaml").read_text())
    frozen["optimizer"]["seed"] = 5
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(frozen))
    result = cli("resume", run_dir, check=False)
    assert result.returncode == 2 and "spec was changed" in result.stderr and "Traceback" not in result.stderr


def test_a_params_then_layers_search_exports_what_its_layer_workers_scored(tmp_path, trained_zoo, mergekit_merge):
    """Real Ray workers through the phase change: the exported two-document YAML, merged by evomerge
    and by mergekit-multi, is the model the layer phase scored."""
    from merge.mergekit_equality import compare_folders
    from merge.test_multi_merge import run_mergekit_multi

    spec_path = write_spec(tmp_path, trained_zoo, "e2e-phased", {"name": "cmaes", "seed": 1, "popsize": 4}, 20)
    spec = yaml.safe_load(spec_path.read_text())
    spec["merge"] = {"method": "task_arithmetic"}
    spec["search"] = {"space": "params_then_layers"}
    spec_path.write_text(yaml.safe_dump(spec))
    cli("validate", spec_path)
    cli("search", spec_path)
    run_dir = tmp_path / "runs" / "e2e-phased"
    status = json.loads(cli("status", run_dir, "--json").stdout)
    assert status["finished"] and status["phase"].startswith("layers")
    events = journal(run_dir)
    first = next(e for e in events if e["event"] == "phase_changed")["first_trial"]
    layered = [e for e in events if e["event"] == "completed" and e["trial"] >= first]
    best = max(layered, key=lambda e: e["score"])
    exported = tmp_path / "layers.yaml"
    cli("export", run_dir, "--trial", best["trial"], "-o", exported)
    ours = tmp_path / "ours"
    cli("merge", exported, ours)
    run_mergekit_multi(exported, tmp_path / "theirs", tmp_path / "theirs_steps")
    compare_folders(ours, tmp_path / "theirs").assert_bit_for_bit()
    assert rescore(ours, spec_path) == best["score"]
