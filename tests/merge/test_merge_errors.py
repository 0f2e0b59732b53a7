"""Refused merges and exports: exit code 2, one line naming the file and the fix, nothing changed.

Three tables, each case asserting exit 2, one line, no traceback, and its folder (inputs, OUT and
whatever lies beside OUT) byte-identical afterwards:

* ERROR_CASES: bad configs, named by the config file. Most reference the zoo's corrupt checkpoint
  (intact header, truncated data): had evomerge read a weight first, it would die another way.
* OUTPUT_CASES: where `merge` would write (OUT an input, not empty, a file, no parent) and merges
  whose output is not finite; a read-only filesystem is its own test (it needs a mount).
* EXPORT_CASES: where `export -o` would write.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import yaml
from cli_runner import run_cli_in_process, snapshot
from refusals import record_refusal
from tiny_models import TinyZoo

from evomerge.errors import UserError

EVOMERGE_BIN = Path(sys.executable).with_name("evomerge")
FROZEN_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "v0-cmaes"


def ties_config(zoo: TinyZoo, density=0.5, **overrides) -> dict:
    """A TIES config whose base is the corrupt checkpoint, plus `overrides`."""
    config = {
        "merge_method": "ties",
        "base_model": zoo.corrupt,
        "models": [{"model": zoo.model("ft_a"), "parameters": {"weight": 0.5, "density": density}}],
    }
    return {**config, **overrides}


def sliced_config(zoo: TinyZoo, start: int, stop: int) -> dict:
    return {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": m, "layer_range": [start, stop], "parameters": {"weight": 0.5}}
                    for m in (zoo.corrupt, zoo.model("ft_a"))
                ]
            }
        ],
    }


def linear_config(*paths: str) -> dict:
    return {"merge_method": "linear", "models": [{"model": p, "parameters": {"weight": 1.0}} for p in paths]}


MALFORMED_YAML = "merge_method: linear\nmodels:\n  - model: {path}\n\tparameters:\n    weight: 1.0\n"

# name -> (config builder, substrings the one-line message must contain)
ERROR_CASES = {
    "unknown-method": (lambda z: ties_config(z, merge_method="tie"), ["merge_method", "did you mean 'ties'"]),
    "unknown-method-swapped": (lambda z: ties_config(z, merge_method="ties_dare"), ["merge_method", "did you mean"]),
    "missing-model-path": (
        lambda z: linear_config(z.corrupt, "/nonexistent/evomerge-model"),
        ["models[1]", "/nonexistent/evomerge-model"],
    ),
    "two-missing-model-paths": (
        lambda z: linear_config(z.model("base"), "/nonexistent/evomerge-a", "/nonexistent/evomerge-b"),
        ["models[1].model '/nonexistent/evomerge-a', models[2].model '/nonexistent/evomerge-b'", "does not exist"],
    ),
    "shape-mismatch": (lambda z: linear_config(z.model("base"), z.wide), ["models[1]", "shape"]),
    "vocab-mismatch": (lambda z: linear_config(z.model("base"), z.big_vocab), ["models[1]", "vocab"]),
    "ties-without-base": (lambda z: {**ties_config(z), "base_model": None}, ["base_model"]),
    "density-zero": (lambda z: ties_config(z, density=0), ["density"]),
    "density-negative": (lambda z: ties_config(z, density=-0.1), ["density"]),
    "density-above-one": (lambda z: ties_config(z, density=1.5), ["density"]),
    "layer-range-out-of-bounds": (lambda z: sliced_config(z, 0, 6), ["layer_range"]),
    "malformed-yaml": (lambda z: MALFORMED_YAML.format(path=z.corrupt), ["yaml", "line 4"]),
    "unknown-top-level-key": (lambda z: ties_config(z, tokenizer_sorce="base"), ["tokenizer_sorce"]),
    "unsupported-tokenizer-source": (lambda z: ties_config(z, tokenizer_source="union"), ["tokenizer_source"]),
    "model_stock-one-expert": (
        lambda z: method_config(z, "model_stock", ["ft_a"]),
        ["slices[0]", "model_stock merges at least two models besides the base, got 1"],
    ),
    "model_stock-without-base": (
        lambda z: method_config(z, "model_stock", ["ft_a", "ft_b"], base=False),
        ["base_model"],
    ),
    "nuslerp-three-experts": (
        lambda z: method_config(z, "nuslerp", ["ft_a", "ft_b", "ft_c"], weight=0.5),
        ["nuslerp merges exactly two models besides the base, got 3"],
    ),
    "nuslerp-one-model-no-base": (
        lambda z: method_config(z, "nuslerp", ["ft_a"], base=False, weight=0.5),
        ["nuslerp merges exactly two models, got 1"],
    ),
    "nearswap-two-experts": (
        lambda z: method_config(z, "nearswap", ["ft_a", "ft_b"], parameters={"t": 0.01}),
        ["nearswap merges exactly two models (the base and one other), got 3"],
    ),
    "nearswap-without-t": (lambda z: method_config(z, "nearswap", ["ft_a"]), ["parameters.t", "not set"]),
    "arcee_fusion-without-base": (lambda z: method_config(z, "arcee_fusion", ["ft_a"], base=False), ["base_model"]),
    "sce-select_topk-zero": (
        lambda z: method_config(z, "sce", ["ft_a", "ft_b"], parameters={"select_topk": 0}),
        ["parameters.select_topk", "(0, 1]"],
    ),
    "ram-without-base": (lambda z: method_config(z, "ram", ["ft_a", "ft_b"], base=False), ["base_model"]),
    "passthrough-two-models": (
        lambda z: method_config(z, "passthrough", ["ft_a", "ft_b"], base=False),
        ["passthrough merges exactly one model, got 2"],
    ),
    # Tensors no fine-tune changes have no direction to average: mergekit raises there too.
    "multislerp-unchanged-tensor": (
        lambda z: {
            **method_config(z, "multislerp", ["ft_a", "ft_b", "ft_c"], weight=1.0),
            "base_model": z.model("base"),
        },
        ["multislerp", "weighted mean", "nothing was written"],
    ),
}


def method_config(zoo: TinyZoo, method: str, experts: list[str], base: bool = True, parameters=None, **per_model):
    """`method` over zoo `experts` with the corrupt checkpoint as base: refused before a weight is read."""
    return {
        "merge_method": method,
        "base_model": zoo.corrupt if base else None,
        "models": [
            {"model": zoo.model(name), **({"parameters": dict(per_model)} if per_model else {})} for name in experts
        ],
        "parameters": parameters,
    }


def drop_none(config: dict) -> dict:
    return {key: value for key, value in config.items() if value is not None}


@dataclass(frozen=True)
class Refusal:
    """One refused command: what it printed, the one-line message's expected prefix, and its folder before/after."""

    finished: subprocess.CompletedProcess
    prefix: str
    before: dict[str, str]
    after: dict[str, str]


