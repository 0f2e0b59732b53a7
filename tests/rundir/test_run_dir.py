"""The run directory: always inside runs_dir, the spec frozen first, and a frozen spec that was
damaged or edited refused on resume in one line."""

from __future__ import annotations

import hashlib

import pytest
import yaml
from fake_workers import fake_spec_data

from evomerge.errors import UserError
from evomerge.rundir.journal import read_events
from evomerge.rundir.layout import RunDir
from evomerge.search.runs import create_run_dir, open_run
from evomerge.spec import parse_spec


def fake_spec(tmp_path, name="run"):
    return parse_spec(fake_spec_data(tmp_path / "runs", name), "spec", tmp_path)


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../escape"])
def test_a_run_name_that_is_not_one_plain_folder_is_refused_before_anything_is_written(tmp_path, name):
    spec = fake_spec(tmp_path).model_copy(update={"name": name})  # as if the spec's own check let it through
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match="name: .* is not a plain folder name") as refused:
        create_run_dir(spec)
    assert "\n" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["runs"], "nothing was written anywhere"


def test_a_run_folder_that_links_outside_runs_dir_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "run").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="outside runs_dir"):
        create_run_dir(fake_spec(tmp_path))
    assert not list((tmp_path / "elsewhere").iterdir())


def test_the_spec_is_frozen_first_and_its_hash_is_the_first_event(tmp_path):
    run = RunDir(create_run_dir(fake_spec(tmp_path)))
    assert run.root == (tmp_path / "runs" / "run").resolve()
    events = read_events(run.journal)
    assert [e["event"] for e in events] == ["run_created"]
    assert events[0]["spec_sha256"] == hashlib.sha256(run.spec.read_bytes()).hexdigest()
    assert run.spec.stat().st_mtime_ns <= run.journal.stat().st_mtime_ns
    assert open_run(run.root)[1] == fake_spec(tmp_path)


def test_a_spec_edited_before_the_search_journaled_run_started_is_refused(tmp_path):
    run = RunDir(create_run_dir(fake_spec(tmp_path)))  # the driver was killed before run_started
    frozen = yaml.safe_load(run.spec.read_text())
    frozen["budget"]["max_evals"] = 100000
    run.spec.write_text(yaml.safe_dump(frozen))
    with pytest.raises(UserError, match="spec.yaml: the spec was changed after the run started") as refused:
        open_run(run.root)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "damage",
    [b"name: run\n\xe9\xff\n", "name: run\n".encode("utf-16"), b"name: [unclosed\n", b"[" * 20000 + b"]" * 20000],
    ids=["latin-1-byte", "utf-16", "malformed-yaml", "20000-deep"],
)
def test_a_damaged_frozen_spec_is_one_line_naming_it(tmp_path, damage):
    run = RunDir(create_run_dir(fake_spec(tmp_path)))
    journal = run.journal.read_bytes()
    # A run journaled before the spec's hash (its run_started has no input fingerprints): parsing is
    # what is left to fail.
    run.journal.write_bytes(b'{"event":"run_started","time":1.0,"spec_fingerprint":"0","workers":1}\n')
    run.spec.write_bytes(damage)
    with pytest.raises(UserError) as refused:
        open_run(run.root)
    message = str(refused.value)
    assert message.startswith(f"{run.spec}: ") and "\n" not in message, message
    run.journal.write_bytes(journal)  # with the hash journaled, the same damage is an edit
    with pytest.raises(UserError, match="the spec was changed after the run started"):
        open_run(run.root)


def test_resuming_a_folder_that_is_not_a_run_names_it(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        open_run(tmp_path)
