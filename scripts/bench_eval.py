"""Benchmark: evaluation throughput of the native backend against lm-eval and plain HF, one run, one device.

Every ratio comes from one run: the contenders are called in turn, round after round, each round
after a first untimed one, and the median of the timed rounds is reported.

Model mode (`--size`, a random Llama-shaped bf16 model built by bench_merge.py; for a GPU):
* loglikelihood, `--docs` docs of random words: native vs lm_eval (HFLM, today's worker path) vs a
  plain length-sorted forward in token-budget batches over the same token sequences;
* generation, `--prompts` prompts of random words, `--new-tokens` greedy tokens each: native vs
  lm_eval `generate_until` vs HF `generate` at its best batch size;
* the GPU busy fraction sampled with NVML (`torch.cuda.utilization`) while native scores.

Demo mode (`--demo`, CPU): the bundled demo zoo and spec. A search worker (merge + score) per
backend scores the same candidates in turn: evaluations per minute of one worker, and whether the
scores are identical; then an expert's greedy answers to the reverse skill as a `generate_until`
task (stop string ".", regex filter), native vs lm_eval.

    python scripts/bench_eval.py --device cuda --size 1.5b --out bench_out/
    python scripts/bench_eval.py --device cpu --demo --out bench_out/
    python scripts/bench_eval.py --device cpu --smoke

vLLM mode (`--backend vllm`, scripts/bench_eval_vllm.py): vllm, native and lm_eval per candidate on
the SmolLM2 zoo, with vLLM's in-place weight swap against a new engine and a disk round trip.

    python scripts/bench_eval.py --backend vllm --device cpu --docs 40 --candidates 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import REPO, SHAPES, build_checkpoints, synchronize  # noqa: E402
from bench_merge_cpu import machine_description  # noqa: E402
from bench_search import UtilizationSampler, plain_forward, write_task  # noqa: E402

LOGLIKELIHOOD_TASK = "bench_loglikelihood"  # bench_search.write_task's name
GENERATION_TASK = "bench_generation"
HF_BATCH_SIZES = (32, 64, 128, 256)
DEFAULT_BATCH_SIZE = 32  # evaluation.batch_size's default


def interleaved(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median seconds per contender; each call returns its own seconds; round 0 is not timed."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(rounds + 1):
        for name, run in contenders.items():
            taken = run()
            if round_index:
                seconds[name].append(taken)
    return {name: statistics.median(values) for name, values in seconds.items()}


def timed(run: Callable[[], object], device: str) -> float:
    synchronize(device)
    started = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - started


def evaluators(model, tokenizer, eval_set, device: str) -> dict[str, object]:
    from evomerge.evaluation.evaluate import Evaluator

    return {
        backend: Evaluator(model, tokenizer, eval_set, device=device, backend=backend)
        for backend in ("native", "lm_eval")
    }


def model_inputs(evaluator) -> list[tuple[int, ...]]:
    """The distinct token sequences native feeds the model for its loglikelihood requests."""
    limit = evaluator._lm.max_length + 1
    return sorted({(pair.context + pair.continuation)[-limit:][:-1] for pair in evaluator.requests.pairs})


@torch.inference_mode()
def hf_generate(model, tokenizer, prompts: list[tuple[int, ...]], new_tokens: int, batch_size: int, device: str) -> int:
    """HF `generate` (its defaults: dynamic cache) over length-sorted batches; returns new tokens made."""
    made = 0
    ordered = sorted(prompts, key=len, reverse=True)
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        width = len(chunk[0])
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        output = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        made += int((output[:, width:] != tokenizer.pad_token_id).sum())
    return made


def write_generation_task(folder: Path, prompts: int, words: tuple[int, int], vocab_size: int, new_tokens: int) -> None:
    rng = random.Random(1)
    data = folder / "data" / f"{GENERATION_TASK}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "prompt": " ".join(f"w{rng.randrange(vocab_size - 3)}" for _ in range(rng.randint(*words))),
                "target": "w0",
            }
        )
        for _ in range(prompts)
    ]
    data.write_text("\n".join(lines) + "\n")
    (folder / f"{GENERATION_TASK}.yaml").write_text(
        f"task: {GENERATION_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/{GENERATION_TASK}.jsonl\n"
        f"test_split: test\noutput_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: target\n"
        f"generation_kwargs:\n  until: []\n  max_gen_toks: {new_tokens}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


def eval_set_for(task: str, folder: Path, args, metric: str = "acc", limit: int | None = None):
    from evomerge.evaluation.config import EvaluationSpec

    evaluation = EvaluationSpec(
        tasks=[{"name": task, "metric": metric}],
        include=[str(folder)],
        batch_size=args.batch_size,
        token_budget=args.token_budget,
        limit=limit,
    )
    return evaluation.eval_sets()["search"]


def loglikelihood_rows(model, tokenizer, folder: Path, args) -> list[str]:
    contenders = evaluators(model, tokenizer, eval_set_for(LOGLIKELIHOOD_TASK, folder, args), args.device)
    sequences = model_inputs(contenders["native"])
    tokens = sum(map(len, sequences))
    medians = interleaved(
        {
            "native": lambda: contenders["native"].evaluate().seconds,
            "lm_eval": lambda: contenders["lm_eval"].evaluate().seconds,
            "plain forward": lambda: timed(
                lambda: plain_forward(model, sequences, args.token_budget, args.device), args.device
            ),
        },
        args.rounds,
    )
    with UtilizationSampler(args.device) as sampler:
        contenders["native"].evaluate()
    busy = "-" if sampler.busy is None else f"{sampler.busy:.0%}"
    rows = [
        f"| loglikelihood, {args.docs} docs, {tokens:,} tokens | {name} | {seconds:.3f} | {tokens / seconds:,.0f} tokens/s "
        f"| {medians['plain forward'] / seconds:.2f} | {medians['lm_eval'] / seconds:.2f} |"
        for name, seconds in medians.items()
    ]
    return rows + [f"| loglikelihood | native, GPU busy (NVML sampled) | | {busy} | | |"]


def generation_rows(model, tokenizer, folder: Path, args) -> list[str]:
    eval_set = eval_set_for(GENERATION_TASK, folder, args, metric="exact_match")
    contenders = evaluators(model, tokenizer, eval_set, args.device)
    prompts = [request.context for request in contenders["native"].requests.generations]
    runs: dict[str, Callable[[], float]] = {
        "native": lambda: contenders["native"].evaluate().seconds,
        "lm_eval": lambda: contenders["lm_eval"].evaluate().seconds,
    }
    made = {}
    for size in [s for s in HF_BATCH_SIZES if s <= len(prompts)] or [len(prompts)]:

        def run(size=size) -> float:
            started = time.perf_counter()
            made[size] = hf_generate(model, tokenizer, prompts, args.new_tokens, size, args.device)
            synchronize(args.device)
            return time.perf_counter() - started

        runs[f"HF generate, batch {size}"] = run
    medians = interleaved(runs, args.rounds)
    best = min((name for name in medians if name.startswith("HF")), key=medians.get)
    new_tokens = max(made.values())  # greedy: every contender makes the same tokens (up to EOS)
    label = f"generation, {len(prompts)} prompts x {args.new_tokens} new tokens"
    return [
        f"| {label} | {name}{' (best HF)' if name == best else ''} | {seconds:.3f} | {new_tokens / seconds:,.0f} new tokens/s "
        f"| {medians[best] / seconds:.2f} | {medians['lm_eval'] / seconds:.2f} |"
        for name, seconds in medians.items()
    ]


def model_mode(args) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = build_checkpoints(args.size, args.cache, args.device)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    vocab = SHAPES[args.size]["vocab_size"]
    header = [
        f"Model: {args.size} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B, {dtype}), token budget "
        f"{args.token_budget}, lm_eval batch size {args.batch_size}\n",
        "| work | contender | seconds | throughput | vs plain / best HF | vs lm_eval |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as scratch:
        folder = Path(scratch)
        write_task(folder, args.docs, tuple(args.words), vocab, seed=0)
        write_generation_task(folder, args.prompts, tuple(args.prompt_words), vocab, args.new_tokens)
        return (
            header
            + loglikelihood_rows(model, tokenizer, folder, args)
            + generation_rows(model, tokenizer, folder, args)
        )


def with_settings(eval_sets: dict, **changes) -> dict:
    """The eval sets with some `evaluation:` settings replaced."""
    return {
        name: eval_set.model_copy(update={"evaluation": eval_set.evaluation.model_copy(update=changes)})
        for name, eval_set in eval_sets.items()
    }


def demo_worker_rows(prepared, eval_sets: dict, contenders: dict[str, dict], label: str, args) -> list[str]:
    """One demo worker per contender (eval-set overrides), the same candidates in turn: wall per candidate."""
    import numpy as np

    from evomerge.search.worker import MergeWorker, WorkerSettings

    spec = prepared.spec
    workers = {
        name: MergeWorker(
            WorkerSettings(spec.models.base, prepared.union_config, with_settings(eval_sets, **changes)), name
        )
        for name, changes in contenders.items()
    }
    rng = np.random.default_rng(0)
    configs = [
        prepared.genome.merge_config_dict(rng.uniform(0.05, 0.95, prepared.genome.dim))
        for _ in range(args.candidates + 1)
    ]
    walls: dict[str, list[float]] = {name: [] for name in workers}
    evals: dict[str, list[float]] = {name: [] for name in workers}
    scores: dict[str, list[float]] = {name: [] for name in workers}
    for trial, config in enumerate(configs):
        for name, worker in workers.items():
            started = time.perf_counter()
            result = worker.evaluate(trial, config)
            if not result.ok:
                raise RuntimeError(f"{name} candidate {trial} failed: {result.reason}")
            if trial:  # the first candidate fills caches on every side
                walls[name].append(time.perf_counter() - started)
                evals[name].append(result.eval_s)
            scores[name].append(result.score)
    wall = {name: statistics.median(values) for name, values in walls.items()}
    reference = "lm_eval"
    rows = [
        f"| {label}, {args.candidates} candidates | {name} | {wall[name]:.3f} "
        f"| {60 / wall[name]:,.0f} evaluations/min (scoring alone {statistics.median(evals[name]):.3f} s) "
        f"| | {wall[reference] / wall[name]:.2f} |"
        for name in workers
    ]
    for name in workers:
        if name != "native":
            same = sum(a == b for a, b in zip(scores["native"], scores[name], strict=True))
            rows.append(f"| {label} | scores identical, native vs {name} | | {same} of {len(configs)} candidates | | |")
    return rows


def write_demo_generation_tasks(folder: Path) -> list[dict]:
    """The three demo skills' search splits as greedy generation: stop at '.', a regex filter."""
    tasks = []
    for skill in ("reverse", "increment", "rotate"):
        data = REPO / "evals" / "demo" / "data" / f"{skill}_search.jsonl"
        name = f"demo_{skill}_generate"
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\noutput_type: generate_until\n"
            "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
            "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 16\n  do_sample: false\n"
            "filter_list:\n  - name: strict-match\n    filter:\n      - function: regex\n"
            "        regex_pattern: '([a-z0-9]+)'\n      - function: take_first\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        )
        tasks.append({"name": name, "metric": "exact_match,strict-match"})
    return tasks


