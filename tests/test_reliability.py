"""Reliability promises, each proven by a test (docs/RELIABILITY.md maps promise -> test).

A driver SIGKILLed at five points of a search, with torn journal lines on top, resumes to exactly
the uninterrupted run; a worker killed mid-evaluation is replaced and its candidates re-queued; a
failing candidate becomes a failed trial and the search goes on; a full disk leaves the journal
intact; a snapshot whose journaled hash does not match is never unpickled (tests/search/test_resume.py
shows the run then resumes exactly by replaying the whole journal).

The Ray searches join one head node started here (127.0.0.1, token auth, private temp dir) with
--address, so a driver start costs seconds rather than a cluster start. Drivers are killed at exact
points through the test-only EVOMERGE_TEST_KILL_AFTER_EVENT hook in evomerge/rundir/journal.py.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import io
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from search_zoo import FIXTURE_EVALS, build_trained_zoo

from evomerge.errors import UserError
from evomerge.rundir.journal import KILL_HOOK_VARIABLE, Journal, read_events

BIN = Path(sys.executable).parent
SEARCH_EVAL = {"include": [str(FIXTURE_EVALS)], "tasks": ["tiny_add"], "limit": 32, "seed": 3, "batch_size": 16}
HELDOUT_EVAL = {**SEARCH_EVAL, "heldout_tasks": ["tiny_choice"], "top_k": 2}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_trained_zoo(tmp_path_factory.mktemp("trained_zoo"))


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """(address, environment for drivers) of a one-node Ray cluster in its own process group."""
    temp_dir = tempfile.mkdtemp(prefix="evr", dir="/tmp")  # Ray's socket paths must stay short
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray rewrites 127.0.0.1 to the machine's routable
    # IP and listens on every interface; the token keeps the test cluster private to this test.
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = tmp_path_factory.mktemp("ray_head") / "head.log"
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    head = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, f"ray start failed:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        kill_group(head.pid)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def evomerge(env: dict, *args, kill_after: str | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run the evomerge command in its own process group; nothing of it outlives the call."""
    run_env = {**env, KILL_HOOK_VARIABLE: kill_after} if kill_after else env
    process = subprocess.Popen(
        [str(BIN / "evomerge"), *map(str, args)],
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        kill_group(process.pid)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def write_spec(folder: Path, zoo: dict, name: str, **sections) -> Path:
    spec = {
        "name": name,
        "runs_dir": str(folder / "runs"),
        "models": {"base": zoo["base"], "experts": [zoo["even"], zoo["odd"]]},
        "merge": {"method": "ties"},
        "genome": {"layer_groups": 2},
        # The generation barrier: compared with an uninterrupted run, asks must not depend on timing.
        "optimizer": {"name": "cmaes", "seed": 7, "popsize": 4, "overlap": False},
        "evaluation": SEARCH_EVAL,
        "budget": {"max_evals": 19},
        "workers": {"count": 1},
        **sections,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def journal(run_dir: Path) -> list[dict]:
    """The journal's events; a torn last line (made on purpose below) is left out, with a logged warning."""
    return read_events(run_dir / "journal.jsonl")


def results_by_trial(events: list[dict], kind: str = "completed") -> dict[int, float]:
    found = [e["trial"] for e in events if e["event"] == kind]
    assert len(found) == len(set(found)), f"a trial has two '{kind}' events: {sorted(found)}"
    return {e["trial"]: e.get("score") for e in events if e["event"] == kind}


def search_state(run_dir: Path) -> dict:
    """What must match the uninterrupted run: optimizer asks and scores, baselines, held-out scores."""
    events = journal(run_dir)
    scores = results_by_trial(events)
    asked = [e for e in events if e["event"] == "asked"]
    return {
        "optimizer": {e["trial"]: (tuple(e["x"]), scores.get(e["trial"])) for e in asked if e["kind"] == "optimizer"},
        "baselines": {e["label"]: scores.get(e["trial"]) for e in asked if e["kind"] == "baseline"},
        "heldout": results_by_trial(events, "heldout"),
    }


@pytest.fixture(scope="module")
def reference_run(zoo, ray_head, tmp_path_factory) -> Path:
    """The uninterrupted search every killed one must reproduce."""
    address, env = ray_head
    folder = tmp_path_factory.mktemp("reference")
    finished = evomerge(
        env, "search", write_spec(folder, zoo, "reference", evaluation=HELDOUT_EVAL), "--address", address
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return folder / "runs" / "reference"


def asked(**fields) -> dict:
    """The fields an 'asked' event needs besides its trial (read_events skips one without them)."""
    return {"kind": "baseline", "label": "base", "merge_config": {}, **fields}


def tear_last_line(path: Path) -> None:
    """What a kill in the middle of a write leaves: the last line cut halfway, no newline."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: start + (len(data) - start) // 2])


# (hook, the event the killed driver wrote last); one worker runs candidates in submission order,
# so each point is the same trial every time.
KILL_POINTS = (
    ("run_started:1", "run_started"),  # before anything was asked
    ("asked:1", "asked"),  # a candidate asked, no result yet
    ("completed:9", "completed"),  # 7 baselines + trials 0, 1: CMA-ES generation 0 half told
    ("snapshot:1", "snapshot"),  # right after an optimizer snapshot
    ("heldout:2", "heldout"),  # during the held-out re-scoring
)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, zoo, ray_head) -> tuple[Path, dict[int, float]]:
    """The reference search, SIGKILLed at each KILL_POINT and torn twice, then resumed to the end.

    Returns the run and every (trial, score) completion its journal held after some kill."""
    address, env = ray_head
    folder = tmp_path_factory.mktemp("killed")
    spec_path = write_spec(folder, zoo, "killed", evaluation=HELDOUT_EVAL)
    run_dir = folder / "runs" / "killed"
    kept: dict[int, float] = {}
    for number, (hook, last_event) in enumerate(KILL_POINTS):
        command = ("search", spec_path) if number == 0 else ("resume", run_dir)
        killed = evomerge(env, *command, "--address", address, kill_after=hook)
        assert killed.returncode == -signal.SIGKILL, f"{hook}: {killed.stderr[-3000:]}"
        assert journal(run_dir)[-1]["event"] == last_event, hook
        if hook == "completed:9":
            assert {t for t in results_by_trial(journal(run_dir)) if t >= 0} == {0, 1}, "killed mid-generation"
            tear_last_line(run_dir / "journal.jsonl")  # the completion of trial 1 is lost mid-write
        if hook == "snapshot:1":
            assert "dropped a torn last line" in killed.stderr
        for trial, score in results_by_trial(journal(run_dir)).items():
            assert kept.setdefault(trial, score) == score, f"trial {trial} changed its score across a resume"
    with (run_dir / "journal.jsonl").open("ab") as handle:
        handle.write(b'{"event":"heldout","time":1.0,"trial":-')  # a partial line on top of the last kill
    finished = evomerge(env, "resume", run_dir, "--address", address)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "dropped a torn last line" in finished.stderr
    return run_dir, kept


@pytest.mark.slow
def test_driver_killed_at_five_points_resumes_without_losing_or_repeating_a_trial(killed_run, reference_run, caplog):
    run_dir, kept = killed_run
    final = results_by_trial(journal(run_dir))  # also asserts no trial completed twice
    assert {t: final.get(t) for t in kept} == kept, "a completed trial was lost or rescored"
    assert set(final) == {e["trial"] for e in journal(run_dir) if e["event"] == "asked"}
    results_by_trial(journal(run_dir), "heldout")  # each held-out re-score once
    assert search_state(run_dir)["baselines"] == search_state(reference_run)["baselines"]
    with caplog.at_level(logging.WARNING):
        read_events(run_dir / "journal.jsonl")
    assert not caplog.records, "every line parses, nothing torn or skipped is left"
    from evomerge.rundir.results import status

    figures = status(run_dir)
    assert (figures["completed"], figures["failed"], figures["finished"]) == (19, 0, True)


@pytest.mark.slow
def test_driver_killed_at_five_points_resumes_to_the_uninterrupted_state(killed_run, reference_run):
    run_dir, _ = killed_run
    assert search_state(run_dir) == search_state(reference_run), "same asks, scores and held-out scores"


def cma_generation_1(path: str, mode: str) -> list | None:
    """Run CMA-ES into generation 1 (near the lower bound); `mode` snapshots it after one tell,
    restores that snapshot, or goes straight on. Returns the first ask of generation 2."""
    import numpy as np

    from evomerge.optim import make_optimizer

    score = lambda ask: -float(np.sum((ask.x - 0.3) ** 2))  # noqa: E731
    optimizer = make_optimizer("cmaes", np.zeros(6), np.ones(6), np.full(6, 0.1), 7, popsize=4)
    for ask in [optimizer.ask() for _ in range(4)]:
        optimizer.tell(ask.trial_id, score(ask))
    asks = [optimizer.ask() for _ in range(4)]
    if mode == "restore":
        optimizer, asks = type(optimizer).restore(Path(path).read_bytes()), asks[1:]
    for ask in asks:
        optimizer.tell(ask.trial_id, score(ask))
        if mode == "snapshot":
            Path(path).write_bytes(optimizer.snapshot())
            return None
    return optimizer.ask().x.tolist()


def test_cmaes_snapshot_restored_by_another_process_continues_identically(tmp_path):
    snapshot = str(tmp_path / "cma.pkl")
    cma_generation_1(snapshot, "snapshot")
    # A fixed hash seed differs from this process's random one (or from its fixed one, + 1).
    seed = str(int(os.environ["PYTHONHASHSEED"]) + 1) if os.environ.get("PYTHONHASHSEED", "").isdigit() else "1"
    code = f"from pathlib import Path\n{inspect.getsource(cma_generation_1)}\nprint(cma_generation_1({snapshot!r}, 'restore'))"
    restored = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restored.returncode == 0, restored.stderr[-2000:]
    assert restored.stdout.strip() == str(cma_generation_1(snapshot, "straight"))


@pytest.fixture(scope="module")
def slow_evals(tmp_path_factory) -> Path:
    """tiny_add whose scoring sleeps 50 ms a doc: seconds per candidate whatever the scorer, so a busy
    worker is mid-evaluation when it is killed."""
    folder = tmp_path_factory.mktemp("slow_evals")
    (folder / "data").mkdir()
    (folder / "data" / "slow.jsonl").write_text((FIXTURE_EVALS / "data" / "tiny.jsonl").read_text())
    (folder / "slow_scoring.py").write_text(
        "import time\n\n\ndef process_results(doc, results):\n"
        "    time.sleep(0.05)\n"
        "    return {'acc': float(results[0][1])}\n"
    )
    task = (
        (FIXTURE_EVALS / "tiny_add.yaml")
        .read_text()
        .replace("task: tiny_add", "task: slow_add\nprocess_results: !function slow_scoring.process_results")
        .replace("tiny.jsonl", "slow.jsonl")
        .split("  - metric: perplexity")[0]
    )
    (folder / "slow_add.yaml").write_text(task)
    return folder


@pytest.mark.slow
def test_worker_killed_mid_evaluation_is_replaced_and_its_candidates_requeued(tmp_path, zoo, ray_head, slow_evals):
    address, env = ray_head
    evaluation = {"include": [str(slow_evals)], "tasks": ["slow_add"], "limit": 150, "batch_size": 64}
    spec_path = write_spec(
        tmp_path,
        zoo,
        "worker-killed",
        evaluation=evaluation,
        optimizer={"name": "random", "seed": 0},
        budget={"max_evals": 10},
        workers={"count": 2},
    )
    run_dir = tmp_path / "runs" / "worker-killed"
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen(
            [str(BIN / "evomerge"), "search", str(spec_path), "--address", address],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not (done := [e for e in journal(run_dir) if e["event"] == "completed"]):
            assert driver.poll() is None and time.monotonic() < deadline, "no result"
            time.sleep(0.2)
        first = done[0]["worker"]  # "w0@host:pid"; that worker already holds its next candidates
        os.kill(int(first.rsplit(":", 1)[1]), signal.SIGKILL)
        driver.wait(timeout=400)
    finally:
        kill_group(driver.pid)
    stderr = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, stderr[-3000:]
    assert "worker died" in stderr and "re-queueing" in stderr
    events = journal(run_dir)
    completed = results_by_trial(events)
    assert set(completed) == {e["trial"] for e in events if e["event"] == "asked"} and len(completed) == 10
    assert not any(e["event"] == "failed" for e in events), "a killed worker is not a failed candidate"
    slot = first.partition("@")[0] + "@"
    assert {e["worker"] for e in events if e["event"] == "completed" and e["worker"].startswith(slot)} - {first}, (
        "the replacement took candidates"
    )


@pytest.fixture(scope="module")
def worker(zoo, tmp_path_factory):
    """One MergeWorker without Ray, and a good candidate with its score."""
    from evomerge.preflight import preflight
    from evomerge.search.worker import MergeWorker, WorkerSettings
    from evomerge.spec import load_spec

    prepared = preflight(load_spec(write_spec(tmp_path_factory.mktemp("worker"), zoo, "worker")))
    worker = MergeWorker(WorkerSettings(prepared.spec.models.base, prepared.union_config, prepared.eval_sets))
    config = prepared.genome.to_merge_config(prepared.genome.x0()).model_dump(mode="json", exclude_none=True)
    return worker, config, worker.evaluate(0, config).score


def raising(error: Exception):
    def fail(*args, **kwargs):
        raise error

    return fail


def break_merge(monkeypatch, worker, config):
    from evomerge.merge.fused import candidate

    monkeypatch.setattr(candidate, "write_merge", raising(RuntimeError("merge exploded")))
    return config, "RuntimeError: merge exploded"


def nan_after_merge(monkeypatch, worker, config):
    from evomerge.merge.fused import candidate

    def poisoned(model, *args, **kwargs):
        merged = real_merge(model, *args, **kwargs)
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")
        return merged

    real_merge = candidate.write_merge
    monkeypatch.setattr(candidate, "write_merge", poisoned)
    return config, "merged weights are not finite (model.norm.weight)"


def overflowing_weights(monkeypatch, worker, config):
    # Slice parameters win over global ones, and the default TIES genome evolves lambda per slice.
    slices = [{**s, "parameters": {**(s.get("parameters") or {}), "lambda": 1e45}} for s in config.get("slices", [])]
    return {
        **config,
        **({"slices": slices} if slices else {}),
        "parameters": {**(config.get("parameters") or {}), "lambda": 1e45},
    }, "merged weights are not finite"


def break_evaluation(monkeypatch, worker, config):
    monkeypatch.setattr(worker.evaluators["search"][0], "evaluate", raising(ValueError("lm-eval broke")))
    return config, "ValueError: lm-eval broke"


def cuda_out_of_memory(monkeypatch, worker, config):
    monkeypatch.setattr(
        worker.evaluators["search"][0],
        "evaluate",
        raising(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")),
    )
    return config, "CUDA out of memory in this candidate"


@pytest.mark.parametrize(
    "fault",
    [break_merge, nan_after_merge, overflowing_weights, break_evaluation, cuda_out_of_memory],
    ids=lambda f: f.__name__,
)
def test_a_failing_candidate_is_a_failed_result_and_the_worker_serves_on(worker, monkeypatch, fault):
    merge_worker, good, good_score = worker
    config, reason = fault(monkeypatch, merge_worker, good)
    failed = merge_worker.evaluate(7, config)
    assert (failed.trial, failed.ok, failed.worker) == (7, False, merge_worker.worker_id)
    assert reason in failed.reason
    monkeypatch.undo()
    assert merge_worker.evaluate(8, good).score == good_score, "the failure leaked into the next candidate"


@pytest.mark.slow
def test_failing_candidates_in_a_real_search_are_counted_and_told_to_the_optimizer(tmp_path, zoo, ray_head):
    """An expert whose final norm is 3e37 overflows float32 once its weight passes ~11, so CMA-ES's
    candidates (weights up to 100, the sane limit) fail; baselines that score it alone may fail too."""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from evomerge.cli import app

    address, env = ray_head
    loud = tmp_path / "loud"
    shutil.copytree(zoo["odd"], loud)
    tensors = load_file(loud / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], 3e37)
    save_file(tensors, loud / "model.safetensors", metadata={"format": "pt"})
    spec_path = write_spec(
        tmp_path,
        zoo,
        "overflow",
        models={"base": zoo["base"], "experts": [zoo["even"], str(loud)]},
        merge={"method": "task_arithmetic"},
        genome={"layer_groups": 2, "bounds": {"weight": [0.0, 100.0]}},
        budget={"max_evals": 15},
    )
    finished = evomerge(env, "search", spec_path, "--address", address)
    assert finished.returncode == 0, finished.stderr[-3000:]
    run_dir = tmp_path / "runs" / "overflow"
    failed = [e for e in journal(run_dir) if e["event"] == "failed"]
    overflowed = [e for e in failed if e["trial"] >= 0 and "merged weights are not finite" in e["reason"]]
    assert overflowed, [(e["trial"], e["reason"]) for e in failed]
    asked = {e["trial"] for e in journal(run_dir) if e["event"] == "asked"}
    assert {4, 5, 6, 7} <= asked, "CMA-ES reached generation 1, so generation 0's failures were told"
    shown = CliRunner().invoke(app, ["status", str(run_dir)]).stdout
    assert f"failed: {len(failed)}" in shown and f"completed: {15 - len(failed)}" in shown


def test_journal_write_on_a_full_disk_fails_cleanly_and_leaves_the_journal_intact(tmp_path):
    class DiskFull(io.FileIO):
        """The journal file on a disk with `room` bytes left: a short write, then ENOSPC."""

        def __init__(self, path, room):
            super().__init__(path, "ab")
            self.room = room

        def write(self, data):
            if self.room <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data = bytes(data)[: self.room]
            self.room -= len(data)
            return super().write(data)

    journal_ = Journal(tmp_path)
    before = [journal_.append("asked", trial=t, **asked(merge_config={"merge_method": "ties"})) for t in range(3)]
    journal_._syncer.wait()  # the background fsync of those lines is done before the disk "fills"
    journal_._handle.close()
    journal_._handle = io.BufferedWriter(DiskFull(journal_.path, room=25))
    with pytest.raises(UserError, match="No space left on device.*evomerge resume"):
        journal_.append("completed", trial=0, score=0.5, metrics={"tiny_add": 0.5})
    assert journal_.path.read_bytes().endswith(b"\n"), "a partial line was left behind"
    assert read_events(journal_.path) == before
    journal_.append("completed", trial=0, score=0.5)  # space is back: the journal carries on
    assert [e["event"] for e in read_events(journal_.path)] == ["asked"] * 3 + ["completed"]
    journal_.close()


def test_snapshot_write_on_a_full_disk_fails_cleanly(tmp_path, monkeypatch):
    journal_ = Journal(tmp_path)
    journal_.append("asked", trial=0, **asked())
    journal_._syncer.wait()  # only the snapshot's own fsync meets the full disk

    def no_space(_descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(UserError, match="No space left on device"):
        journal_.write_snapshot(b"optimizer state", after_events=1)
    monkeypatch.undo()
    assert [e["event"] for e in read_events(journal_.path)] == ["asked"]
    assert not list((tmp_path / "optimizer").glob("*.tmp")), "a half-written snapshot was left behind"
    journal_.close()


@pytest.mark.parametrize(
    "tail",
    [b'{"event":"completed","tri', b'{"event":"completed","tri\n', b"\x00\x00\x00\x00"],
    ids=["partial-line", "partial-line-with-newline", "zero-filled"],
)
def test_a_torn_last_line_is_dropped_with_a_warning_and_never_poisons_the_journal(tmp_path, tail, caplog):
    journal_ = Journal(tmp_path)
    journal_.append("asked", trial=0, **asked())
    journal_.close()
    with journal_.path.open("ab") as handle:
        handle.write(tail)
    with caplog.at_level(logging.WARNING):
        journal_ = Journal(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{journal_.path}: dropped a torn last line (the driver was killed while writing it)"
    ]
    journal_.append("completed", trial=0, score=1.0)
    journal_.close()
    assert [e["event"] for e in read_events(journal_.path)] == ["asked", "completed"]


@pytest.mark.slow
def test_run_directory_is_json_and_yaml_with_pickles_only_for_hashed_optimizer_snapshots(reference_run):
    snapshots = {e["file"]: e["sha256"] for e in journal(reference_run) if e["event"] == "snapshot"}
    for path in (p for p in reference_run.rglob("*") if p.is_file()):
        relative = path.relative_to(reference_run)
        if relative.parts[0] == "optimizer":
            assert path.suffix == ".pkl" and hashlib.sha256(path.read_bytes()).hexdigest() == snapshots[path.name]
        else:
            assert not path.read_bytes().startswith(b"\x80"), f"{relative} is a pickle"
    yaml.safe_load((reference_run / "spec.yaml").read_text())
    assert all(json.loads(line) for line in (reference_run / "journal.jsonl").read_text().splitlines())
    assert snapshots, "the run wrote optimizer snapshots"


def test_journal_fsyncs_in_the_background_and_close_waits_for_the_last_one(tmp_path, monkeypatch):
    import threading

    disk_free, synced_sizes, real_fsync = threading.Event(), [], os.fsync

    def stuck_fsync(descriptor):
        disk_free.wait(timeout=60)  # a disk that hangs until the test lets it go
        real_fsync(descriptor)
        synced_sizes.append(os.fstat(descriptor).st_size)

    monkeypatch.setattr(os, "fsync", stuck_fsync)
    journal_ = Journal(tmp_path)
    for trial in range(20):  # would hang here if an append waited for its fsync
        journal_.append("completed", trial=trial, score=0.5)
    assert synced_sizes == [] and len(read_events(journal_.path)) == 20, "appends are flushed to the OS at once"
    disk_free.set()
    journal_.close()
    assert synced_sizes[-1] == journal_.path.stat().st_size, "close returned before the last line was fsynced"
    assert len(synced_sizes) <= 2, "requests that piled up were not coalesced into one fsync"


def test_a_failed_background_fsync_is_reported_on_the_next_append(tmp_path, monkeypatch):
    journal_ = Journal(tmp_path)
    journal_.append("asked", trial=0, **asked())
    journal_._syncer.wait()

    def failing_fsync(_descriptor):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    journal_.append("completed", trial=0, score=0.5)
    journal_._syncer.wait(raise_failure=False)
    monkeypatch.undo()
    with pytest.raises(UserError, match="Input/output error.*evomerge resume"):
        journal_.append("completed", trial=1, score=0.5)
    journal_.append("completed", trial=1, score=0.5)  # the disk is back: the journal carries on
    journal_.close()
    assert [e.get("trial") for e in read_events(journal_.path)] == [0, 0, 1]


def test_a_second_ctrl_c_while_the_cluster_stops_cannot_cut_the_stop_short(monkeypatch):
    """Stopping Ray takes seconds; a Ctrl-C or SIGTERM meanwhile is answered and ignored, then the
    caller's handlers come back."""
    import ray

    from evomerge.search.cluster import ClusterSession

    session = ClusterSession(spec=None, address=None)
    session.connected = True  # as after open(): close() stops what it started
    stopped = []

    def shutdown_interrupted_twice():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        stopped.append(True)

    monkeypatch.setattr(ray, "shutdown", shutdown_interrupted_twice)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    session.close()
    assert stopped == [True], "the stop ran to its end"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.slow  # the installed command: about 10 s of imports and scoring
def test_eval_keeps_library_progress_bars_and_notices_off_the_terminal(zoo, tmp_path):
    spec = write_spec(tmp_path, zoo, "quiet-eval", evaluation={**HELDOUT_EVAL, "limit": 8})
    shown = evomerge(
        {**os.environ, "HF_HUB_OFFLINE": "1"}, "eval", spec, "--model", zoo["even"], "--backend", "lm_eval", timeout=300
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr.strip() == "", shown.stderr
    assert "score:" in shown.stdout


def test_after_the_first_ctrl_c_another_is_answered_and_ignored_until_the_cluster_has_stopped(monkeypatch):
    import ray

    from evomerge.errors import Stopped
    from evomerge.search.cluster import ClusterSession

    monkeypatch.setattr(ray, "shutdown", lambda: None)
    # A parent that ignores SIGINT (a shell's background job) would leave it ignored: Ctrl-C as in a terminal.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGINT)
    session = ClusterSession(spec=None, address=None)
    session.connected = True
    session._interrupt_on_termination()
    with pytest.raises(Stopped) as stopped:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert stopped.value.exit_code == 130
    os.kill(os.getpid(), signal.SIGINT)  # while unwinding: ignored, the cleanup below still runs
    session.close()
    assert signal.getsignal(signal.SIGINT) == before
    signal.signal(signal.SIGINT, outer)
