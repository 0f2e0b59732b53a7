"""Pytest fixtures that point huggingface_hub, datasets and subprocesses at a `StandinHub`.

`standin_hub` starts a hub, sets `HF_ENDPOINT` to it, gives a fresh `HF_HOME` under the test's
tmp_path and turns offline mode off, both in `os.environ` (for subprocesses such as the evomerge
command line) and in the constants huggingface_hub and datasets read once at import (for calls
made in the test process). `go_offline()` then turns offline mode back on the same two ways.
The payload builders lay out models and datasets the way the real hub repos are laid out.
"""

from __future__ import annotations

import functools
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from standin_hub import StandinHub

# Variables that would send clients elsewhere than the stand-in and its fresh cache.
CLEARED_VARIABLES = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_TOKEN_PATH",
    "HF_DATASETS_CACHE",
    "HF_MODULES_CACHE",
    "XDG_CACHE_HOME",
)
# Calls the real clients make to hosts other than the hub (download counters, telemetry):
# with no network they would wait for a timeout.
QUIET_VARIABLES = {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0", "DO_NOT_TRACK": "1"}


def rehome(module: object, old_home: str, new_home: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Move every path constant of `module` that lies under `old_home` to the same place under `new_home`."""
    for name, value in list(vars(module).items()):
        if name.isupper() and isinstance(value, str | Path) and str(value).startswith(old_home):
            moved = new_home + str(value)[len(old_home) :]
            monkeypatch.setattr(module, name, Path(moved) if isinstance(value, Path) else moved)


def hub_constants(hub: StandinHub, home: Path) -> dict[str, object]:
    """What huggingface_hub.constants would hold had it been imported with the fixture's environment."""
    import huggingface_hub.constants as constants

    return {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
    }


def datasets_constants(hub: StandinHub, home: Path) -> dict[str, object]:
    """What datasets.config would hold had it been imported with the fixture's environment."""
    return {
        "HF_ENDPOINT": hub.url,
        "HUB_DATASETS_URL": hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_CACHE_HOME": str(home),
        "HF_DATASETS_CACHE": home / "datasets",
        "HF_MODULES_CACHE": home / "modules",
        "DOWNLOADED_DATASETS_PATH": home / "datasets" / "downloads",
        "EXTRACTED_DATASETS_PATH": home / "datasets" / "downloads" / "extracted",
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
        # The dataset viewer's parquet export lives on another host (datasets-server.<hub host>).
        "USE_PARQUET_EXPORT": False,
    }


def point_clients_at(hub: StandinHub, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Send huggingface_hub and datasets (in this process and in subprocesses) to `hub`, caching in `home`."""
    import datasets.config
    import huggingface_hub.constants
    import huggingface_hub.hf_api

    for name in CLEARED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**QUIET_VARIABLES, "HF_ENDPOINT": hub.url, "HF_HOME": str(home)}.items():
        monkeypatch.setenv(name, value)
    old_home = huggingface_hub.constants.HF_HOME
    rehome(huggingface_hub.constants, old_home, str(home), monkeypatch)
    rehome(datasets.config, datasets.config.HF_CACHE_HOME, str(home), monkeypatch)
    if "transformers.utils.hub" in sys.modules:
        rehome(sys.modules["transformers.utils.hub"], old_home, str(home), monkeypatch)
    for module, values in (
        (huggingface_hub.constants, hub_constants(hub, home)),
        (datasets.config, datasets_constants(hub, home)),
        # `huggingface_hub.model_info` and the other module-level calls share one HfApi made at import.
        (huggingface_hub.hf_api.api, {"endpoint": hub.url}),
    ):
        for name, value in values.items():
            monkeypatch.setattr(module, name, value)
    set_offline(False, monkeypatch)


def set_offline(offline: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn hub and datasets offline mode on or off, in os.environ and in the imported constants."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if offline:
            monkeypatch.setenv(name, "1")
        else:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", offline)


@pytest.fixture
def standin_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHub]:
    """A running `StandinHub` every hub client of this test (and its subprocesses) talks to."""
    with StandinHub() as hub:
        point_clients_at(hub, tmp_path / "hf_home", monkeypatch)
        yield hub


@pytest.fixture
def go_offline(standin_hub: StandinHub, monkeypatch: pytest.MonkeyPatch):
    """`go_offline()` sets HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1, in os.environ and in the imported constants."""
    return functools.partial(set_offline, True, monkeypatch)


def tiny_model_files(seed: int = 0) -> dict[str, bytes]:
    """The files of a tiny random Llama checkpoint (safetensors, config.json, tokenizer), by repo path."""
    return dict(built_tiny_model(seed))


def folder_files(folder: str | Path) -> dict[str, bytes | str | Path]:
    """Every file under a local folder (a checkpoint of the tiny zoo, say), by repo path, for `add_repo`."""
    root = Path(folder)
    return {path.relative_to(root).as_posix(): path for path in sorted(root.rglob("*")) if path.is_file()}


@functools.cache
def built_tiny_model(seed: int) -> dict[str, bytes]:
    """Built once per seed and process: building takes a moment and the bytes never change."""
    from tiny_models import BASE_VOCAB, build_base, build_tokenizer, save_checkpoint, tiny_llama_config
    from torch import float32

    with tempfile.TemporaryDirectory() as folder:
        model = build_base(tiny_llama_config(), seed=seed)
        save_checkpoint(model, build_tokenizer(BASE_VOCAB), Path(folder), float32)
        return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}


def parquet_bytes(rows: list[dict]) -> bytes:
    """`rows` as one parquet file, the format the hub's dataset repos use."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def jsonl_bytes(rows: list[dict]) -> bytes:
    """`rows` as JSON lines."""
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def dataset_card(configs: dict[str, dict[str, str]]) -> str:
    """A README.md whose YAML header lists each config's data files per split, as hub dataset cards do."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, pattern in splits.items():
            lines += [f"  - split: {split}", f"    path: {pattern}"]
    return "\n".join([*lines, "---", "", "A dataset served by the stand-in hub.", ""])


def split_rows(rows: list[dict] | dict[str, list[dict]], splits: tuple[str, ...]) -> dict[str, list[dict]]:
    """Rows per split: a list is used for every split, a dict maps each split to its own rows."""
    return dict(rows) if isinstance(rows, dict) else dict.fromkeys(splits, rows)


def add_config_dataset(
    hub: StandinHub, repo_id: str, configs: dict[str, dict[str, list[dict]]], **repo_options: object
) -> str:
    """A dataset repo with one folder per config holding `{split}-00000-of-00001.parquet`, and its card."""
    files: dict[str, bytes | str | Path] = {}
    card: dict[str, dict[str, str]] = {}
    for config, splits in configs.items():
        card[config] = {split: f"{config}/{split}-*" for split in splits}
        for split, rows in splits.items():
            files[f"{config}/{split}-00000-of-00001.parquet"] = parquet_bytes(rows)
    files["README.md"] = dataset_card(card)
    return hub.add_repo(repo_id, files, repo_type="dataset", **repo_options)  # type: ignore[arg-type]


ARC_SPLITS = ("train", "validation", "test")
MMLU_SPLITS = ("test", "validation", "dev")


def arc_row(index: int, question: str, choices: list[str], answer: int) -> dict:
    """One allenai/ai2_arc row: choices carry their letters, answerKey names the right one."""
    labels = [chr(ord("A") + position) for position in range(len(choices))]
    return {
        "id": f"standin/{index}",
        "question": question,
        "choices": {"text": choices, "label": labels},
        "answerKey": labels[answer],
    }


ARC_SAMPLE_ROWS = [
    arc_row(0, "Which is a liquid at room temperature?", ["water", "iron", "salt", "sand"], 0),
    arc_row(1, "What do plants take in to make food?", ["plastic", "sunlight", "glass", "stone"], 1),
]


def add_arc_easy(hub: StandinHub, rows: list[dict] | dict[str, list[dict]] = ARC_SAMPLE_ROWS, **options) -> str:
    """allenai/ai2_arc as the real repo lays it out (ARC-Easy and ARC-Challenge configs), `rows` in each split."""
    per_split = split_rows(rows, ARC_SPLITS)
    return add_config_dataset(hub, "allenai/ai2_arc", {"ARC-Challenge": per_split, "ARC-Easy": per_split}, **options)


def bundled_tasks_folder() -> Path:
    """lm-eval's folder of bundled task YAMLs."""
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def bundled_task_manager(*folders: str):
    """An lm-eval TaskManager that indexes only these folders of its bundled YAMLs (e.g. "arc", "mmlu/default").

    The YAMLs are lm-eval's own, unchanged; indexing a few folders takes a fraction of a second where
    indexing all of them takes several.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[bundled_tasks_folder() / each for each in folders], include_defaults=False)


def mmlu_subjects() -> list[str]:
    """Every subject lm-eval's bundled mmlu group runs (one `mmlu_<subject>.yaml` each)."""
    folder = bundled_tasks_folder() / "mmlu" / "default"
    return sorted(path.stem.removeprefix("mmlu_") for path in folder.glob("mmlu_*.yaml"))


def mmlu_row(question: str, choices: list[str], answer: int, subject: str = "") -> dict:
    """One cais/mmlu row: four choices and the index of the right one."""
    return {"question": question, "subject": subject, "choices": choices, "answer": answer}


MMLU_SAMPLE_ROWS = [
    mmlu_row("What is 2 + 2?", ["3", "4", "5", "6"], 1),
    mmlu_row("Which is a prime number?", ["4", "6", "7", "9"], 2),
]


def add_mmlu(
    hub: StandinHub,
    subjects: list[str] | tuple[str, ...] | None = None,
    rows: list[dict] | dict[str, list[dict]] = MMLU_SAMPLE_ROWS,
    **options,
) -> str:
    """cais/mmlu as the real repo lays it out: a config per subject with test, validation and dev (few-shot) splits.

    `subjects` defaults to all of them, which the `mmlu` group needs; its subtasks need only theirs.
    """
    configs = {}
    for subject in subjects if subjects is not None else mmlu_subjects():
        per_split = split_rows(rows, MMLU_SPLITS)
        configs[subject] = {split: [{**row, "subject": subject} for row in each] for split, each in per_split.items()}
    return add_config_dataset(hub, "cais/mmlu", configs, **options)


def hub_environment(hub: StandinHub) -> dict[str, str]:
    """A copy of os.environ for a subprocess (set up by the `standin_hub` fixture) that also holds the hub's token."""
    return {**os.environ, "HF_TOKEN": hub.token}
