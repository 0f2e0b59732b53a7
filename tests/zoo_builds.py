"""What the zoo-builder tests (test_demo_zoo.py, test_forget_zoo.py) share: loading a builder script,
two quick builds, and the checks of the models they build."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_build_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quick_builds(build_script, tmp_path_factory, prefix: str) -> list[Path]:
    """Two independent quick builds (a few optimizer steps per stage) into fresh folders."""
    return [
        build_script.build_zoo(tmp_path_factory.mktemp(f"{prefix}{i}"), quick=True, threads=1, check=False)
        for i in range(2)
    ]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def assert_identical_builds(first: Path, second: Path, model_dirs) -> None:
    """Every model of two builds has the same float32 tensors, bit for bit."""
    for name in model_dirs:
        a, b = load_weights(first / name), load_weights(second / name)
        assert a.keys() == b.keys()
        assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a), name
