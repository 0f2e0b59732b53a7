"""Benchmark: the vllm, native and lm_eval scoring backends in one run, on the SmolLM2 zoo, per candidate.

`python scripts/bench_eval.py --backend vllm` lands here. One resident model; each candidate's
weights (the zoo's base and experts, in turn) are copied into it as a search worker's merge would
write them, and every backend scores it on two tasks built from evals/smol's shift split: a
multiple-choice task (the right answer among four) and a generate_until task (greedy, stop at a
newline). Reported per backend and task: median seconds per candidate, candidates per hour, tokens
per second, and for vllm the per-candidate weight swap, against the two ways peers get a candidate
into an engine: a new engine, and a disk round trip (save the weights, reload them from the file).

    python scripts/bench_eval.py --backend vllm --device cpu --out bench_out/
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / ".cache" / "smol_zoo"
CANDIDATES = ("base", "expert_shift", "expert_increment")
BACKENDS = ("vllm", "native", "lm_eval")
CHOICES = 4


def write_tasks(folder: Path, docs: int) -> list[dict]:
    """A multiple-choice and a generate_until task over the shift split's docs."""
    rows = [json.loads(line) for line in (REPO / "evals" / "smol" / "data" / "shift_search.jsonl").open()][:docs]
    rng = random.Random(0)
    choice_rows = []
    for index, row in enumerate(rows):
        others = [other["target"] for position, other in enumerate(rows) if position != index]
        choices = [row["target"], *rng.sample(others, CHOICES - 1)]
        rng.shuffle(choices)
        choice_rows.append({"prompt": row["prompt"], "choices": choices, "answer": choices.index(row["target"])})
    (folder / "choice.jsonl").write_text("\n".join(map(json.dumps, choice_rows)) + "\n")
    (folder / "generate.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: '{{prompt}}'\n"
    (folder / "bench_smol_choice.yaml").write_text(
        f"task: bench_smol_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'choice.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "bench_smol_generate.yaml").write_text(
        f"task: bench_smol_generate\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'generate.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return [{"name": "bench_smol_choice", "metric": "acc"}, {"name": "bench_smol_generate", "metric": "exact_match"}]


def request_tokens(evaluator, tokenizer) -> tuple[str, int]:
    """What one evaluation works through: loglikelihood tokens, or generated tokens (the last answers re-tokenized)."""
    requests = evaluator.requests
    if requests.pairs:
        return "loglikelihood tokens", sum(len(pair.context) + len(pair.continuation) for pair in requests.pairs)
    texts = [answer for docs in evaluator.responses().values() for doc in docs for answer in doc]
    return "generated tokens", sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text in texts)


def swap_alternatives(model, engine, scratch: Path) -> dict[str, float]:
    """Seconds to put one candidate into the engine: in place, via a disk round trip, via a new engine."""
    from safetensors.torch import load_file, save_file

    started = time.perf_counter()
    engine.load_weights_of_model()
    in_place = time.perf_counter() - started
    started = time.perf_counter()
    path = scratch / "candidate.safetensors"
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:  # tied embeddings: saved once, as a checkpoint holds them
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(path))
    weights = list(load_file(str(path)).items())
    engine._call(lambda llm: llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights}))
    engine._call(lambda llm: llm.reset_prefix_cache())
    disk = time.perf_counter() - started
    engine.shutdown()
    started = time.perf_counter()
    engine.load_weights_of_model()  # starts a fresh engine, then loads the weights
    restart = time.perf_counter() - started
    return {"in place": in_place, "disk round trip": disk, "new engine": restart}


def run(args) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ZOO / "base", dtype=torch.float32).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(ZOO / "base")
    weights = {
        name: AutoModelForCausalLM.from_pretrained(ZOO / name, dtype=torch.float32).state_dict() for name in CANDIDATES
    }
    with tempfile.TemporaryDirectory(prefix="bench_eval_vllm_") as scratch:
        tasks = write_tasks(Path(scratch), args.docs)
        evaluators = build_evaluators(model, tokenizer, tasks, scratch, args.max_length)
        engine = evaluators[tasks[0]["name"]]["vllm"]._scorer.engine
        started = time.perf_counter()
        engine.load_weights_of_model()  # the engine's start, timed apart from the candidates
        first_start = time.perf_counter() - started
        seconds, scores = score_candidates(model, weights, evaluators, args.candidates)
        swaps = engine.swap_times
        alternatives = swap_alternatives(model, engine, Path(scratch))
    rows = [
        f"SmolLM2-135M zoo (float32), {args.docs} docs per task, {args.candidates} timed candidates cycling "
        f"{', '.join(CANDIDATES)}, {args.threads} torch thread(s); vLLM engine start {first_start:.1f} s\n",
        *backend_table(evaluators, tokenizer, seconds, scores),
        "",
        f"vLLM weight swap in place: {swaps.seconds / swaps.swaps:.3f} s per candidate (mean of {swaps.swaps}, "
        "included in vllm's seconds above: one swap per evaluation)",
        "",
        "| one candidate into the engine | seconds |",
        "|---|---|",
        *(f"| {name} | {value:.3f} |" for name, value in alternatives.items()),
    ]
    return rows


def build_evaluators(model, tokenizer, tasks: list[dict], include: str, max_length: int) -> dict[str, dict]:
    """Task name -> backend -> an Evaluator of that one task; every backend scores the same model."""
    from evomerge.evaluation.config import EvaluationSpec
    from evomerge.evaluation.evaluate import Evaluator

    evaluators = {}
    for task in tasks:
        eval_set = EvaluationSpec(tasks=[task], include=[include], max_length=max_length).eval_sets()["search"]
        evaluators[task["name"]] = {
            backend: Evaluator(model, tokenizer, eval_set, backend=backend) for backend in BACKENDS
        }
    return evaluators


def score_candidates(model, weights: dict, evaluators: dict, candidates: int) -> tuple[dict, dict]:
    """Seconds (the first candidate left out: it fills caches on every side) and scores per (task, backend)."""
    seconds = {(task, backend): [] for task in evaluators for backend in BACKENDS}
    scores = {(task, backend): [] for task in evaluators for backend in BACKENDS}
    for candidate in range(candidates + 1):
        model.load_state_dict(weights[CANDIDATES[candidate % len(CANDIDATES)]])
        for task, by_backend in evaluators.items():
            for backend, evaluator in by_backend.items():
                result = evaluator.evaluate()
                scores[(task, backend)].append(result.score)
                if candidate:
                    seconds[(task, backend)].append(result.seconds)
    return seconds, scores


def backend_table(evaluators: dict, tokenizer, seconds: dict, scores: dict) -> list[str]:
    rows = [
        "| task | backend | s per candidate | candidates/hour | throughput | scores equal to native |",
        "|---|---|---|---|---|---|",
    ]
    for task, by_backend in evaluators.items():
        unit, tokens = request_tokens(by_backend["native"], tokenizer)
        for backend in BACKENDS:
            median = statistics.median(seconds[(task, backend)])
            same = sum(a == b for a, b in zip(scores[(task, "native")], scores[(task, backend)], strict=True))
            rows.append(
                f"| {task} | {backend} | {median:.3f} | {3600 / median:,.0f} | {tokens / median:,.0f} {unit}/s "
                f"| {same} of {len(scores[(task, backend)])} |"
            )
    return rows
