"""Multi-document merge YAMLs: the refusals, the round trip of the writer, and `evomerge merge` against `mergekit-multi`.

The oracle case merges a named TIES merge of the tiny zoo, then a passthrough whose slices take
layers from that merge and from a zoo model; `mergekit-multi` (mergekit 0.1.5, run offline as users
run it) must write the same tensors bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from merge.cli_runner import run_cli_in_process
from merge.mergekit_equality import compare_folders

from evomerge.errors import UserError
from evomerge.merge.config import MergeConfig
from evomerge.merge.multi import multi_document_yaml, read_documents

LINEAR = "merge_method: linear\nmodels: [{model: m1, parameters: {weight: 1}}, {model: m2, parameters: {weight: 1}}]\n"


def named(name: str, *models: str) -> str:
    """A named linear merge of `models` as one YAML document."""
    entries = ", ".join(f"{{model: {model}, parameters: {{weight: 1}}}}" for model in models)
    return f"name: {name}\nmerge_method: linear\nmodels: [{entries}]\n"


REFUSALS = {
    "no unnamed final": (named("a", "m1", "m2") + "---\n" + named("b", "a", "m2"), "none is the final merge"),
    "two unnamed": (named("a", "m1", "m2") + "---\n" + LINEAR.replace("m1", "a") + "---\n" + LINEAR, "document 2 and document 3 have no name:"),
    "duplicate name": (named("a", "m1", "m2") + "---\n" + named("a", "m1", "m3") + "---\n" + LINEAR.replace("m1", "a"), "document 1 ('a') has this name too"),
    "hub-like name": (named("org/a", "m1", "m2") + "---\n" + LINEAR.replace("m1", "org/a"), "looks like a hub ID (org/name); rename it"),
    "name is a folder": (named("folder", "m1", "m2") + "---\n" + LINEAR.replace("m1", "folder"), "is also a file or folder here"),
    "cycle": (named("a", "b", "m2") + "---\n" + named("b", "a", "m2") + "---\n" + LINEAR.replace("m1", "a"), "cycle (a -> b -> a)"),
    "self cycle": (named("a", "a", "m2") + "---\n" + LINEAR.replace("m1", "a"), "cycle (a -> a)"),
    "empty document": (named("a", "m1", "m2") + "---\n---\n" + LINEAR.replace("m1", "a"), "document 2: empty; remove the extra '---'"),
    "unused merge": (named("a", "m1", "m2") + "---\n" + LINEAR, "document 1 ('a'): no other document uses this merge"),
    "name with a space": ("name: a b\n" + named("x", "m1", "m2").split("\n", 1)[1] + "---\n" + LINEAR, "not a plain folder name"),
    "name not text": ("name: 7\n" + named("x", "m1", "m2").split("\n", 1)[1] + "---\n" + LINEAR, "7 is not text"),
    "reserved name": (named("base", "m1", "m2") + "---\n" + LINEAR.replace("m1", "base"), "means something else in tokenizer_source"),
    "bad config": ("name: a\nmerge_method: linear\n---\n" + LINEAR.replace("m1", "a"), "document 1 ('a'): give exactly one of"),
    "revision on a name": (named("a", "m1", "m2") + "---\n" + LINEAR.replace("m1", "a@main"), "no other document uses this merge"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_document_in_one_line(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    text, expected = REFUSALS[case]
    with pytest.raises(UserError) as raised:
        read_documents(text, "multi.yml")
    message = str(raised.value)
    assert expected in message and message.startswith("multi.yml: ") and "\n" not in message


def test_named_merges_come_out_after_the_merges_they_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = named("late", "early", "m2") + "---\n" + named("early", "m1", "m2") + "---\n" + LINEAR.replace("m1", "late")
    multi = read_documents(text, "multi.yml")
    assert [merge.name for merge in multi.intermediates] == ["early", "late"]
    assert multi.final.referenced_models() == ["late", "m2"]
    assert multi.source_models() == ["m1", "m2"]


def test_a_single_document_is_still_a_plain_merge_yaml(zoo, write_config, tmp_path):
    from evomerge.merge.multi import load_documents

    assert load_documents(write_config(LINEAR, "single.yml")) is None
    assert load_documents(write_config("---\n" + LINEAR, "marked.yml")) is None


def test_the_written_yaml_reads_back_as_the_same_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = {"merge_method": "ties", "base_model": "m0", "models": [{"model": "m1", "parameters": {"weight": 0.5}}]}
    second = {"merge_method": "linear", "models": [{"model": "first"}, {"model": "m2"}], "dtype": "float32"}
    final = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "second", "layer_range": [0, 2]}]}],
        "tokenizer_source": "first",
    }
    text = multi_document_yaml([("first", first), ("second", second)], final, header="# made by a test\n# twice")
    assert text.startswith("# made by a test\n# twice\nname: first\n")
    multi = read_documents(text, "multi.yml")
    assert [(m.name, m.config) for m in multi.intermediates] == [
        ("first", MergeConfig.model_validate(first)),
        ("second", MergeConfig.model_validate(second)),
    ]
    assert multi.final == MergeConfig.model_validate(final)


def test_mergekit_multi_reads_the_written_yaml(tmp_path):
    pytest.importorskip("mergekit")
    from mergekit.scripts.multimerge import load_config

    final = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "step", "layer_range": [0, 2]}]}]}
    text = multi_document_yaml([("step", {"merge_method": "linear", "models": [{"model": "m1"}]})], final)
    configs, dependencies = load_config(text, str(tmp_path))
    assert set(configs) == {"step", None} and dependencies == {"step": set(), None: {"step"}}
    assert configs[None].slices[0].sources[0].model.model.path == str(tmp_path / "step")


@pytest.mark.parametrize(
    ("intermediates", "final", "header", "expected"),
    [
        ([("a/b", {"merge_method": "linear", "models": [{"model": "m1"}]})], {}, "", "looks like a hub ID"),
        ([("a", {"merge_method": "linear", "models": [{"model": "m1"}]})], {"merge_method": "linear", "models": [{"model": "m1"}]}, "", "no other document uses"),
        ([], {"merge_method": "linear", "models": [{"model": "m1"}]}, "not a comment", "header must be comment lines"),
    ],
)  # fmt: skip
def test_the_writer_refuses_what_would_not_read_back(intermediates, final, header, expected):
    with pytest.raises(ValueError, match=expected):
        multi_document_yaml(intermediates, final, header)


def two_step_yaml(zoo, late_layer_model: str = "ft_c", stop: int = 4) -> str:
    """A TIES merge named 'step1', then a passthrough of its first two layers and a zoo model's last ones."""
    step = {
        "name": "step1",
        "merge_method": "ties",
        "base_model": zoo.model("base"),
        "dtype": "float32",
        "models": [
            {"model": zoo.model("ft_a"), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": zoo.model("ft_b"), "parameters": {"weight": 0.4, "density": 0.7}},
        ],
    }
    final = {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": "step1", "layer_range": [0, 2]}]},
            {"sources": [{"model": zoo.model(late_layer_model), "layer_range": [2, stop]}]},
        ],
    }
    return yaml.safe_dump(step, sort_keys=False) + "---\n" + yaml.safe_dump(final, sort_keys=False)


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    report = compare_folders(ours, theirs)
    assert report.tensors, f"no tensors in {theirs}"
    report.assert_bit_for_bit()


