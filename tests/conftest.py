"""Shared fixtures for the merge tests: the tiny model zoo and runners for both merge tools.

mergekit is run in-process through `run_merge`, the function `mergekit-yaml` calls, because
its command line spends ~4 s importing per run and the oracle tests run it many times.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

# Set before anything imports huggingface_hub so no test can reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU, the fused merge kernel's tests run it in Triton's CPU interpreter, which must be
# chosen before anything imports triton. Workers never take that path (merge/fused/sources.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The demo zoo's generator (demo_data) lives with the scripts that build the demo.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from tiny_models import TinyZoo, build_zoo  # noqa: E402

pytest_plugins = ["hub_fixtures"]

EVOMERGE_BIN = Path(sys.executable).with_name("evomerge")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> TinyZoo:
    """Tiny Llama base + fine-tunes (fp32 and bf16) built once per test session."""
    return build_zoo(tmp_path_factory.mktemp("tiny_zoo"))


@pytest.fixture
def write_config(tmp_path):
    """Write a merge config (dict or raw YAML text) to a file and return its path."""

    def write(config: dict | str, name: str = "merge.yml") -> Path:
        path = tmp_path / name
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        path.write_text(text)
        return path

    return write


def run_evomerge_cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `evomerge` command; returns the finished process, never raises."""
    command = [str(EVOMERGE_BIN), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def run_mergekit(config_path: Path, out_dir: Path, seed: int | None = None) -> Path:
    """Merge with mergekit 0.1.5 exactly as `mergekit-yaml --no-write-model-card` would."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    source = Path(config_path).read_text()
    options = MergeOptions(write_model_card=False, quiet=True, random_seed=seed)
    options.apply_global_options()
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(source)), str(out_dir), options=options, config_source=source
    )
    return Path(out_dir)


@pytest.fixture(scope="session")
def evomerge_cli():
    """`evomerge_cli(*args)` runs the evomerge command line and returns the finished process."""
    return run_evomerge_cli


@pytest.fixture
def mergekit_merge():
    """`mergekit_merge(config_path, out_dir, seed=None)` runs the mergekit oracle."""
    pytest.importorskip("mergekit")
    return run_mergekit
