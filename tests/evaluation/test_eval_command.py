"""`evomerge eval SPEC --model PATH|MERGE.yaml`: a model scored exactly as the search scores a candidate.

Promises: a merge YAML scored in memory gets the very score a search worker
gives the same candidate; a model folder gets the score an Evaluator gives it; `--json` prints one
object with score, metrics, n_docs, backend and seconds; `--backend lm_eval` and `--split heldout`
are honoured; bad input is one line with exit 2, before any weight is read.
"""

from __future__ import annotations

import json

import pytest
import yaml
from search_zoo import FIXTURE_EVALS, build_trained_zoo
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from evomerge.preflight import preflight
    from evomerge.spec import load_spec

    root = tmp_path_factory.mktemp("eval_command")
    zoo = build_trained_zoo(root / "zoo")
    spec = {
        "name": "eval-command",
        "runs_dir": str(root / "runs"),
        "models": {"base": zoo["base"], "experts": [zoo["even"], zoo["odd"]]},
        "merge": {"method": "ties"},
        "genome": {"layer_groups": 2},
        "evaluation": {
            "include": [str(FIXTURE_EVALS)],
            "tasks": [{"name": "tiny_add", "metric": "acc"}, {"name": "tiny_choice", "weight": 2}],
            "heldout_tasks": [{"name": "tiny_generate", "metric": "exact_match,strict-match"}],
            "limit": 20,
            "seed": 3,
            "batch_size": 8,
        },
        "optimizer": {"seed": 7},
        "workers": {"device": "cpu"},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return preflight(load_spec(root / "spec.yaml")), root


def run_eval(*args) -> tuple[int, str, list[str]]:
    from evomerge.cli import app

    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    return result.exit_code, result.stdout, [line for line in result.stderr.splitlines() if line.strip()]


def test_a_merge_yaml_scores_as_the_search_worker_scores_it(prepared, tmp_path):
    from evomerge.search.worker import MergeWorker, WorkerSettings

    ready, root = prepared
    config = ready.genome.merge_config_dict([0.3] * ready.genome.dim)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    worker = MergeWorker(
        WorkerSettings(
            ready.spec.models.base, ready.union_config, ready.eval_sets, merge_seed=ready.spec.optimizer.seed
        )
    )
    expected = worker.evaluate(0, config)

    code, out, errors = run_eval(root / "spec.yaml", "--model", tmp_path / "merge.yaml", "--json")

    assert code == 0, errors
    figures = json.loads(out)
    assert set(figures) == {"score", "metrics", "n_docs", "backend", "seconds"}
    assert (figures["score"], figures["metrics"], figures["n_docs"]) == (
        expected.score,
        expected.metrics,
        expected.n_docs,
    )
    assert figures["backend"] == "native" and figures["seconds"] > 0


def test_a_model_folder_on_either_backend_and_split(prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation.evaluate import Evaluator

    ready, root = prepared
    folder = ready.spec.models.experts[0]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    for split in ("search", "heldout"):
        expected = Evaluator(model, tokenizer, ready.eval_sets[split]).evaluate()
        for backend in ("native", "lm_eval"):
            code, out, errors = run_eval(
                root / "spec.yaml", "--model", folder, "--split", split, "--backend", backend, "--json"
            )
            assert code == 0, errors
            figures = json.loads(out)
            assert figures["backend"] == backend
            assert figures["metrics"] == pytest.approx(expected.metrics, rel=1e-6), (split, backend)
            assert figures["n_docs"] == expected.n_docs


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model", "/nonexistent/model"], ["--model", "does not exist"]),
        (["--model", "{root}"], ["--model", "no config.json"]),
        (["--model", "{base}", "--backend", "tensorrt"], ["--backend", "unknown backend 'tensorrt'"]),
        (["--model", "{base}", "--backend", "vllm"], ["--backend vllm", "vllm is not installed", "pip install"]),
        (["--model", "{base}", "--split", "test"], ["--split", "choose search or heldout"]),
    ],
)
def test_bad_input_is_one_line(prepared, args, words, monkeypatch):
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "vllm" else found(name, *rest))
    ready, root = prepared
    filled = [a.format(root=root, base=ready.spec.models.base) for a in args]
    code, out, errors = run_eval(root / "spec.yaml", *filled)
    assert code == 2 and len(errors) == 1 and "Traceback" not in errors[0], errors
    for word in words:
        assert word in errors[0]


def test_chat_template_is_checked_before_the_model_loads(prepared, tmp_path, monkeypatch):
    import transformers

    ready, root = prepared
    spec = yaml.safe_load((root / "spec.yaml").read_text())
    spec["evaluation"]["apply_chat_template"] = True
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))

    def no_weights(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    code, _, errors = run_eval(tmp_path / "spec.yaml", "--model", ready.spec.models.base)

    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("error: evaluation.apply_chat_template: the tokenizer of --model")
