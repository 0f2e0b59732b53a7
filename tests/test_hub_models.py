"""Models named by hub ID (`org/name@revision`), resolved through the real huggingface_hub client
against a stand-in hub on loopback: spec validation, every refusal in one line, offline use of the
cache, pinning and resume, `evomerge merge` and `export` with hub IDs, and `prefetch` with its lock.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from hub_fixtures import tiny_model_files
from refusals import assert_refused_in_one_line, run_cli_in_process
from search_zoo import FIXTURE_EVALS

from evomerge.hub import ModelSource, model_name, resolve_model, resolve_models, split_hub_id, wanted_files
from evomerge.merge.config import MergeConfig
from evomerge.rundir.results import load_trials

BASE, MATH, CODE = "tiny-org/base", "tiny-org/math-sft", "tiny-org/code-sft"


@pytest.fixture
def hub(standin_hub):
    """The stand-in hub holding a tiny base model and two fine-tunes of it."""
    for seed, repo in enumerate((BASE, MATH, CODE)):
        standin_hub.add_repo(repo, tiny_model_files(seed))
    return standin_hub


def hub_spec(tmp_path: Path, base: str = BASE, experts: tuple[str, ...] | list[str] = (MATH, CODE), **extra) -> Path:
    spec = {
        "name": "hub-run",
        "runs_dir": str(tmp_path / "runs"),
        "models": {"base": base, "experts": list(experts)},
        "merge": {"method": "ties"},
        "genome": {"layer_groups": 2},
        "evaluation": {"include": [str(FIXTURE_EVALS)], "tasks": ["tiny_add"], "limit": 4},
        "budget": {"max_evals": 12},
        "workers": {"count": 1, "device": "cpu"},
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_names_split_as_mergekit_writes_them(tmp_path):
    assert split_hub_id("org/name") == ("org/name", None)
    assert split_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert split_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for local in ("./org/name", "/abs/path", "~/models/x", "one-folder", "a/b/c"):
        assert split_hub_id(local) is None
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert model_name("org/name", tmp_path) == str(tmp_path / "org" / "name")  # a local folder wins
    assert model_name("org/other", tmp_path) == "org/other"
    assert model_name("missing", tmp_path) == str(tmp_path / "missing")


def test_only_configs_tokenizer_and_transformers_safetensors_are_fetched():
    files = ["config.json", "tokenizer.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    files += ["model.safetensors.index.json", "consolidated.safetensors", "pytorch_model.bin", "original/x.pth"]
    assert wanted_files(files) == [
        "config.json",
        "tokenizer.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]


def test_a_hub_id_resolves_to_a_snapshot_at_its_commit(hub, tmp_path):
    head = hub.head(BASE)
    source = resolve_model(BASE)
    assert (source.repo_id, source.revision, source.commit) == (BASE, None, head)
    assert Path(source.folder).name == head and (Path(source.folder) / "model.safetensors").is_file()
    assert source.exported == f"{BASE}@{head}"
    hub.clear_requests()
    assert resolve_model(source.exported).folder == source.folder  # an exported name: the cache, no request
    assert hub.requests == []
    local = tmp_path / "local"
    local.mkdir()
    assert resolve_model(str(local)) == ModelSource(str(local), str(local))


def test_a_spec_naming_hub_ids_validates(hub, tmp_path):
    code, lines = run_cli_in_process("validate", hub_spec(tmp_path), "--json")
    assert code == 0, lines


def test_a_gated_model_resolves_with_the_token(hub, monkeypatch):
    hub.add_repo("gated-org/base", tiny_model_files(0), gated=True)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert resolve_model("gated-org/base").commit == hub.head("gated-org/base")


def with_config(seed: int, **change) -> dict:
    files = dict(tiny_model_files(seed))
    files["config.json"] = json.dumps({**json.loads(files["config.json"]), **change}).encode()
    return files


def pickled_only(seed: int) -> dict:
    files = {name: data for name, data in tiny_model_files(seed).items() if not name.endswith(".safetensors")}
    return {**files, "pytorch_model.bin": b"never unpickled"}


# name -> (repos to put on the stand-in hub, the spec's models, words the one stderr line must contain)
REFUSALS = {
    "gated-without-a-token": (
        {"gated-org/base": dict(files=tiny_model_files(0), gated=True)},
        {"base": "gated-org/base"},
        ["models.base 'gated-org/base'", "gated", "licence", "hf auth login", "HF_TOKEN"],
    ),
    "private-without-a-token": (
        {"secret-org/math": dict(files=tiny_model_files(1), private=True)},
        {"experts": ["secret-org/math", CODE]},
        ["models.experts[0] 'secret-org/math'", "401", "check the spelling", "HF_TOKEN"],
    ),
    "missing-repos-all-named": (
        {},
        {"experts": ["tiny-org/nope", "tiny-org/nada"]},
        ["models.experts[0] 'tiny-org/nope', models.experts[1] 'tiny-org/nada'", "check the spelling"],
    ),
    "unknown-revision": ({}, {"base": f"{BASE}@v9"}, ["models.base", "no revision 'v9'", "drop '@v9'"]),
    "pickled-weights-only": (
        {"tiny-org/bin-only": dict(files=pickled_only(1))},
        {"experts": ["tiny-org/bin-only", CODE]},
        ["models.experts[0]", "pytorch_model.bin", "never unpickles", "convert them to safetensors"],
    ),
    "remote-code-auto-map": (
        {"tiny-org/remote": dict(files=with_config(2, auto_map={"AutoModelForCausalLM": "modeling_x.X"}))},
        {"experts": [MATH, "tiny-org/remote"]},
        ["models.experts[1]", "auto_map", "never runs remote code"],
    ),
    "unknown-model-type": (
        {"tiny-org/exotic": dict(files=with_config(2, model_type="not-a-transformers-model"))},
        {"experts": [MATH, "tiny-org/exotic"]},
        ["models.experts[1]", "not-a-transformers-model", "never runs remote code"],
    ),
    "one-model-under-two-names": (
        {},
        {"experts": [MATH, f"{MATH}@main"]},
        ["models.experts[1]", f"'{MATH}@main' is the same model as models.experts[0]", "list each model once"],
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_hub_refusals_are_one_line_naming_the_model_and_the_fix(hub, tmp_path, case):
    repos, models, words = REFUSALS[case]
    for repo, options in repos.items():
        hub.add_repo(repo, **options)
    code, lines = run_cli_in_process("validate", hub_spec(tmp_path, **models))
    assert_refused_in_one_line(code, lines, words)
    assert not any(path.endswith(".bin") for _, path in hub.requests if "/resolve/" in path)


def test_a_pinned_commit_in_the_cache_needs_only_the_moved_on_check(hub):
    commit = resolve_model(BASE).commit
    hub.clear_requests()
    assert resolve_model(BASE, pin=commit).folder.endswith(commit)
    assert hub.requests == [("GET", f"/api/models/{BASE}")]  # where main points now: no download


def test_offline_the_cache_serves_without_a_request(hub, go_offline):
    online = resolve_models({BASE: "models.base"})
    go_offline()
    hub.clear_requests()
    assert resolve_models({BASE: "models.base"}).folders() == online.folders()
    assert hub.requests == []


def test_offline_without_the_cache_names_prefetch(hub, tmp_path, go_offline):
    go_offline()
    spec = hub_spec(tmp_path)
    code, lines = run_cli_in_process("validate", spec)
    assert_refused_in_one_line(code, lines, ["models.base", "models.experts[1]", f"evomerge prefetch {spec}"])
    assert lines[0].count("HF_HUB_OFFLINE is set") == 1  # one clause for every model it concerns


def test_an_unreachable_hub_without_the_cache_names_the_endpoint(hub, tmp_path):
    hub.close()
    code, lines = run_cli_in_process("validate", hub_spec(tmp_path))
    assert_refused_in_one_line(code, lines, ["models.base 'tiny-org/base'", "cannot be reached", "HF_ENDPOINT"])


def test_a_local_folder_of_the_same_spelling_wins(hub, zoo, tmp_path):
    shutil.copytree(zoo.model("base"), tmp_path / "tiny-org" / "base")
    hub.clear_requests()
    loaded = resolve_models({str(tmp_path / "tiny-org" / "base"): "models.base"})
    assert next(iter(loaded.values())).repo_id is None
    assert hub.requests == []


def run_search_in_process(monkeypatch, spec_path: Path, *args: str) -> list[str]:
    """`evomerge search|resume ...` in process: the real preflight and journal, fake workers, no Ray."""
    from contextlib import nullcontext

    from fake_workers import fake_scheduler

    from evomerge.search import cluster
    from evomerge.search.loop import Search

    monkeypatch.setattr(Search, "run", lambda self: self.run_with(fake_scheduler()))
    monkeypatch.setattr(cluster, "ClusterSession", lambda *a, **k: nullcontext())
    monkeypatch.setattr("evomerge.cli.searching.print_summary", lambda *shown: None)
    code, lines = run_cli_in_process(*args, spec_path)
    assert code == 0, lines
    return lines


def run_started_pins(run_dir: Path) -> list[dict]:
    from evomerge.rundir.journal import read_events

    return [e.get("models") for e in read_events(run_dir / "journal.jsonl") if e["event"] == "run_started"]


def test_a_run_pins_commits_and_resumes_at_them_after_the_hub_moved_on(hub, tmp_path, monkeypatch, caplog):
    spec = hub_spec(tmp_path, experts=(f"{MATH}@main", CODE))
    run_search_in_process(monkeypatch, spec, "search")
    run_dir = tmp_path / "runs" / "hub-run"
    old = hub.head(MATH)
    pins = run_started_pins(run_dir)[0]
    assert pins[f"{MATH}@main"] == {"repo": MATH, "revision": "main", "commit": old}
    assert pins[BASE]["commit"] == hub.head(BASE) and set(pins) == {BASE, f"{MATH}@main", CODE}
    assert yaml.safe_load((run_dir / "spec.yaml").read_text())["models"]["experts"][0] == f"{MATH}@main"

    new = hub.commit(MATH, {"model.safetensors": tiny_model_files(5)["model.safetensors"]})
    run_search_in_process(monkeypatch, run_dir, "resume", "--max-evals", "14")
    assert run_started_pins(run_dir)[-1] == pins  # the old commit, not the branch's new head
    moved = [r.getMessage() for r in caplog.records if "moved on" in r.getMessage()]
    assert moved == [
        f"{MATH}: the hub's main has moved on to {new[:12]} since it was pinned; using the pinned commit {old[:12]}"
    ]

    evolved = max(t.trial_id for t in load_trials(run_dir)[1].values() if t.kind == "optimizer" and t.score)
    code, lines = run_cli_in_process("export", run_dir, "--trial", evolved, "-o", tmp_path / "evolved.yaml")
    assert code == 0, lines
    exported = MergeConfig.model_validate(yaml.safe_load((tmp_path / "evolved.yaml").read_text()))
    assert exported.referenced_models() == [f"{BASE}@{hub.head(BASE)}", f"{MATH}@{old}", f"{CODE}@{hub.head(CODE)}"]


def test_merging_a_yaml_of_hub_ids_equals_the_merge_of_the_local_folders(standin_hub, zoo, tmp_path, mergekit_merge):
    from hub_fixtures import folder_files
    from safetensors.torch import load_file

    local = {name: zoo.model(name) for name in ("base", "ft_a", "ft_b")}
    heads = {name: standin_hub.add_repo(f"zoo/{name}", folder_files(folder)) for name, folder in local.items()}
    hub_ids = {"base": "zoo/base", "ft_a": f"zoo/ft_a@{heads['ft_a']}", "ft_b": "zoo/ft_b@main"}

    def ties(names: dict[str, str]) -> dict:
        models = [
            {"model": names[n], "parameters": {"weight": w, "density": 0.6}} for n, w in (("ft_a", 0.7), ("ft_b", 0.5))
        ]
        return {"merge_method": "ties", "base_model": names["base"], "models": models, "dtype": "float32"}

    outputs = {}
    for kind, names in (("local", local), ("hub", hub_ids)):
        config = tmp_path / f"{kind}.yaml"
        config.write_text(yaml.safe_dump(ties(names)))
        code, lines = run_cli_in_process("merge", config, tmp_path / kind)
        assert code == 0, lines
        outputs[kind] = load_file(tmp_path / kind / "model.safetensors")
    assert outputs["hub"].keys() == outputs["local"].keys()
    assert all(outputs["hub"][name].equal(tensor) for name, tensor in outputs["local"].items())
    assert "zoo/ft_b@main" in (tmp_path / "hub" / "README.md").read_text()  # the card names the hub IDs
    mergekit_merge(tmp_path / "hub.yaml", tmp_path / "mergekit")  # mergekit reads the same YAML from the hub
    theirs = load_file(tmp_path / "mergekit" / "model.safetensors")
    assert all(theirs[name].equal(tensor) for name, tensor in outputs["hub"].items())


def cli(*args):
    from typer.testing import CliRunner

    from evomerge.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_prefetch_locks_commits_that_offline_validate_then_reads(hub, tmp_path, go_offline):
    spec = hub_spec(tmp_path, experts=(f"{MATH}@main", CODE))
    fetched = cli("prefetch", spec)
    assert fetched.exit_code == 0, fetched.output
    old = hub.head(MATH)
    lock = yaml.safe_load((tmp_path / "spec.lock.yaml").read_text())
    entry = lock["models"][f"{MATH}@main"]
    assert (entry["repo"], entry["revision"], entry["commit"]) == (MATH, "main", old) and entry["size"] > 0
    assert set(lock["models"]) == {BASE, f"{MATH}@main", CODE} and lock["datasets"] == []
    assert f"{MATH}@{old}" in fetched.stdout and "wrote" in fetched.stdout

    hub.commit(MATH, {"model.safetensors": tiny_model_files(6)["model.safetensors"]})
    new = resolve_model(f"{MATH}@main").commit  # the cache's main now points past the lock
    assert new != old
    go_offline()
    hub.clear_requests()
    validated = cli("validate", spec, "--json")
    assert validated.exit_code == 0, validated.output
    assert json.loads(validated.stdout)["models"][f"{MATH}@main"] == f"{MATH}@{old}"
    assert hub.requests == []


def test_a_worker_merges_hub_models_from_their_snapshots(hub, tmp_path, monkeypatch):
    """The settings the search hands its Ray workers: folders for reading, names in every config."""
    import ray

    from evomerge.preflight import preflight
    from evomerge.search import cluster
    from evomerge.search.worker import MergeWorker
    from evomerge.spec import load_spec

    prepared = preflight(load_spec(hub_spec(tmp_path)))
    built = []
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    actor = type("Actor", (), {"remote": staticmethod(lambda settings, name: built.append(settings))})
    monkeypatch.setattr(cluster, "ray_worker_class", lambda *a: actor)
    cluster.make_actor_factory(prepared, prepared.spec)[0](0)
    settings = built[0]
    assert settings.base_model == prepared.sources.folder(BASE) != BASE
    assert MergeConfig.model_validate(prepared.union_config).referenced_models() == [BASE, MATH, CODE]
    genome = prepared.genome
    result = MergeWorker(settings).evaluate(0, genome.merge_config_dict(genome.x0()))
    assert result.ok, result.reason


def test_eval_scores_a_model_named_by_hub_id(hub, tmp_path):
    scored = cli("eval", hub_spec(tmp_path), "--model", f"{MATH}@main", "--json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["n_docs"] == {"tiny_add": 4}


def test_resume_reads_hub_datasets_at_the_commits_the_run_started_with(hub, tmp_path, monkeypatch):
    from hub_fixtures import add_arc_easy, arc_row, parquet_bytes

    from evomerge.search.loop import Search

    started = add_arc_easy(hub)
    spec = hub_spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    data["evaluation"] = {"tasks": ["arc_easy"], "limit": 2}
    spec.write_text(yaml.safe_dump(data))
    run_search_in_process(monkeypatch, spec, "search")
    moved = hub.commit(
        "allenai/ai2_arc",
        {"ARC-Easy/test-00000-of-00001.parquet": parquet_bytes([arc_row(9, "New?", ["a", "b", "c", "d"], 0)] * 3)},
        repo_type="dataset",
    )
    assert moved != started
    pinned = []
    monkeypatch.setattr(Search, "run", lambda self: pinned.append(self.prepared.eval_sets["search"].dataset_revisions))
    code, lines = run_cli_in_process("resume", tmp_path / "runs" / "hub-run", "--max-evals", "14")
    assert code == 0, lines
    assert pinned == [{"allenai/ai2_arc:ARC-Easy": started}]


def test_ray_workers_read_the_driver_s_caches_in_its_mode_without_its_token(monkeypatch, tmp_path):
    from evomerge.search.cluster import runtime_env

    monkeypatch.setenv("HF_HOME", str(tmp_path / "shared-hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    variables = runtime_env()["env_vars"]
    assert variables["HF_HOME"] == str(tmp_path / "shared-hf") and variables["HF_HUB_OFFLINE"] == "1"
    assert "HF_TOKEN" not in variables and variables["TOKENIZERS_PARALLELISM"] == "false"
