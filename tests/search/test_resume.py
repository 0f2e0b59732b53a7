"""Resume on the real Search and Scheduler with in-process fake workers (tests/fake_workers.py):
a damaged optimizer snapshot costs only a full replay, the time limit spans every start of a run,
JSON-valid junk and repeated results in the journal are skipped with one warning line each, and
a NaN or infinity never reaches the journal."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_workers import FakeCalls, FakeWorker, fake_scheduler, fake_spec_data, open_search

from evomerge.rundir.events import TrialResult
from evomerge.rundir.journal import read_events
from evomerge.rundir.results import status
from evomerge.search.runs import create_run_dir, open_run
from evomerge.spec import parse_spec

EVOMERGE = Path(sys.executable).with_name("evomerge")


def new_run(tmp_path: Path, name: str, **sections):
    spec = parse_spec(fake_spec_data(tmp_path / "runs", name, **sections), "spec", tmp_path)
    return spec, create_run_dir(spec)


def finished_run(tmp_path: Path, name: str, scheduler=None, **sections) -> Path:
    spec, run_dir = new_run(tmp_path, name, **sections)
    open_search(spec, run_dir).run_with(scheduler or fake_scheduler())
    return run_dir


def lines_of(run_dir: Path) -> list[bytes]:
    return (run_dir / "journal.jsonl").read_bytes().splitlines(keepends=True)


def cut(run_dir: Path, keep: int) -> None:
    """What a driver killed right after its `keep`-th journal line leaves."""
    (run_dir / "journal.jsonl").write_bytes(b"".join(lines_of(run_dir)[:keep]))


def resume(run_dir: Path, scheduler=None, **options) -> None:
    run, spec, _ = open_run(run_dir)
    open_search(spec, run, **options).run_with(scheduler or fake_scheduler())


def search_state(run_dir: Path) -> dict:
    events = read_events(run_dir / "journal.jsonl")
    scores = {e["trial"]: e.get("score") for e in events if e["event"] in ("completed", "failed")}
    return {
        "asked": {e["trial"]: (e["x"], scores.get(e["trial"])) for e in events if e["event"] == "asked"},
        "heldout": {e["trial"]: e["score"] for e in events if e["event"] == "heldout"},
    }


def first_line(run_dir: Path, event: str) -> int:
    return next(i for i, line in enumerate(lines_of(run_dir)) if json.loads(line)["event"] == event)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted fake run every resumed one must reproduce."""
    return finished_run(tmp_path_factory.mktemp("reference"), "reference")


def damaged_snapshot(run_dir: Path, how: str) -> None:
    """Damage the snapshot the cut journal names last, as a disk or a careless user would."""
    snapshot = [json.loads(line) for line in lines_of(run_dir) if json.loads(line)["event"] == "snapshot"][-1]
    blob = run_dir / "optimizer" / snapshot["file"]
    if how == "missing":
        blob.unlink()
    elif how == "hash-mismatch":
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    else:  # the journal vouches for the bytes, but they are no snapshot (a bug, or another version's format)
        import hashlib

        garbage = b"not a pickle"
        blob.write_bytes(garbage)
        text = (run_dir / "journal.jsonl").read_text().replace(snapshot["sha256"], hashlib.sha256(garbage).hexdigest())
        (run_dir / "journal.jsonl").write_text(text)


@pytest.mark.parametrize("how", ["missing", "hash-mismatch", "unreadable"])
def test_a_damaged_snapshot_is_skipped_with_a_warning_and_a_full_replay_resumes_exactly(
    tmp_path, reference, caplog, how
):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    cut(run_dir, first_line(run_dir, "snapshot") + 4)  # a snapshot, then generation 1 under way
    damaged_snapshot(run_dir, how)
    with caplog.at_level(logging.WARNING):
        resume(run_dir)
    warned = [r.getMessage() for r in caplog.records if "replaying the whole journal instead" in r.getMessage()]
    assert len(warned) == 1 and "optimizer/" in warned[0] and "\n" not in warned[0], caplog.text
    assert search_state(run_dir) == search_state(reference)


class FakeClock:
    def __init__(self) -> None:
        self.seconds = 0.0

    def now(self) -> float:
        return self.seconds

    def tick(self) -> None:
        self.seconds += 10.0  # each poll of the fake workers takes 10 s of search time


def timed_search(run_dir: Path) -> None:
    clock = FakeClock()
    run, spec, _ = open_run(run_dir)
    search = open_search(spec, run)
    search.clock = clock.now
    search.run_with(fake_scheduler(FakeCalls(on_poll=clock.tick)))


