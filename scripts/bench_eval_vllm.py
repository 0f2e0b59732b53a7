"""Benchmark: the vllm, native and lm_eval scoring backends in one run, on the SmolLM2 zoo, per candidate.

`python scripts/bench_eval.py --backend vllm` lands here. One resident model; each candidate's
weights (the zoo's base and experts, in turn) are copied into it as a search worker's merge would
write them, and every backend scores it on two tasks built from evals/smol's shift split: a
multiple-choice task (the right answer among four) and a generate_until task (greedy, stop at a
newline). Reported per backend and task: median seconds per candidate, candidates per hour, tokens
per second, and for vllm the per-candidate weight swap and the path it took (a direct write into the
engine's parameters where the layout allows, with the resident model's tensors views of the
engine's blocks so that nothing is copied, else vLLM's `reload_weights`), against a direct write
that copies every tensor, vLLM's reload in place and the two ways peers get a candidate into an
engine: a new engine, and a disk round trip (save the weights, reload them from the file). On CPU,
where vLLM packs linear weights for oneDNN and so reloads, a second engine computing with plain
F.linear (which takes the direct path) is timed as well: its scoring per candidate and the same
ways in. The cheap ways in are timed as the median of `REPEATS` runs.

    python scripts/bench_eval.py --backend vllm --device cpu --out bench_out/
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / ".cache" / "smol_zoo"
CANDIDATES = ("base", "expert_shift", "expert_increment")
BACKENDS = ("vllm", "native", "lm_eval")
CHOICES = 4
REPEATS = 5  # runs per way into the engine that takes well under a second


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
    """Seconds to put one candidate into the engine: its own path, vLLM's reload in place, a disk round trip, a new engine."""
    from safetensors.torch import load_file, save_file

    def timed(work, repeats: int = 1) -> float:
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            runs.append(time.perf_counter() - started)
        return statistics.median(runs)

    def reload_in_place() -> None:
        engine.reload_weights(model.state_dict())
        engine._call(lambda llm: llm.reset_prefix_cache())

    def disk_round_trip() -> None:
        path = scratch / "candidate.safetensors"
        tensors, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() not in seen:  # tied embeddings: saved once, as a checkpoint holds them
                seen.add(tensor.data_ptr())
                tensors[name] = tensor.contiguous()
        save_file(tensors, str(path))
        engine.reload_weights(load_file(str(path)))
        engine._call(lambda llm: llm.reset_prefix_cache())

    def direct_write_of_copies() -> None:
        # A candidate held apart from the engine (every tensor copied): the direct path without views.
        engine._call(lambda llm: engine._writer.write(copies))
        engine._call(lambda llm: llm.reset_prefix_cache())

    path = engine.weight_path
    views = engine.view_binding
    if views is not None:
        path = f"{path}, {len(views.views)} views and {len(views.copies)} copies"
    seconds = {f"the engine's path ({path})": timed(engine.load_weights_of_model, REPEATS)}
    if engine._writer is not None:
        copies = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        seconds["direct write, every tensor copied"] = timed(direct_write_of_copies, REPEATS)
    seconds["reload_weights in place"] = timed(reload_in_place, REPEATS)
    seconds["disk round trip"] = timed(disk_round_trip)
    engine.shutdown()
    seconds["new engine"] = timed(engine.load_weights_of_model)  # starts a fresh engine, then loads the weights
    return seconds


def plain_linear_rows(model, weights: dict, evaluators: dict, engine, scratch: Path, native: dict) -> list[str]:
    """On CPU: the engine again with plain F.linear (the direct path), its scoring and its ways in."""
    engine.shutdown()
    engine.plain_cpu_linear = True
    engine.swap_times = type(engine.swap_times)()
    vllm_only = {task: {"vllm": by_backend["vllm"]} for task, by_backend in evaluators.items()}
    seconds, scores = {task: [] for task in evaluators}, {task: [] for task in evaluators}
    for candidate in range(len(native[next(iter(evaluators))])):  # the candidates native scored, in order
        model.load_state_dict(weights[CANDIDATES[candidate % len(CANDIDATES)]])
        for task, by_backend in vllm_only.items():
            result = by_backend["vllm"].evaluate()
            scores[task].append(result.score)
            if candidate:
                seconds[task].append(result.seconds)
    swaps = engine.swap_times
    rows = [
        f"Plain F.linear engine on CPU: path {engine.weight_path} ({engine.weight_path_reason}); "
        f"weight swap {swaps.seconds / swaps.swaps:.3f} s per candidate (mean of {swaps.swaps})",
        "",
        "| task | vllm plain F.linear: s per candidate | scores equal to native |",
        "|---|---|---|",
        *(
            f"| {task} | {statistics.median(values):.3f} "
            f"| {sum(a == b for a, b in zip(scores[task], native[task], strict=True))} of {len(native[task])} |"
            for task, values in seconds.items()
        ),
        "",
        "| one candidate into the plain engine | seconds |",
        "|---|---|",
        *(f"| {name} | {value:.3f} |" for name, value in swap_alternatives(model, engine, scratch).items()),
    ]
    engine.shutdown()
    return rows


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
        # A snapshot: the ways in below swap again.
        swaps, path, reason = replace(engine.swap_times), engine.weight_path, engine.weight_path_reason
        alternatives = swap_alternatives(model, engine, Path(scratch))
        plain = []
        if args.device == "cpu":
            native = {task: scores[(task, "native")] for task in evaluators}
            plain = plain_linear_rows(model, weights, evaluators, engine, Path(scratch), native)
    rows = [
        f"SmolLM2-135M zoo (float32), {args.docs} docs per task, {args.candidates} timed candidates cycling "
        f"{', '.join(CANDIDATES)}, {args.threads} torch thread(s); vLLM engine start {first_start:.1f} s\n",
        *backend_table(evaluators, tokenizer, seconds, scores),
        "",
        f"vLLM weight swap ({path}: {reason}): {swaps.seconds / swaps.swaps:.3f} s per candidate "
        f"(mean of {swaps.swaps}, included in vllm's seconds above: one swap per evaluation)",
        "",
        "| one candidate into the engine | seconds |",
        "|---|---|",
        *(f"| {name} | {value:.3f} |" for name, value in alternatives.items()),
        "",
        *plain,
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