def assert_refused(refusal: Refusal, expected: list[str]) -> None:
    """Exit 2, one line naming the file, no traceback, and the case's folder byte-identical afterwards."""
    finished = refusal.finished
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert finished.returncode == 2, f"exit {finished.returncode}; stderr:\n{finished.stderr}"
    assert "Traceback" not in finished.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{finished.stderr}"
    record_refusal(lines[0])
    assert lines[0].startswith(f"error: {refusal.prefix}"), f"{lines[0]!r} does not start with the file's name"
    for expected_text in expected:
        assert expected_text.lower() in lines[0].lower(), f"{expected_text!r} not in: {lines[0]}"
    assert refusal.after == refusal.before, "files were written, changed or left behind (inputs, OUT or beside it)"


@pytest.fixture(scope="module")
def error_runs(zoo, tmp_path_factory, evomerge_cli):
    """Run every error case through the CLI once, concurrently (each run pays ~3 s of imports)."""
    root = tmp_path_factory.mktemp("error_cases")

    def run(name: str) -> Refusal:
        built = ERROR_CASES[name][0](zoo)
        case = root / name
        case.mkdir()
        config_path = case / "merge.yml"
        config_path.write_text(built if isinstance(built, str) else yaml.safe_dump(drop_none(built)))
        before = snapshot(case)
        finished = evomerge_cli("merge", config_path, case / "out")
        return Refusal(finished, str(config_path), before, snapshot(case))

    zoo_before = snapshot(zoo.root)
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = dict(zip(ERROR_CASES, pool.map(run, ERROR_CASES), strict=False))
    assert snapshot(zoo.root) == zoo_before, "a bad config changed the input models"
    return runs


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_config_exits_2_with_one_line(case, error_runs):
    """Named by the config file (not 'config:'), nothing written: no OUT, no staging folder."""
    assert_refused(error_runs[case], ERROR_CASES[case][1])