def test_a_resumed_run_does_not_get_a_fresh_time_budget(tmp_path):
    sections = {"budget": {"max_evals": 200, "time_limit_min": 1}}
    _, reference_dir = new_run(tmp_path, "uninterrupted", **sections)
    timed_search(reference_dir)
    finished = [e for e in read_events(reference_dir / "journal.jsonl") if e["event"] in ("completed", "failed")]
    assert 5 < len(finished) < 15 and finished[-1]["search_s"] >= 60, "the one-minute limit ended the search"

    run_dir = tmp_path / "resumed"
    shutil.copytree(reference_dir, run_dir)
    cut(run_dir, first_line(run_dir, "completed") + 6)  # killed after 40 of the 60 seconds
    kept = [e for e in read_events(run_dir / "journal.jsonl") if e["event"] in ("completed", "failed")]
    assert 0 < kept[-1]["search_s"] < 60
    timed_search(run_dir)
    resumed = [e for e in read_events(run_dir / "journal.jsonl") if e["event"] in ("completed", "failed")]
    assert len(resumed) == len(finished), "the resumed run stopped where the uninterrupted one did"
    assert resumed[-1]["search_s"] == finished[-1]["search_s"]


JUNK = [b"{}\n", b"123\n", b"[]\n", b'{"event":"completed"}\n']


def with_junk(run_dir: Path) -> dict[int, str]:
    """Junk lines and a repeated (different) result spread over the journal; line number -> what."""
    lines = lines_of(run_dir)
    first_result = first_line(run_dir, "completed")
    repeated = json.loads(lines[first_result])
    repeated["score"] = 0.123
    lines.insert(first_result + 3, (json.dumps(repeated) + "\n").encode())
    for offset, junk in enumerate(JUNK):
        lines.insert(2 + 5 * offset, junk)
    (run_dir / "journal.jsonl").write_bytes(b"".join(lines))
    return {number: line.decode().strip() for number, line in enumerate(lines, start=1) if line in JUNK} | {
        number: "repeated"
        for number, line in enumerate(lines, start=1)
        if line.strip() == json.dumps(repeated).encode()
    }


def test_junk_lines_and_a_repeated_result_are_skipped_with_one_warning_each(tmp_path, reference, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    cut(run_dir, first_line(run_dir, "snapshot") + 2)
    skipped = with_junk(run_dir)
    with caplog.at_level(logging.WARNING):
        figures = status(run_dir)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(skipped) == 5 and not any("\n" in m for m in messages), messages
    assert all(any(f"skipping line {n} " in m for m in messages) for n in skipped), messages
    assert "a second result for trial -1; the first one is kept" in caplog.text
    assert figures["completed"] + figures["failed"] == len(search_state(run_dir)["asked"]) - figures["in_flight"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resume(run_dir)
    assert sorted(r.getMessage() for r in caplog.records) == sorted(messages), "resume warns once per line too"
    assert search_state(run_dir) == search_state(reference), "the first of the repeated results stands"


def test_status_prints_each_skipped_or_torn_line_as_one_warning_line_without_source(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    skipped = with_junk(run_dir)
    with (run_dir / "journal.jsonl").open("ab") as handle:
        handle.write(b'{"event":"heldout","trial":-')  # torn by a kill
    shown = subprocess.run([str(EVOMERGE), "status", str(run_dir)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    warnings = shown.stderr.strip().splitlines()
    assert len(warnings) == len(skipped) + 1, shown.stderr
    assert all(f"line {n} " in line for n, line in zip(sorted(skipped), warnings[:-1], strict=True)), warnings
    assert "dropping a torn last line" in warnings[-1]
    assert not any(marker in shown.stderr for marker in ("Warning:", "warnings.warn", ".py:", "Traceback"))


def forbid_nan(text: str):
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the journal"))


class NonFiniteWorker(FakeWorker):
    """Trial 1 scores NaN, trial 2 has an infinite perplexity metric, base's held-out score is inf."""

    def evaluate(self, trial_id, merge_config, eval_set="search", race=None):
        result = super().evaluate(trial_id, merge_config, eval_set)
        if eval_set == "search" and trial_id == 1:
            return TrialResult(**{**result.to_journal(), "score": math.nan})
        if eval_set == "search" and trial_id == 2:
            return TrialResult(**{**result.to_journal(), "metrics": {"tiny_add": result.score, "ppl": math.inf}})
        if eval_set == "heldout" and trial_id == -1:
            return TrialResult(**{**result.to_journal(), "score": math.inf})
        return result


def test_non_finite_scores_and_metrics_are_failed_candidates_and_never_reach_the_journal(tmp_path):
    from evomerge.search.scheduler import Scheduler

    scheduler = Scheduler(lambda index: NonFiniteWorker(f"w{index}"), 1, 2, FakeCalls())
    run_dir = finished_run(tmp_path, "nan", scheduler)
    events = [forbid_nan(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    failed = {e["trial"]: e["reason"] for e in events if e["event"] == "failed"}
    assert failed[1] == "score is not finite (nan)" and failed[2] == "metric ppl is not finite (inf)"
    assert not any("score" in e for e in events if e["event"] == "failed")
    heldout = {e["trial"]: e for e in events if e["event"] == "heldout"}
    assert heldout[-1]["ok"] is False and heldout[-1]["reason"] == "score is not finite (inf)"
    assert events[-1]["event"] == "run_finished" and {4, 5, 6, 7} <= {e["trial"] for e in events if "x" in e}
    assert status(run_dir)["failed"] == 3
