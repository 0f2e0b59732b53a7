"""The stand-in hub answers the real huggingface_hub, datasets and lm-eval clients as the hub would."""

from __future__ import annotations

from pathlib import Path

import pytest
from hub_fixtures import (
    ARC_SAMPLE_ROWS,
    MMLU_SAMPLE_ROWS,
    add_arc_easy,
    add_mmlu,
    bundled_task_manager,
    folder_files,
    jsonl_bytes,
    tiny_model_files,
)

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import errors  # noqa: E402

WEIGHTS = ["*.json", "*.safetensors"]


def snapshot_folder(repo_id: str, sha: str, repo_type: str = "model") -> Path:
    """Where huggingface_hub caches commit `sha` of `repo_id` under the current hub cache."""
    return Path(hf.constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "snapshots" / sha


def test_snapshot_download_fills_the_commit_folder_of_the_fresh_cache(standin_hub, tmp_path):
    files = tiny_model_files()
    sha = standin_hub.add_repo("org/tiny", {**files, "notes.txt": "skipped"})
    folder = Path(hf.snapshot_download("org/tiny", allow_patterns=WEIGHTS))
    assert folder == snapshot_folder("org/tiny", sha)
    assert folder.is_relative_to(tmp_path)
    assert {path.name for path in folder.iterdir()} == {
        name for name in files if name.endswith((".json", ".safetensors"))
    }
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert hf.model_info("org/tiny").sha == sha


def test_branches_tags_and_shas_resolve_and_old_commits_stay(standin_hub):
    first = standin_hub.add_repo("org/m", {"config.json": '{"v": 1}'}, tags=["v1"])
    second = standin_hub.commit("org/m", {"config.json": '{"v": 2}'})
    dev = standin_hub.commit("org/m", {"config.json": '{"v": 3}'}, branch="dev")
    pull = standin_hub.open_pr("org/m", {"config.json": '{"v": 4}'})
    four = standin_hub.head("org/m", branch=pull)
    expected = {"v1": (first, 1), first: (first, 1), "main": (second, 2), "dev": (dev, 3), pull: (four, 4)}
    for revision, (sha, version) in expected.items():
        folder = Path(hf.snapshot_download("org/m", revision=revision))
        assert folder == snapshot_folder("org/m", sha)
        assert (folder / "config.json").read_text() == f'{{"v": {version}}}'
    refs = hf.HfApi().list_repo_refs("org/m")
    assert {ref.name: ref.target_commit for ref in refs.branches} == {"main": second, "dev": dev}
    assert {ref.name: ref.target_commit for ref in refs.tags} == {"v1": first}
    assert hf.HfApi().list_repo_refs("org/m", include_pull_requests=True).pull_requests[0].ref == "refs/pr/1"
    unquoted = hf.get_session().get(f"{standin_hub.url}/org/m/resolve/refs/pr/1/config.json")
    assert unquoted.text == '{"v": 4}'  # clients that do not quote the ref reach it too
    assert [commit.commit_id for commit in hf.HfApi().list_repo_commits("org/m")] == [second, first]


def test_gated_repo_needs_the_granted_token(standin_hub):
    sha = standin_hub.add_repo("org/gated", {"config.json": "{}"}, gated=True)
    with pytest.raises(errors.GatedRepoError) as anonymous:
        hf.hf_hub_download("org/gated", "config.json")
    with pytest.raises(errors.GatedRepoError) as wrong:
        hf.hf_hub_download("org/gated", "config.json", token="hf_not_granted")
    assert (anonymous.value.response.status_code, wrong.value.response.status_code) == (401, 403)
    with pytest.raises(errors.GatedRepoError):
        hf.snapshot_download("org/gated")
    folder = Path(hf.snapshot_download("org/gated", token=standin_hub.token))
    assert folder == snapshot_folder("org/gated", sha)


def test_private_repo_is_not_found_without_the_token(standin_hub, monkeypatch, tmp_path):
    (tmp_path / "checkpoint" / "sub").mkdir(parents=True)
    (tmp_path / "checkpoint" / "config.json").write_text("{}")
    (tmp_path / "checkpoint" / "sub" / "notes.txt").write_text("nested")
    standin_hub.add_repo("org/private", folder_files(tmp_path / "checkpoint"), private=True)
    for token in (None, "hf_not_granted"):
        with pytest.raises(errors.RepositoryNotFoundError):
            hf.model_info("org/private", token=token)
    monkeypatch.setenv("HF_TOKEN", standin_hub.token)
    assert Path(hf.hf_hub_download("org/private", "config.json")).read_text() == "{}"
    assert Path(hf.hf_hub_download("org/private", "sub/notes.txt")).read_text() == "nested"


def test_missing_repo_revision_and_file_raise_the_hub_errors(standin_hub):
    standin_hub.add_repo("org/m", {"config.json": "{}"})
    with pytest.raises(errors.RepositoryNotFoundError):
        hf.snapshot_download("org/missing")
    with pytest.raises(errors.RevisionNotFoundError):
        hf.snapshot_download("org/m", revision="no-such-branch")
    with pytest.raises(errors.EntryNotFoundError):
        hf.hf_hub_download("org/m", "missing.json")


def test_ranged_reads_get_the_asked_bytes_and_malformed_ones_a_bad_request(standin_hub):
    data = bytes(range(100))
    standin_hub.add_repo("org/m", {"model.safetensors": data})
    with hf.HfFileSystem().open("org/m/model.safetensors", block_size=8) as file:
        file.seek(10)
        assert file.read(5) == data[10:15]
    url = hf.hf_hub_url("org/m", "model.safetensors")
    assert hf.get_session().get(url, headers={"Range": "bytes=-3"}).content == data[-3:]
    assert hf.get_session().get(url, headers={"Range": "bytes=x-"}).status_code == 400


def test_offline_mode_serves_the_cached_snapshot_without_calls(standin_hub, go_offline):
    sha = standin_hub.add_repo("org/m", {"config.json": "{}", "model.safetensors": b"\0" * 64}, tags=["v1"])
    online = hf.snapshot_download("org/m", revision="v1", allow_patterns=WEIGHTS)
    go_offline()
    standin_hub.clear_requests()
    assert hf.snapshot_download("org/m", revision="v1", allow_patterns=WEIGHTS) == online
    assert Path(hf.hf_hub_download("org/m", "config.json", revision=sha)).parent == Path(online)
    with pytest.raises(errors.LocalEntryNotFoundError):
        hf.snapshot_download("org/other")
    assert standin_hub.requests == []


def test_load_dataset_reads_arc_easy_by_config_then_from_cache_offline(standin_hub, go_offline):
    from datasets import load_dataset

    add_arc_easy(standin_hub)
    test = load_dataset("allenai/ai2_arc", "ARC-Easy", split="test")
    assert test.to_list() == ARC_SAMPLE_ROWS
    go_offline()
    standin_hub.clear_requests()
    assert load_dataset("allenai/ai2_arc", "ARC-Easy", split="test").to_list() == ARC_SAMPLE_ROWS
    assert standin_hub.requests == []


def test_load_dataset_follows_the_revision_of_json_data_files(standin_hub):
    from datasets import load_dataset

    first = standin_hub.add_repo("org/rows", {"data/train.jsonl": jsonl_bytes([{"x": 1}])}, repo_type="dataset")
    standin_hub.commit("org/rows", {"data/train.jsonl": jsonl_bytes([{"x": 2}, {"x": 3}])}, repo_type="dataset")
    assert load_dataset("org/rows", split="train", revision=first).to_list() == [{"x": 1}]
    assert load_dataset("org/rows", split="train").to_list() == [{"x": 2}, {"x": 3}]


def test_lm_eval_builds_its_bundled_tasks_from_the_stand_in(standin_hub):
    add_arc_easy(standin_hub)
    add_mmlu(standin_hub, ["anatomy"])
    tasks = bundled_task_manager("arc", "mmlu/default").load(["arc_easy", "mmlu_anatomy"])["tasks"]
    assert [doc["question"] for doc in tasks["arc_easy"].test_docs()] == [row["question"] for row in ARC_SAMPLE_ROWS]
    anatomy = tasks["mmlu_anatomy"]
    assert [doc["answer"] for doc in anatomy.test_docs()] == [row["answer"] for row in MMLU_SAMPLE_ROWS]
    assert {doc["subject"] for doc in anatomy.fewshot_docs()} == {"anatomy"}