# ---- where a merge writes: OUT must not be an input, half written, mixed, or unwritable -----------


def copied_models(zoo: TinyZoo, into: Path, *names: str) -> list[str]:
    """Private copies of zoo checkpoints, so a case that went wrong could not damage the shared zoo."""
    into.mkdir(parents=True, exist_ok=True)
    return [str(shutil.copytree(zoo.model(name), into / name)) for name in names]


def with_old_merge(folder: Path) -> Path:
    """A folder holding an earlier merge's files (what --force must replace whole, or keep on error)."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"an earlier merge")
    (folder / "config.json").write_text("{}")
    return folder


@dataclass(frozen=True)
class Arranged:
    config: dict
    out: Path
    args: tuple[str, ...] = ()
    config_path: Path | None = None  # default: case/merge.yml


def out_is_an_input(zoo, case):
    a, b = copied_models(zoo, case, "ft_a", "ft_b")
    return Arranged(linear_config(a, b), Path(b))


def out_is_the_base(zoo, case):
    base, a = copied_models(zoo, case, "base", "ft_a")
    return Arranged(ties_config(zoo, base_model=base, models=[{"model": a, "parameters": {"weight": 1.0}}]), Path(base))


def out_inside_an_input(zoo, case):
    a, b = copied_models(zoo, case, "ft_a", "ft_b")
    return Arranged(linear_config(a, b), Path(a) / "merged")


def out_holds_the_inputs_forced(zoo, case):
    a, b = copied_models(zoo, case / "models", "ft_a", "ft_b")
    return Arranged(linear_config(a, b), case / "models", ("--force",))


def out_is_the_tokenizer_source(zoo, case):
    a, b, tokenizer = copied_models(zoo, case, "ft_a", "ft_b", "base")
    return Arranged({**linear_config(a, b), "tokenizer_source": tokenizer}, Path(tokenizer))


def out_holds_the_config_forced(zoo, case):
    out = case / "out"
    out.mkdir()
    return Arranged(linear_config(zoo.model("ft_a")), out, ("--force",), out / "merge.yml")


def out_not_empty(zoo, case):
    return Arranged(linear_config(zoo.model("ft_a")), with_old_merge(case / "out"))


def out_is_a_file(zoo, case):
    (case / "out").write_text("not a folder")
    return Arranged(linear_config(zoo.model("ft_a")), case / "out", ("--force",))


def out_under_a_file(zoo, case):
    (case / "file").write_text("not a folder")
    return Arranged(linear_config(zoo.model("ft_a")), case / "file" / "missing" / "out")


def a_run(case: Path) -> Path:
    """A copy of the frozen run in case/runs: what --force must never replace."""
    return Path(shutil.copytree(FROZEN_RUN, case / "runs" / FROZEN_RUN.name))


def out_is_a_run_forced(zoo, case):
    return Arranged(linear_config(zoo.model("ft_a")), a_run(case), ("--force",))


def out_is_a_runs_dir_forced(zoo, case):
    return Arranged(linear_config(zoo.model("ft_a")), a_run(case).parent, ("--force",))


def out_holds_a_runs_dir_forced(zoo, case):
    a_run(case)
    return Arranged(linear_config(zoo.model("ft_a")), case, ("--force",), case.parent / f"{case.name}.yml")


def out_inside_a_run(zoo, case):
    return Arranged(linear_config(zoo.model("ft_a")), a_run(case) / "merged")


def weighted(zoo: TinyZoo, weight: float) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": zoo.model("base"),
        "models": [{"model": zoo.model(name), "parameters": {"weight": weight}} for name in ("ft_a", "ft_b")],
    }


def nan_weight(zoo, case):
    return Arranged(weighted(zoo, float("nan")), case / "out")


def huge_weight(zoo, case):
    return Arranged(weighted(zoo, 1e300), case / "out")


def nan_weight_forced_over_an_old_merge(zoo, case):
    return Arranged(weighted(zoo, float("nan")), with_old_merge(case / "out"), ("--force",))


# name -> (arrangement, substrings of the one-line message, whose name starts it: "out" or "config")
OUTPUT_CASES = {
    "out-is-an-input": (out_is_an_input, ["is the input model", "outside every input"], "out"),
    "out-is-the-base": (out_is_the_base, ["is the base model"], "out"),
    "out-inside-an-input": (out_inside_an_input, ["is inside the input model"], "out"),
    "out-holds-the-inputs-forced": (out_holds_the_inputs_forced, ["contains the input model"], "out"),
    "out-is-the-tokenizer-source": (out_is_the_tokenizer_source, ["is the tokenizer source"], "out"),
    "out-holds-the-config-forced": (out_holds_the_config_forced, ["contains the merge config"], "out"),
    "out-not-empty": (out_not_empty, ["not empty", "--force"], "out"),
    "out-is-a-file": (out_is_a_file, ["not a folder"], "out"),
    "out-under-a-file": (out_under_a_file, ["is a file, not a folder"], "out"),
    "out-is-a-run-forced": (out_is_a_run_forced, ["is the run directory", "outside every run"], "out"),
    "out-is-a-runs-dir-forced": (out_is_a_runs_dir_forced, ["contains the run directory"], "out"),
    "out-holds-a-runs-dir-forced": (out_holds_a_runs_dir_forced, ["contains the run directory"], "out"),
    "out-inside-a-run": (out_inside_a_run, ["is inside the run directory"], "out"),
    "nan-weight": (nan_weight, ["model.embed_tokens.weight", "nan or inf", "--allow-non-finite"], "config"),
    "huge-weight": (huge_weight, ["model.embed_tokens.weight", "nan or inf"], "config"),
    "nan-weight-forced-over-an-old-merge": (nan_weight_forced_over_an_old_merge, ["nan or inf"], "config"),
}


@pytest.fixture(scope="module")
def output_runs(zoo, tmp_path_factory):
    """Every output case once, in process and in turn (the CLI runner swaps sys.stdout, so no threads)."""
    root = tmp_path_factory.mktemp("output_cases")

    def run(name: str) -> Refusal:
        case = root / name
        case.mkdir()
        arranged = OUTPUT_CASES[name][0](zoo, case)
        config_path = arranged.config_path or case / "merge.yml"
        config_path.write_text(yaml.safe_dump(drop_none(arranged.config)))
        before = snapshot(case)
        finished = run_cli_in_process("merge", config_path, arranged.out, *arranged.args)
        prefix = arranged.out if OUTPUT_CASES[name][2] == "out" else config_path
        return Refusal(finished, str(prefix), before, snapshot(case))

    zoo_before = snapshot(zoo.root)
    runs = {name: run(name) for name in OUTPUT_CASES}
    assert snapshot(zoo.root) == zoo_before, "a refused merge changed the input models"
    return runs


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_refused_output_exits_2_and_changes_nothing(case, output_runs):
    """Inputs byte-identical, OUT as it was (absent, or the old merge), no staging folder beside it."""
    assert_refused(output_runs[case], OUTPUT_CASES[case][1])


def read_only_runner():
    """Runs a command with a read-only filesystem mounted at a folder (a user namespace), or skips."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -rm (user namespaces) to mount a read-only filesystem")

    def run(mount_point: Path, *command: str | Path) -> subprocess.CompletedProcess:
        # Mounts a read-only tmpfs at mount_point, runs the command, then lists what it left there.
        script = 'mount -t tmpfs -o ro none "$1" || exit 99; shift; "$@"; status=$?; ls -A "$MOUNT"; exit $status'
        return subprocess.run(
            [unshare, "-rm", "sh", "-c", script, "sh", str(mount_point), *map(str, command)],
            capture_output=True,
            text=True,
            env={**os.environ, "MOUNT": str(mount_point)},
            timeout=300,
        )

    return run


