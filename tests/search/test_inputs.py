"""Resume checks its inputs: the model folders and evaluation files fingerprinted at run_started.

A changed weight file (one tensor anywhere in it), config, task YAML or data file refuses
`evomerge resume` in one line naming the file (exit 2, before Ray starts) unless
--accept-changed-inputs; a weight file is read whole once, then known by its stat from the cache;
runs journaled before fingerprints existed resume without the check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fake_workers import FIXTURE_RUNS, fake_scheduler, open_search
from safetensors.numpy import save_file
from search_zoo import FIXTURE_EVALS
from typer.testing import CliRunner

from evomerge.errors import UserError
from evomerge.rundir.journal import read_events
from evomerge.search import inputs
from evomerge.search.inputs import (
    SAMPLE_BYTES,
    SAMPLE_COUNT,
    DigestCache,
    first_change,
    model_folder_digests,
    sampled_digest,
)
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


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch) -> Path:
    """The weight digests' cache of this test alone."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache" / "evomerge" / "file-digests.json"


def settled(path: Path) -> Path:
    """The file as one written an hour ago: its digest may be cached."""
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    return path


def counted_full_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    real = inputs.file_sha256
    monkeypatch.setattr(inputs, "file_sha256", lambda path: reads.append(Path(path).name) or real(path))
    return reads


def fingerprint(folder: Path) -> dict[str, str]:
    """A folder's digests as a run's start computes them: through the user's cache."""
    cache = DigestCache.load()
    digests = model_folder_digests(folder, cache)
    cache.save()
    return digests


def test_a_weight_file_is_read_whole_once_and_then_known_by_its_stat_from_the_cache(
    tmp_path, monkeypatch, digest_cache
):
    folder = weights_folder(tmp_path / "model")
    weights = settled(folder / "model.safetensors")
    reads = counted_full_reads(monkeypatch)
    first = fingerprint(folder)
    assert sorted(Path(p).name for p in first) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert first[str(weights)] == f"full-v1:{hashlib.sha256(weights.read_bytes()).hexdigest()}"
    assert reads == ["model.safetensors"]
    cached = json.loads(digest_cache.read_text())["files"][str(weights)]
    assert cached["digest"] == first[str(weights)] and cached["stat"][0] == weights.stat().st_size

    assert fingerprint(folder) == first and reads == ["model.safetensors"], "an unchanged file was read again"
    flip_byte(weights, weights.stat().st_size // 2)
    assert fingerprint(folder)[str(weights)] != first[str(weights)] and len(reads) == 2
    # Written a moment ago: a change within the clock's tick would keep the stat, so not cached yet.
    assert fingerprint(folder) and len(reads) == 3


def test_a_file_in_the_hugging_face_cache_is_known_by_its_blob_name_without_a_read(tmp_path, monkeypatch):
    content = (weights_folder(tmp_path / "plain") / "model.safetensors").read_bytes()
    sha = hashlib.sha256(content).hexdigest()
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / sha).write_bytes(content)
    snapshot = tmp_path / "hub" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(f"../../blobs/{sha}")
    reads = counted_full_reads(monkeypatch)
    assert fingerprint(snapshot) == {str(snapshot / "model.safetensors"): f"full-v1:{sha}"}
    assert reads == []
    assert fingerprint(tmp_path / "plain")[str(tmp_path / "plain" / "model.safetensors")] == f"full-v1:{sha}"


def test_a_run_journaled_with_sampled_weight_digests_is_still_checked_in_that_scheme(tmp_path):
    folder = weights_folder(tmp_path / "model")
    weights = folder / "model.safetensors"
    journaled = {**model_folder_digests(folder), str(weights): sampled_digest(weights)}
    assert journaled[str(weights)].startswith("sampled-v1:")
    assert first_change(journaled, model_folder_digests(folder)) is None
    flip_byte(weights, weights.stat().st_size - 10)  # inside the last sampled range
    assert first_change(journaled, model_folder_digests(folder)) == f"{weights}: changed since the run started"


