"""Resume checks its inputs: the model folders and evaluation files fingerprinted at run_started.

A changed weight file, config, task YAML or data file refuses `evomerge resume` in one line naming
the file (exit 2, before Ray starts) unless --accept-changed-inputs; weight files are sampled, never
read whole; runs journaled before fingerprints existed resume without the check.
"""

from __future__ import annotations

import builtins
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_workers import FIXTURE_RUNS, fake_scheduler, open_search
from safetensors.numpy import save_file
from search_zoo import FIXTURE_EVALS
from typer.testing import CliRunner

from evomerge.errors import UserError
from evomerge.rundir.journal import read_events
from evomerge.search import inputs
from evomerge.search.inputs import SAMPLE_BYTES, SAMPLE_COUNT, first_change, model_folder_digests
from evomerge.search.runs import open_run


def weights_folder(folder: Path, megabytes: int = 8) -> Path:
    folder.mkdir(parents=True)
    values = np.arange(megabytes * 1024 * 1024 // 4, dtype=np.float32)
    save_file({"model.embed_tokens.weight": values.reshape(-1, 256)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text('{"model": {}}')
    (folder / "README.md").write_text("not an input")
    return folder


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_weight_files_are_fingerprinted_by_size_header_and_samples_without_a_full_read(tmp_path, monkeypatch):
    folder = weights_folder(tmp_path / "model")
    weights = folder / "model.safetensors"
    read = []
    real_open = builtins.open

    def counting_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        real_read = handle.read
        handle.read = lambda *a: read.append(len(data := real_read(*a))) or data  # type: ignore[method-assign]
        return handle

    monkeypatch.setattr(inputs, "open", counting_open, raising=False)
    before = model_folder_digests(folder)
    monkeypatch.undo()
    assert sorted(Path(p).name for p in before) == ["config.json", "model.safetensors", "tokenizer.json"]
    header = int.from_bytes(weights.read_bytes()[:8], "little")
    assert sum(read) <= 8 + header + SAMPLE_COUNT * SAMPLE_BYTES + 200, "more than the header and the samples"
    assert weights.stat().st_size > 10 * sum(read)

    flip_byte(weights, weights.stat().st_size - 10)  # inside the last sampled range
    assert first_change(before, model_folder_digests(folder)) == f"{weights}: changed since the run started"
    flip_byte(weights, weights.stat().st_size - 10)
    assert first_change(before, model_folder_digests(folder)) is None
    (folder / "config.json").write_text('{"model_type": "mistral"}')
    assert (
        first_change(before, model_folder_digests(folder)) == f"{folder / 'config.json'}: changed since the run started"
    )


def test_first_change_names_a_missing_or_new_file_and_skips_digests_of_another_scheme():
    journaled = {"/m/a.safetensors": "sampled-v1:aa", "/m/config.json": "sha256:bb"}
    assert (
        first_change(journaled, {"/m/a.safetensors": "sampled-v1:aa"})
        == "/m/config.json: missing since the run started"
    )
    grown = {**journaled, "/m/b.safetensors": "sampled-v1:cc"}
    assert first_change(journaled, grown) == "/m/b.safetensors: new since the run started"
    assert first_change(journaled, {**journaled, "/m/a.safetensors": "sampled-v2:zz"}) is None


@pytest.fixture
def real_run(zoo, tmp_path):
    """A run over copies of tiny models and of the fixture tasks, searched by fake workers."""
    from evomerge.preflight import preflight
    from evomerge.search.loop import Search
    from evomerge.search.runs import create_run_dir
    from evomerge.spec import load_spec

    models = {name: shutil.copytree(zoo.model(name), tmp_path / "models" / name) for name in ("base", "ft_a", "ft_b")}
    evals = shutil.copytree(FIXTURE_EVALS, tmp_path / "evals")
    spec = {
        "name": "inputs",
        "runs_dir": str(tmp_path / "runs"),
        "models": {"base": str(models["base"]), "experts": [str(models["ft_a"]), str(models["ft_b"])]},
        "genome": {"layer_groups": 2},
        "optimizer": {"name": "cmaes", "seed": 0, "popsize": 4},
        "evaluation": {"include": [str(evals)], "tasks": ["tiny_add"], "heldout_tasks": ["tiny_choice"], "top_k": 1},
        "budget": {"max_evals": 10},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    prepared = preflight(load_spec(tmp_path / "spec.yaml"))
    run_dir = create_run_dir(prepared.spec)
    Search(prepared, run_dir, progress=False).run_with(fake_scheduler())
    return unfinished(run_dir), models, evals


def unfinished(run_dir: Path) -> Path:
    """The run as a driver killed before its last line leaves it: a finished run resumes to nothing, checks included."""
    journal = run_dir / "journal.jsonl"
    journal.write_text("".join(line for line in journal.read_text().splitlines(True) if "run_finished" not in line))
    return run_dir


def resume_in_process(run_dir: Path, *options: str):
    from evomerge.cli import app

    return CliRunner().invoke(app, ["resume", str(run_dir), *options])


@pytest.mark.parametrize(
    "change",
    ["expert-weights", "base-config", "tokenizer", "task-yaml", "included-yaml", "function-code", "data-file"],
)
def test_resume_refuses_a_changed_input_in_one_line_naming_it_before_ray_starts(real_run, monkeypatch, change):
    run_dir, models, evals = real_run
    journaled = [e for e in read_events(run_dir / "journal.jsonl") if e["event"] == "run_started"][0]["inputs"]
    changed = {
        "expert-weights": models["ft_b"] / "model.safetensors",
        "base-config": models["base"] / "config.json",
        "tokenizer": models["ft_a"] / "tokenizer.json",
        "task-yaml": evals / "tiny_choice.yaml",
        "included-yaml": evals / "tiny_add.yaml",
        "function-code": evals / "utils.py",
        "data-file": evals / "data" / "tiny.jsonl",
    }[change]
    assert str(changed) in journaled
    if change == "expert-weights":
        flip_byte(changed, changed.stat().st_size - 3)
    else:
        changed.write_text(changed.read_text() + "\n\n")
    monkeypatch.setattr("evomerge.search.cluster.connect", lambda *a: pytest.fail("Ray started"))
    refused = resume_in_process(run_dir)
    lines = refused.stderr.strip().splitlines()
    assert refused.exit_code == 2 and len(lines) == 1, refused.stderr
    assert lines[0] == (
        f"error: {changed}: changed since the run started; restore it, or run "
        f"'evomerge resume {run_dir} --accept-changed-inputs' to go on with the changed inputs"
    )


def test_accepted_changed_inputs_become_the_reference_for_later_resumes(real_run, caplog):
    from evomerge.preflight import preflight
    from evomerge.search.loop import Search

    run_dir, _, evals = real_run
    data = evals / "data" / "tiny.jsonl"
    data.write_text(data.read_text() + "\n")
    run, spec, _ = open_run(run_dir)
    with pytest.raises(UserError, match="tiny.jsonl: changed since the run started"):
        Search(preflight(spec), run, progress=False).run_with(fake_scheduler())
    with caplog.at_level(logging.WARNING):
        Search(preflight(spec), run, progress=False, accept_changed_inputs=True).run_with(fake_scheduler())
    assert "tiny.jsonl: changed since the run started; going on with the changed inputs" in caplog.text
    unfinished(run_dir)
    Search(preflight(spec), run, progress=False).run_with(fake_scheduler())  # the new fingerprints stand now
    started = [e for e in read_events(run_dir / "journal.jsonl") if e["event"] == "run_started"]
    assert len(started) == 3 and started[0]["inputs"][str(data)] != started[1]["inputs"][str(data)]


def test_a_run_journaled_before_input_fingerprints_resumes_without_the_check(tmp_path):
    run_dir = unfinished(shutil.copytree(FIXTURE_RUNS / "v0-cmaes", tmp_path / "v0"))
    run, spec, _ = open_run(run_dir)
    open_search(spec, run, inputs={"/frozen-run/base/config.json": "sha256:aa"}).run_with(fake_scheduler())
    unfinished(run_dir)
    with pytest.raises(UserError, match="config.json: changed since the run started"):
        open_search(spec, run, inputs={"/frozen-run/base/config.json": "sha256:bb"}).run_with(fake_scheduler())
