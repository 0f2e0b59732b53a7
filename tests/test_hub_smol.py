"""A real pretrained LLM named by hub ID, end to end: SmolLM2-135M-Instruct and the two SmolLM2 zoo
fine-tunes served by the stand-in hub, lm-eval's bundled arc_easy over a stand-in ai2_arc, then
`prefetch` online and, offline, `validate`, `search` on Ray workers, `resume`, `export` (hub IDs at
their commits) and `merge` of the export from the cache alone.

Long (about two minutes on 2 cores): it runs with `-m long`, and skips in one line without the
built SmolLM2 zoo (`EVOMERGE_REAL=1 bash scripts/setup.sh`, then `python scripts/build_smol_zoo.py`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_fixtures import add_arc_easy, arc_row, folder_files
from zoo_builds import load_build_script

from evomerge.merge.config import MergeConfig
from evomerge.rundir.journal import read_events

EVOMERGE = str(Path(sys.executable).with_name("evomerge"))
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EXPERTS = {"shift": "evomerge-zoo/smol-shift", "increment": "evomerge-zoo/smol-increment"}
smol_zoo = load_build_script("build_smol_zoo")


@pytest.fixture(scope="module")
def zoo() -> Path:
    # Any finished build serves: the test needs three checkpoints that share a tokenizer, not the recipe's weights.
    out = smol_zoo.DEFAULT_OUT
    if not all((out / name / "model.safetensors").is_file() for name in ("base", *(f"expert_{s}" for s in EXPERTS))):
        pytest.skip("the SmolLM2 zoo is not built (python scripts/build_smol_zoo.py)")
    return out


def arc_rows(count: int) -> list[dict]:
    colours = ["red", "green", "blue", "yellow", "black", "white", "pink", "grey"]
    return [
        arc_row(i, f"Which colour is number {i} in the list?", [colours[(i + k) % 8] for k in range(4)], i % 4)
        for i in range(count)
    ]


def serve_from_the_cache(hub, repo_id: str, folder: Path) -> str:
    """Put a checkpoint on the stand-in hub and its snapshot in the cache (links, no copies): the
    client asks the hub for metadata and finds every file already there."""
    from huggingface_hub import constants

    commit = hub.add_repo(repo_id, folder_files(folder))
    storage = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    (storage / "snapshots" / commit).mkdir(parents=True)
    for path in folder.iterdir():
        (storage / "snapshots" / commit / path.name).symlink_to(path.resolve())
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    return commit


def cli(*args, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([EVOMERGE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.long
def test_a_smollm2_spec_by_hub_id_prefetches_then_searches_resumes_and_exports_offline(standin_hub, zoo, tmp_path):
    commits = {SMOL: serve_from_the_cache(standin_hub, SMOL, zoo / "base")}
    for skill, repo in EXPERTS.items():
        commits[repo] = serve_from_the_cache(standin_hub, repo, zoo / f"expert_{skill}")
    add_arc_easy(standin_hub, rows=arc_rows(16))
    spec = tmp_path / "smol-hub.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "smol-hub",
                "runs_dir": str(tmp_path / "runs"),
                "models": {"base": SMOL, "experts": list(EXPERTS.values())},
                "merge": {"method": "ties"},
                "genome": {"layer_groups": 2},
                "evaluation": {"tasks": ["arc_easy"], "heldout_fraction": 0.5, "limit": 6, "top_k": 2},
                "budget": {"max_evals": 9},
                "workers": {"count": 1, "device": "cpu"},
            }
        )
    )
    online = os.environ.copy()
    fetched = cli("prefetch", spec, env=online)
    lock = yaml.safe_load((tmp_path / "smol-hub.lock.yaml").read_text())
    assert {name: entry["commit"] for name, entry in lock["models"].items()} == commits, fetched.stdout
    assert [entry["path"] for entry in lock["datasets"]] == ["allenai/ai2_arc"]

    offline = {**online, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    standin_hub.clear_requests()
    assert f"{SMOL}@{commits[SMOL]}" in cli("validate", spec, env=offline).stdout
    cli("search", spec, env=offline)
    run_dir = tmp_path / "runs" / "smol-hub"
    cli("resume", run_dir, "--max-evals", "11", env=offline)
    started = [e for e in read_events(run_dir / "journal.jsonl") if e["event"] == "run_started"]
    assert [{name: pin["commit"] for name, pin in e["models"].items()} for e in started] == [commits, commits]
    cli("export", run_dir, "-o", tmp_path / "best.yaml", env=offline)
    exported = MergeConfig.model_validate(yaml.safe_load((tmp_path / "best.yaml").read_text()))
    assert set(exported.referenced_models()) <= {f"{repo}@{commit}" for repo, commit in commits.items()}
    cli("merge", tmp_path / "best.yaml", tmp_path / "merged", env=offline)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert standin_hub.requests == []  # offline meant offline: everything came from the caches
