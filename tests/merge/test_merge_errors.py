"""Bad merge configs fail fast: exit code 2, one line naming the field, and no weight read.

Most cases reference the zoo's corrupt checkpoint (intact header, truncated data): had evomerge
read a weight before rejecting the config, it would die with a safetensors error instead.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import safetensors
import safetensors.torch
import yaml
from tiny_models import TinyZoo

from evomerge.errors import UserError


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
}


def drop_none(config: dict) -> dict:
    return {key: value for key, value in config.items() if value is not None}


@pytest.fixture(scope="module")
def error_runs(zoo, tmp_path_factory, evomerge_cli):
    """Run every error case through the CLI once, concurrently (each run pays ~3 s of imports)."""
    root = tmp_path_factory.mktemp("error_cases")

    def run(name: str):
        built = ERROR_CASES[name][0](zoo)
        config_path = root / f"{name}.yml"
        config_path.write_text(built if isinstance(built, str) else yaml.safe_dump(drop_none(built)))
        return evomerge_cli("merge", config_path, root / f"{name}-out"), root / f"{name}-out"

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(ERROR_CASES, pool.map(run, ERROR_CASES), strict=False))


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_config_exits_2_with_one_line(case, error_runs):
    finished, out_dir = error_runs[case]
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert finished.returncode == 2, f"exit {finished.returncode}; stderr:\n{finished.stderr}"
    assert "Traceback" not in finished.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{finished.stderr}"
    for expected in ERROR_CASES[case][1]:
        assert expected.lower() in lines[0].lower(), f"{expected!r} not in: {lines[0]}"
    assert not list(out_dir.glob("*.safetensors")), "weights were written despite the error"


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
