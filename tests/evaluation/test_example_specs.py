"""The example specs users start from validate as written against the stand-in hub: hub models by
ID, standard lm-eval benchmarks (gsm8k, arc_challenge, the mmlu group) and held-out docs carved from
them. Slow: the mmlu group builds 57 subject datasets for each of the two eval sets."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import yaml
from hub_fixtures import add_arc_easy, add_config_dataset, add_mmlu
from refusals import run_cli_in_process

REPO = Path(__file__).resolve().parents[2]
LAYERS = 32  # the layer count of Mistral-7B and Llama-3-8B, which the specs' layer groups divide
GSM8K_ROWS = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(8)]


@functools.cache
def tiny_checkpoint(seed: int) -> dict[str, bytes]:
    """A tiny Llama with the examples' layer count: every spec'd model shares its tokenizer."""
    from tiny_models import BASE_VOCAB, build_base, build_tokenizer, save_checkpoint, tiny_llama_config
    from torch import float32

    config = tiny_llama_config()
    config.num_hidden_layers = LAYERS
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(build_base(config, seed=seed), build_tokenizer(BASE_VOCAB), Path(folder), float32)
        return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}


def serve_spec_inputs(hub, spec: dict) -> None:
    models = [spec["models"]["base"], *spec["models"]["experts"]]
    for seed, name in enumerate(models):
        hub.add_repo(name.partition("@")[0], tiny_checkpoint(seed))
    add_config_dataset(hub, "openai/gsm8k", {"main": {"train": GSM8K_ROWS, "test": GSM8K_ROWS}})
    add_arc_easy(hub)
    add_mmlu(hub)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mistral-7b"])
def test_the_example_spec_validates_against_the_hub_as_written(standin_hub, name, tmp_path):
    source = REPO / "search_spaces" / f"{name}.yaml"
    spec = yaml.safe_load(source.read_text())
    serve_spec_inputs(standin_hub, spec)
    copy = tmp_path / source.name  # validate may write nothing beside the repo's own spec
    copy.write_text(source.read_text())

    code, lines = run_cli_in_process("validate", copy, "--gpu-memory", "80GiB")

    assert code == 0, lines