def test_merge_into_read_only_filesystem_exits_2(zoo, write_config, tmp_path):
    run_read_only = read_only_runner()
    config_path = write_config(linear_config(zoo.model("ft_a")))
    mount_point = tmp_path / "read_only"
    mount_point.mkdir()
    finished = run_read_only(mount_point, EVOMERGE_BIN, "merge", config_path, mount_point / "out")
    assert finished.returncode == 2, finished.stderr
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in finished.stderr, finished.stderr
    assert lines[0].startswith(f"error: {mount_point / 'out'}: cannot write")
    assert "read-only file system" in lines[0].lower()
    assert finished.stdout == "", f"left behind on the read-only filesystem: {finished.stdout}"


# ---- evomerge export -o: where the YAML goes ---------------------------------------------------


def run_with_local_models(case: Path) -> Path:
    """A copy of the frozen run whose models are folders under case/models (what -o must not overwrite)."""
    run = Path(shutil.copytree(FROZEN_RUN, case / "runs" / FROZEN_RUN.name))
    for name in ("journal.jsonl", "spec.yaml"):
        text = (run / name).read_text()
        (run / name).write_text(text.replace("/frozen-run/", f"{case}/models/"))
    for model in ("base", "expert_a", "expert_b"):
        (case / "models" / model).mkdir(parents=True)
        (case / "models" / model / "model.safetensors").write_bytes(b"weights of " + model.encode())
    return run