def test_first_change_names_a_missing_or_new_file_and_skips_digests_of_another_scheme():
    journaled = {"/m/a.safetensors": "full-v1:aa", "/m/config.json": "sha256:bb"}
    assert (
        first_change(journaled, {"/m/a.safetensors": "full-v1:aa"}) == "/m/config.json: missing since the run started"
    )
    grown = {**journaled, "/m/b.safetensors": "full-v1:cc"}
    assert first_change(journaled, grown) == "/m/b.safetensors: new since the run started"
    assert first_change(journaled, {**journaled, "/m/a.safetensors": "full-v2:zz"}) is None


@pytest.fixture
def real_run(zoo, tmp_path):
    """A run over copies of tiny models and of the fixture tasks, searched by fake workers."""
    models = {name: shutil.copytree(zoo.model(name), tmp_path / "models" / name) for name in ("base", "ft_a", "ft_b")}
    return searched_run(tmp_path, models), models, tmp_path / "evals"


@pytest.fixture
def wide_run(tmp_path):
    """A run like `real_run`'s over wider models (7 MB files): the sampled windows cover a fraction of each."""
    from tiny_models import (
        build_base,
        build_tokenizer,
        finetune_deltas,
        save_checkpoint,
        tiny_llama_config,
        with_deltas,
    )

    base = build_base(tiny_llama_config(hidden_size=256), seed=0)
    members = {
        "base": base,
        **{name: with_deltas(base, finetune_deltas(base, seed, 0.02)) for name, seed in [("ft_a", 1), ("ft_b", 2)]},
    }
    models = {name: tmp_path / "models" / name for name in members}
    for name, model in members.items():
        save_checkpoint(model, build_tokenizer(64), models[name], torch.float32)
    return searched_run(tmp_path, models), models


def searched_run(tmp_path: Path, models: dict[str, Path]) -> Path:
    from evomerge.preflight import preflight
    from evomerge.search.loop import Search
    from evomerge.search.runs import create_run_dir
    from evomerge.spec import load_spec

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
    return unfinished(run_dir)


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


def test_resume_refuses_an_expert_with_one_tensor_zeroed_outside_every_sampled_window(wide_run, monkeypatch):
    run_dir, models = wide_run
    weights = models["ft_b"] / "model.safetensors"
    size = weights.stat().st_size
    windows = [(i * (size - SAMPLE_BYTES) // (SAMPLE_COUNT - 1), SAMPLE_BYTES) for i in range(SAMPLE_COUNT)]
    sampled_before = sampled_digest(weights)
    begin, end = tensor_outside(weights, windows)
    with open(weights, "r+b") as handle:  # in place: same size, same inode, same header
        handle.seek(begin)
        handle.write(bytes(end - begin))
    assert weights.stat().st_size == size and sampled_digest(weights) == sampled_before, "the samples would see it"
    monkeypatch.setattr("evomerge.search.cluster.connect", lambda *a: pytest.fail("Ray started"))
    refused = resume_in_process(run_dir)
    assert refused.exit_code == 2 and refused.stderr.strip().splitlines() == [
        f"error: {weights}: changed since the run started; restore it, or run "
        f"'evomerge resume {run_dir} --accept-changed-inputs' to go on with the changed inputs"
    ]


def tensor_outside(path: Path, windows: list[tuple[int, int]]) -> tuple[int, int]:
    """Byte range (in the file) of a tensor in the file's middle half that no window touches."""
    length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + length])
    size = path.stat().st_size
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = (8 + length + offset for offset in entry["data_offsets"])
        clear = all(end <= start or begin >= start + width for start, width in windows)
        if clear and size // 4 <= begin and end <= 3 * size // 4 and end - begin >= 4096:
            return begin, end
    raise AssertionError(f"no tensor of {path} lies outside the sampled windows")


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
