"""What `evomerge merge` leaves at OUT: a complete merge or nothing new, never a mix; and a model card.

The refusals (OUT an input, not empty, unwritable, non-finite merges) are in test_merge_errors.py;
these are the cases that succeed, or fail after the merge has started.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import run_cli_in_process, snapshot
from tiny_models import load_checkpoint_tensors

from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import merge_to_disk
from evomerge.merge.io import StreamingShardWriter
from evomerge.merge.output import StagedFolder

FROZEN_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "v0-cmaes"


def task_arithmetic(zoo, weight: float = 0.5) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": zoo.model("base"),
        "models": [{"model": zoo.model(name), "parameters": {"weight": weight}} for name in ("ft_a", "ft_b")],
    }


def linear(zoo, name: str) -> dict:
    return {"merge_method": "linear", "models": [{"model": zoo.model(name), "parameters": {"weight": 1.0}}]}


def merged(result) -> None:
    assert result.returncode == 0, result.stderr


def test_force_replaces_an_earlier_merge_whole(zoo, write_config, tmp_path):
    """An old model.safetensors beside new shards made from_pretrained load the old model."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    merged(run_cli_in_process("merge", write_config(linear(zoo, "ft_a"), "a.yml"), out))
    assert (out / "model.safetensors").is_file()
    # Small shards: the new merge is model-0000k-of-0000n files plus an index, no model.safetensors.
    new_config = write_config(linear(zoo, "ft_b"), "b.yml")
    assert run_cli_in_process("merge", new_config, out).returncode == 2  # not empty, no --force
    merged(run_cli_in_process("merge", new_config, out, "--force", "--shard-size-gb", "0.00005"))

    reference = tmp_path / "reference"
    merged(run_cli_in_process("merge", new_config, reference, "--shard-size-gb", "0.00005"))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yml", "b.yml", "out", "reference"]  # nothing hidden left
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = load_checkpoint_tensors(zoo.model("ft_b"))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