def an_earlier_yaml(case: Path) -> Path:
    (case / "best.yaml").write_text("an earlier export")
    return case / "best.yaml"


# name -> (arguments after `export RUN`, from the case folder and its run; substrings of the one line;
# what the line starts with: '-o', or the path given)
EXPORT_CASES = {
    "export-to-a-folder": (lambda case, run: ["-o", case / "existing_folder"], ["is a folder", "best.yaml"], "-o"),
    "export-parent-missing": (lambda case, run: ["-o", case / "missing" / "best.yaml"], ["does not exist"], "-o"),
    "export-over-the-journal": (
        lambda case, run: ["-o", run / "journal.jsonl", "--force"],
        ["is inside the run directory"],
        "path",
    ),
    "export-over-the-frozen-spec": (
        lambda case, run: ["-o", run / "spec.yaml"],
        ["is inside the run directory"],
        "path",
    ),
    "export-over-a-snapshot": (
        lambda case, run: ["-o", next((run / "optimizer").iterdir()), "--force"],
        ["is inside the run directory"],
        "path",
    ),
    "export-over-the-base-weights": (
        lambda case, run: ["-o", case / "models" / "base" / "model.safetensors", "--force"],
        ["inside the input model", "outside every input"],
        "-o",
    ),
    "export-over-an-input-folder": (
        lambda case, run: ["-o", case / "models" / "expert_a"],
        ["is the input model"],
        "-o",
    ),
    "export-over-an-existing-file": (lambda case, run: ["-o", an_earlier_yaml(case)], ["exists", "--force"], "-o"),
    "export-merged-into-its-run-forced": (
        lambda case, run: ["--merge", run, "--force"],
        ["is the run directory"],
        "path",
    ),
    "export-merged-into-the-runs-dir-forced": (
        lambda case, run: ["--merge", run.parent, "--force"],
        ["contains the run directory"],
        "path",
    ),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_bad_export_output_exits_2_and_leaves_nothing(case, tmp_path):
    """Nothing under the case folder (the run, its inputs, an earlier export) changes."""
    (tmp_path / "existing_folder").mkdir()
    run = run_with_local_models(tmp_path)
    arguments, expected, shown = EXPORT_CASES[case]
    arguments = arguments(tmp_path, run)
    before = snapshot(tmp_path)
    finished = run_cli_in_process("export", run, *arguments)
    prefix = "-o" if shown == "-o" else str(arguments[1])  # a run folder's refusal starts with the path
    assert_refused(Refusal(finished, prefix, before, snapshot(tmp_path)), expected)


def test_merge_creates_the_missing_parents_of_out(zoo, write_config, tmp_path):
    """As mergekit-yaml does; a failed merge removes the folders it made."""
    config_path = write_config(linear_config(zoo.model("ft_a")))
    out = tmp_path / "new" / "deeper" / "out"
    finished = run_cli_in_process("merge", config_path, out)
    assert finished.returncode == 0, finished.stderr
    assert (out / "model.safetensors").is_file() or any(out.glob("*.safetensors"))
    bad = write_config(linear_config(zoo.model("ft_a"), zoo.corrupt), "corrupt.yml")
    failed = run_cli_in_process("merge", bad, tmp_path / "other" / "deeper" / "out")
    assert failed.returncode != 0
    assert not (tmp_path / "other").exists(), "a failed merge left the parent folders it made"


def test_export_to_read_only_filesystem_exits_2(tmp_path):
    run_read_only = read_only_runner()
    mount_point = tmp_path / "read_only"
    mount_point.mkdir()
    finished = run_read_only(mount_point, EVOMERGE_BIN, "export", FROZEN_RUN, "-o", mount_point / "best.yaml")
    assert finished.returncode == 2, finished.stderr
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in finished.stderr, finished.stderr
    assert lines[0].startswith("error: -o: cannot write") and "read-only file system" in lines[0].lower()
    assert finished.stdout == "", f"left behind on the read-only filesystem: {finished.stdout}"


def test_debug_flag_shows_traceback(zoo, write_config, evomerge_cli, tmp_path):
    config_path = write_config(ties_config(zoo, merge_method="tie"))
    finished = evomerge_cli("merge", config_path, tmp_path / "out", "--debug")
    assert finished.returncode != 0
    assert "Traceback" in finished.stderr
    assert "merge_method" in finished.stderr


def test_corrupt_checkpoint_really_is_unreadable(zoo):
    """Guards the premise of the tests above: reading a weight of the corrupt model fails."""
    with pytest.raises(Exception):  # noqa: B017 - any read error proves the premise
        safetensors.torch.load_file(f"{zoo.corrupt}/model.safetensors")


@pytest.fixture
def weights_unreadable(monkeypatch):
    """Make every way evomerge could open tensor data raise, wherever it imported it from."""
    import sys

    import evomerge.merge.engine  # noqa: F401  (imported so its names can be patched)
    import evomerge.merge.validate  # noqa: F401

    def refuse(*args, **kwargs):
        raise AssertionError("a weight file was opened during validation")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    for name, module in list(sys.modules.items()):
        if name.startswith("evomerge"):
            for attribute in ("safe_open", "load_file"):
                if hasattr(module, attribute):
                    monkeypatch.setattr(module, attribute, refuse)


@pytest.mark.parametrize(
    "case", ["ties-without-base", "density-above-one", "shape-mismatch", "layer-range-out-of-bounds"]
)
def test_validation_reads_no_weights(case, zoo, write_config, weights_unreadable):
    from evomerge.merge.config import load_merge_config
    from evomerge.merge.validate import validate_merge_config

    config = load_merge_config(write_config(drop_none(ERROR_CASES[case][0](zoo))))
    with pytest.raises(UserError) as raised:
        validate_merge_config(config)
    for expected in ERROR_CASES[case][1]:
        assert expected.lower() in str(raised.value).lower()


def test_a_run_path_holding_a_newline_cannot_inject_keys_into_the_exported_yaml(tmp_path):
    """The `# evomerge run:` comment would end at the newline and the rest be read as YAML keys."""
    run = Path(shutil.copytree(FROZEN_RUN, tmp_path / "runs\nout_dtype: float16" / "v0"))
    before = snapshot(tmp_path)
    finished = run_cli_in_process("export", run, "-o", tmp_path / "best.yaml")
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert finished.returncode == 2 and len(lines) == 1, finished.stderr
    record_refusal(lines[0])
    assert "control character" in lines[0] and "out_dtype" in lines[0]
    assert snapshot(tmp_path) == before


# name -> a model or label name that Markdown, HTML or a table row would otherwise read as syntax
HOSTILE_NAMES = {
    "backtick": "/models/a`b",
    "script-tag": "/models/<script>alert(1)</script>",
    "img-onerror": '/models/<img src=x onerror="alert(1)">',
    "table-pipe": "/models/a | b",
    "newline": "/models/a\n| injected | row |",
    "emphasis-and-link": "/models/*bold* _it_ [link](http://x)",
}


@pytest.mark.parametrize("case", list(HOSTILE_NAMES))
def test_the_model_card_writes_hostile_names_as_literal_text(case):
    from evomerge.merge.card import ScoreRow, SearchOrigin, render_model_card
    from evomerge.merge.config import MergeConfig

    name = HOSTILE_NAMES[case]
    config = MergeConfig.model_validate(
        {"merge_method": "linear", "models": [{"model": name, "parameters": {"weight": 1.0}}]}
    )
    row = ScoreRow(name, 0.5, 0.01, 0.4, 0.01)
    card = render_model_card(name, config, f"# {name}\n", 0, SearchOrigin(name, 3, row, (row,)))
    body = card.split("\n---\n", 1)[1]
    prose, _, _ = body.partition("## Configuration")
    outside_code = re.sub(r"(`+).*?\1", "", prose)  # inside a code span HTML is shown, not run
    assert "<script" not in outside_code and "<img" not in outside_code, "raw HTML outside code"
    table = [line for line in prose.splitlines() if line.startswith("|")]
    assert len(table) == 4 and all(line.count("|") == 4 for line in table), table
    source = next(line for line in prose.splitlines() if line.startswith("- "))[2:]
    ticks = len(source) - len(source.lstrip("`"))
    inner = source[ticks:-ticks]
    assert source.endswith("`" * ticks) and "`" * ticks not in inner, f"the code span can be closed early: {source}"
    assert inner.strip() == name.replace("\n", " ")
    fence = body.split("## Configuration\n\n", 1)[1].split("yaml\n", 1)[0]
    assert fence.count("`") >= 3 and fence not in name


def test_a_config_holding_a_fence_cannot_close_the_card_s_yaml_block():
    from evomerge.merge.card import render_model_card
    from evomerge.merge.config import MergeConfig

    config = MergeConfig.model_validate(
        {"merge_method": "linear", "models": [{"model": "/m", "parameters": {"weight": 1.0}}]}
    )
    card = render_model_card("out", config, "# ```\n# <script>x</script>\nmerge_method: linear\n", 0)
    assert "\n````yaml\n" in card and card.rstrip().endswith("````")