def run_mergekit_multi(config: Path, out: Path, intermediate_dir: Path) -> None:
    """`HF_HUB_OFFLINE=1 mergekit-multi --no-write-model-card CONFIG -I DIR --out-path OUT`, as users run it."""
    command = Path(sys.executable).with_name("mergekit-multi")
    arguments = [str(config), "-I", str(intermediate_dir), "--out-path", str(out), "--no-write-model-card"]
    finished = subprocess.run(
        [str(command), *arguments],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]


def test_merge_of_a_multi_document_yaml_equals_mergekit_multi(zoo, write_config, mergekit_merge, tmp_path):
    config = write_config(two_step_yaml(zoo), "two_step.yml")
    run_mergekit_multi(config, tmp_path / "mergekit", tmp_path / "mergekit_steps")
    finished = run_cli_in_process("merge", config, tmp_path / "evomerge", "-I", tmp_path / "evomerge_steps")
    assert finished.returncode == 0, finished.stderr
    assert_same_tensors(tmp_path / "evomerge_steps" / "step1", tmp_path / "mergekit_steps" / "step1")
    assert_same_tensors(tmp_path / "evomerge", tmp_path / "mergekit")
    ours, theirs = (json.loads((tmp_path / side / "config.json").read_text()) for side in ("evomerge", "mergekit"))
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"] == 4

    again = run_cli_in_process("merge", config, tmp_path / "again", "-I", tmp_path / "evomerge_steps")
    assert again.returncode == 0 and "reusing the merge already in" in again.stderr, again.stderr
    assert_same_tensors(tmp_path / "again", tmp_path / "mergekit")