def test_an_existing_empty_out_needs_no_force(zoo, write_config, tmp_path):
    (tmp_path / "out").mkdir()
    merged(run_cli_in_process("merge", write_config(linear(zoo, "ft_a")), tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yml", "out"]


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way may swallow it."""


def kill_after_first_tensor(monkeypatch):
    write = StreamingShardWriter.write

    def write_once_then_die(self, name, tensor):
        write(self, name, tensor)
        raise Killed

    monkeypatch.setattr(StreamingShardWriter, "write", write_once_then_die)


def kill_at_publish(monkeypatch, seen: list):
    def publish(self):
        seen.append(snapshot(self.target))  # OUT exactly when the finished merge would move in
        raise Killed

    monkeypatch.setattr(StagedFolder, "publish", publish)


@pytest.mark.parametrize("moment", ["mid-stream", "at-publish"])
def test_interrupted_merge_leaves_out_as_it_was(moment, zoo, tmp_path, monkeypatch):
    """OUT is touched by nothing but the final rename; the staging folder is removed on the way out."""
    out = tmp_path / "out"
    merge_to_disk(MergeConfig.model_validate(linear(zoo, "ft_a")), out, progress=False)
    before, old_merge, seen = snapshot(tmp_path), snapshot(out), []
    if moment == "mid-stream":
        kill_after_first_tensor(monkeypatch)
    else:
        kill_at_publish(monkeypatch, seen)
    with pytest.raises(Killed):
        merge_to_disk(MergeConfig.model_validate(task_arithmetic(zoo)), out, progress=False, force=True)
    assert snapshot(tmp_path) == before
    assert seen == ([] if moment == "mid-stream" else [old_merge])


def test_sigterm_during_a_merge_removes_the_staging_folder(zoo, write_config, tmp_path, monkeypatch):
    """`kill` (or a job's time limit) mid-merge: exit 143, OUT as it was, no hidden staging folder left."""
    out = tmp_path / "out"
    config = write_config(task_arithmetic(zoo))
    merge_to_disk(MergeConfig.model_validate(linear(zoo, "ft_a")), out, progress=False)
    before, stray_terms = snapshot(tmp_path), []

    # Had the command not caught SIGTERM, this handler (not the default: death of the test run) gets it.
    def record(*_):
        stray_terms.append(1)

    previous = signal.signal(signal.SIGTERM, record)
    try:
        write = StreamingShardWriter.write

        def write_then_terminate(self, name, tensor):
            write(self, name, tensor)
            os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(StreamingShardWriter, "write", write_then_terminate)
        result = run_cli_in_process("merge", config, out, "--force")
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.returncode == 143 and "interrupted" in result.stderr, result.stderr  # 128 + SIGTERM
    assert not stray_terms and restored is record  # the command put the caller's handler back
    assert snapshot(tmp_path) == before


def test_allow_non_finite_writes_the_merge(zoo, write_config, tmp_path):
    out = tmp_path / "out"
    merged(run_cli_in_process("merge", write_config(task_arithmetic(zoo, float("nan"))), out, "--allow-non-finite"))
    assert torch.isnan(load_checkpoint_tensors(out)["model.embed_tokens.weight"]).any()


def card_of(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_model_card_says_how_the_model_was_made(zoo, write_config, tmp_path):
    config = write_config(task_arithmetic(zoo))
    merged(run_cli_in_process("merge", config, tmp_path / "out", "--seed", "3"))
    front, body = card_of(tmp_path / "out")
    assert front["base_model"] == [zoo.model("base"), zoo.model("ft_a"), zoo.model("ft_b")]
    assert front["tags"] == ["merge", "evomerge"] and front["library_name"] == "transformers"
    assert "# out\n" in body and "`task_arithmetic`" in body and "seed 3" in body
    assert all(f"- `{zoo.model(name)}`" in body for name in ("base", "ft_a", "ft_b"))
    assert f"```yaml\n{config.read_text().rstrip()}\n```" in body
    assert "## Search" not in body


def test_no_model_card_flag(zoo, write_config, tmp_path):
    merged(run_cli_in_process("merge", write_config(linear(zoo, "ft_a")), tmp_path / "out", "--no-model-card"))
    assert not (tmp_path / "out" / "README.md").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.fixture
def exported_config(zoo, tmp_path) -> tuple[Path, Path]:
    """A frozen run (copied, so it can be deleted) exported, its /frozen-run/ models swapped for the zoo's."""
    run_dir = shutil.copytree(FROZEN_RUN, tmp_path / "run")
    exported = tmp_path / "best.yaml"
    merged(run_cli_in_process("export", run_dir, "-o", exported))
    text = exported.read_text()
    for frozen, ours in (("base", "base"), ("expert_a", "ft_a"), ("expert_b", "ft_b")):
        text = text.replace(f"/frozen-run/{frozen}", zoo.model(ours))
    exported.write_text(text)
    return exported, run_dir


def test_model_card_of_an_exported_config_shows_the_search(exported_config, tmp_path):
    from evomerge.merge.card import literal
    from evomerge.rundir.results import leaderboard, load_trials

    config, run_dir = exported_config
    merged(run_cli_in_process("merge", config, tmp_path / "out"))
    _, body = card_of(tmp_path / "out")
    rows = {row["trial"]: row for row in leaderboard(load_trials(run_dir)[1])}
    winner = rows[4]  # the held-out winner, which export picks
    assert f"trial 4 of the run `{run_dir.resolve()}`" in body
    assert (
        f"| this merge (trial 4) | {winner['search']:.4f} ± {winner['search_se']:.4f} | {winner['heldout']:.4f} ± "
        in body
    )
    for row in rows.values():
        if row["kind"] == "baseline":
            assert f"| {literal(row['label'])} | {row['search']:.4f} ± " in body


def test_model_card_when_the_run_is_gone(exported_config, tmp_path):
    config, run_dir = exported_config
    shutil.rmtree(run_dir)
    merged(run_cli_in_process("merge", config, tmp_path / "out"))
    _, body = card_of(tmp_path / "out")
    assert "trial 4 of the run" in body and "could not be read" in body