def demo_mode(args) -> list[str]:
    import build_demo_zoo

    from evomerge.evaluation.config import EvaluationSpec
    from evomerge.preflight import preflight
    from evomerge.spec import load_spec

    build_demo_zoo.build_zoo(build_demo_zoo.DEFAULT_OUT)
    prepared = preflight(load_spec(REPO / "search_spaces" / "demo.yaml"))
    evaluation = prepared.spec.evaluation
    budget = {"token_budget": args.token_budget} if args.token_budget else {}
    contenders = {"native": {"backend": "native", **budget}, "lm_eval": {"backend": "lm_eval"}}
    # lm_eval also at evaluation.batch_size's default, which most generation specs run with.
    generating = contenders | {
        f"lm_eval, batch {DEFAULT_BATCH_SIZE}": {"backend": "lm_eval", "batch_size": DEFAULT_BATCH_SIZE}
    }
    header = [
        f"Demo zoo (.cache/demo_zoo), spec search_spaces/demo.yaml, {args.threads} torch thread(s), lm_eval batch size "
        f"{evaluation.batch_size}, native token budget {args.token_budget or 'default (512 loglikelihood, 16384 generation)'}\n",
        "| work | contender | seconds | throughput | | vs lm_eval |",
        "|---|---|---|---|---|---|",
    ]
    rows = demo_worker_rows(
        prepared, prepared.eval_sets, contenders, "demo search worker (loglikelihood, 360 docs)", args
    )
    with tempfile.TemporaryDirectory(prefix="bench_eval_demo_") as scratch:
        tasks = write_demo_generation_tasks(Path(scratch))
        generation = EvaluationSpec(
            tasks=tasks, include=[scratch], limit=args.demo_docs // len(tasks), batch_size=evaluation.batch_size, seed=0
        ).eval_sets()
        label = f"demo worker, generate_until ({args.demo_docs} docs, stop '.', regex filter)"
        rows += demo_worker_rows(prepared, generation, generating, label, args)
    return header + rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="1.5b", choices=sorted(SHAPES))
    parser.add_argument("--demo", action="store_true", help="CPU: the bundled demo (worker evals/min, a generate task)")
    parser.add_argument("--docs", type=int, default=1000, help="loglikelihood docs")
    parser.add_argument("--words", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--prompts", type=int, default=256, help="generation prompts")
    parser.add_argument("--prompt-words", type=int, nargs=2, default=(48, 96), metavar=("MIN", "MAX"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="lm_eval's batch size")
    parser.add_argument("--token-budget", type=int, help="native's evaluation.token_budget (default: the device's)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, after an untimed one")
    parser.add_argument("--candidates", type=int, default=12, help="demo: timed candidates per backend")
    parser.add_argument("--demo-docs", type=int, default=120, help="demo: generate_until docs")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench_merge")
    parser.add_argument("--out", type=Path, help="folder to write bench_eval.md into")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few docs, CPU: checks the script runs")
    parser.add_argument(
        "--backend", choices=["vllm"], help="vllm: vllm vs native vs lm_eval per candidate on the SmolLM2 zoo"
    )
    parser.add_argument("--max-length", type=int, default=256, help="--backend vllm: evaluation.max_length")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.docs, args.words, args.prompts, args.prompt_words = "smoke", 16, (4, 12), 8, (4, 10)
        args.new_tokens, args.batch_size, args.token_budget, args.rounds = 6, 4, 256, 1
    if args.token_budget is None and not args.demo:  # the plain forward's batches: the device's default
        from evomerge.evaluation.native import default_token_budget

        args.token_budget = default_token_budget(torch.device(args.device))
    return args


def main() -> None:
    args = parse_args()
    os.environ.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.device == "cpu":
        # A search worker's threads (workers.cpus_per_worker): on a shared 2-core machine more threads
        # than free cores make every timing a measure of the neighbours.
        torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [f"Device: {device}; host: {machine_description()}", f"Command: {' '.join(sys.argv)}"]
    if args.backend == "vllm":
        import bench_eval_vllm

        lines += bench_eval_vllm.run(args)
    else:
        lines += demo_mode(args) if args.demo else model_mode(args)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_eval.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