def test_without_an_intermediate_folder_nothing_but_out_is_left(zoo, write_config, tmp_path):
    config = write_config(two_step_yaml(zoo), "two_step.yml")
    finished = run_cli_in_process("merge", config, tmp_path / "out" / "model")
    assert finished.returncode == 0, finished.stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["model"]
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "name: step1" in card and "merge_method: passthrough" in card and "`mergekit-multi` rebuilds it" in card
    front_matter = yaml.safe_load(card.split("---\n")[1])
    assert front_matter["base_model"] == [zoo.model(name) for name in ("base", "ft_a", "ft_b", "ft_c")]


def test_a_failing_final_merge_leaves_no_staging_behind(zoo, write_config, tmp_path):
    config = write_config(two_step_yaml(zoo, stop=9), "two_step.yml")
    finished = run_cli_in_process("merge", config, tmp_path / "out" / "model")
    assert finished.returncode == 2, finished.stderr
    assert "two_step.yml: document 2: " in finished.stderr and "layer_range" in finished.stderr
    assert not (tmp_path / "out").exists()


def test_intermediate_dir_is_refused_for_a_single_merge(zoo, write_config, tmp_path):
    config = write_config(LINEAR, "single.yml")
    finished = run_cli_in_process("merge", config, tmp_path / "out", "-I", tmp_path / "steps")
    assert finished.returncode == 2 and "holds one merge" in finished.stderr, finished.stderr


def test_a_full_out_is_refused_before_any_intermediate_merge(zoo, write_config, tmp_path):
    config = write_config(two_step_yaml(zoo), "two_step.yml")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    finished = run_cli_in_process("merge", config, tmp_path / "out", "-I", tmp_path / "steps")
    assert finished.returncode == 2 and "folder is not empty" in finished.stderr, finished.stderr
    assert not (tmp_path / "steps").exists()


def test_an_interrupted_final_merge_removes_the_staged_intermediates(tmp_path, monkeypatch):
    from evomerge.merge.multi_disk import merge_documents

    monkeypatch.chdir(tmp_path)
    multi = read_documents(named("step", "m1", "m2") + "---\n" + LINEAR.replace("m1", "step"), "multi.yml")
    seen = []

    def merge_one(config, folder: Path, label: str, force: bool) -> None:
        seen.append(config.referenced_models())
        if label != multi.final_label:
            folder.mkdir()
            (folder / "config.json").write_text("{}")
            return
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_documents(
            multi,
            tmp_path / "out" / "model",
            merge_one,
            config_file=Path("multi.yml"),
            intermediate_dir=None,
            force=False,
        )
    staged = Path(seen[1][0])
    assert seen[0] == ["m1", "m2"] and staged.name == "step" and staged.parent.parent == tmp_path / "out"
    assert list(tmp_path.iterdir()) == []


def test_a_plain_merge_yaml_reader_refuses_several_documents_in_one_line(write_config):
    from evomerge.merge.config import load_merge_config

    with pytest.raises(
        UserError, match=r"holds 2 documents separated by '---' .*`evomerge merge` it to a folder first"
    ):
        load_merge_config(write_config(named("a", "m1", "m2") + "---\n" + LINEAR.replace("m1", "a")))


def test_export_output_is_refused_inside_a_model_only_an_intermediate_merge_reads(zoo, tmp_path):
    from evomerge.cli.merging import check_export_output

    text = two_step_yaml(zoo)
    inside = Path(zoo.model("ft_a")) / "exported.yaml"
    with pytest.raises(UserError, match="inside the input model"):
        check_export_output(inside, tmp_path, text, force=False)
