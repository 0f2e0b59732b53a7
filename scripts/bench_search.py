"""GPU benchmark: where a search candidate's time goes, on a real MergeWorker (native scorer by default).

A `MergeWorker` holds a random Llama-shaped bf16 base and two fine-tunes (built by
bench_merge.py), merges TIES candidates with per-layer-group parameters in place, and scores each
on a synthetic local loglikelihood task (~1,000 docs of seeded random words, written as a JSONL
plus an lm-eval YAML in a temp folder). Reported per candidate:

* the share of wall time outside evaluation (merge, finiteness check, result bookkeeping; the
  Ray dispatch and driver work are measured separately by bench_scheduler.py);
* evaluation tokens/s against a plain HF forward over the same token sequences, length-sorted in
  token-budget batches, right-padded without an attention mask (as the scorers call the model);
* GPU busy fraction: sampled `torch.cuda.utilization()` when pynvml is installed, and always a
  derived lower bound, (merge time + plain-forward time) / wall time, capped at 1.

    python scripts/bench_search.py --device cuda --size 1.5b
    python scripts/bench_search.py --device cpu --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import REPO  # noqa: E402
from bench_merge_cpu import machine_description  # noqa: E402
from synthetic_models import SHAPES, build_checkpoints, candidate_configs, synchronize, union_config  # noqa: E402

from evomerge.evaluation.batching import token_budget_batches  # noqa: E402

TASK = "bench_loglikelihood"


def write_task(folder: Path, docs: int, words: tuple[int, int], vocab_size: int, seed: int) -> Path:
    """A local lm-eval loglikelihood task of `docs` random-word prompts; returns the folder."""
    rng = random.Random(seed)
    ordinary = vocab_size - 3  # build_tokenizer's words after its three special tokens
    data = folder / "data" / f"{TASK}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    with open(data, "w") as handle:
        for _ in range(docs):
            prompt = " ".join(f"w{rng.randrange(ordinary)}" for _ in range(rng.randint(*words)))
            # loglikelihood continuations carry their own separator (lm-eval adds none).
            handle.write(json.dumps({"prompt": prompt, "target": f" w{rng.randrange(ordinary)}"}) + "\n")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/{TASK}.jsonl\n"
        "test_split: test\noutput_type: loglikelihood\ndoc_to_text: prompt\ndoc_to_target: target\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def scored_sequences(worker, task_folder: Path) -> list[tuple[int, ...]]:
    """The distinct token sequences the worker's evaluator feeds the model (its loglikelihood inputs)."""
    evaluator = worker.evaluators["search"][0]  # one evaluator: the bench does not race
    if evaluator.requests is None:  # --backend lm_eval: the docs' prompt + target, as lm-eval tokenizes them
        rows = [json.loads(line) for line in (task_folder / "data" / f"{TASK}.jsonl").read_text().splitlines()]
        return [tuple(worker.tokenizer(row["prompt"] + row["target"])["input_ids"][:-1]) for row in rows]
    limit = evaluator._lm.max_length + 1
    return sorted({(pair.context + pair.continuation)[-limit:][:-1] for pair in evaluator.requests.pairs})


@torch.inference_mode()
def plain_forward(model, sequences: list[tuple[int, ...]], token_budget: int, device: str) -> None:
    """HF forward, length-sorted, right-padded, no mask (causal), batches of about `token_budget` tokens.

    No attention mask, as lm-eval and the native scorer call it: with a padding mask SDPA cannot
    take its fused causal kernel, which made this comparator slower than the scorer it bounds.
    """
    for batch in token_budget_batches([len(s) for s in sequences], token_budget):
        width = len(sequences[batch[0]])
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids[row, : len(sequences[index])] = torch.tensor(sequences[index])
        model(input_ids=ids.to(device), use_cache=False)


def plain_forward_seconds(model, sequences: list[tuple[int, ...]], token_budget: int, device: str) -> float:
    """Best of three timed plain forwards, after an untimed one."""
    plain_forward(model, sequences, token_budget, device)
    timings = []
    for _ in range(3):
        synchronize(device)
        started = time.perf_counter()
        plain_forward(model, sequences, token_budget, device)
        synchronize(device)
        timings.append(time.perf_counter() - started)
    return min(timings)


class UtilizationSampler:
    """Samples `torch.cuda.utilization()` in a thread; None where pynvml (or a GPU) is missing."""

    def __init__(self, device: str, interval: float = 0.05):
        self.samples: list[int] = []
        self.enabled = device.startswith("cuda") and self._available()
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _available() -> bool:
        try:
            torch.cuda.utilization()
            return True
        except Exception:  # noqa: BLE001 - pynvml missing or no NVML: fall back to the derived figure
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(torch.cuda.utilization())

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()

    @property
    def busy(self) -> float | None:
        return statistics.mean(self.samples) / 100 if self.samples else None


def make_worker(paths: dict, task_folder: Path, args):
    from evomerge.evaluation.config import EvaluationSpec
    from evomerge.search.worker import MergeWorker, WorkerSettings

    settings = WorkerSettings(
        base_model=str(paths["base"]),
        union_config=union_config(paths).model_dump(mode="json", exclude_none=True),
        eval_sets=EvaluationSpec(
            tasks=[TASK],
            include=[str(task_folder)],
            batch_size=args.batch_size,
            token_budget=args.token_budget,
            backend=args.backend,
        ).eval_sets(),
        device=args.device,
        dtype="bfloat16",
        cpu_threads=os.cpu_count() or 1,
        merge_method="ties",
    )
    return MergeWorker(settings)


def run_candidates(worker, configs: list, device: str) -> tuple[list[dict], list[float], float | None]:
    """Results and wall seconds per candidate (the first, which fills caches, kept apart by the caller)."""
    results, walls = [], []
    with UtilizationSampler(device) as sampler:
        for trial, config in enumerate(configs):
            started = time.perf_counter()
            result = worker.evaluate(trial, config.model_dump(mode="json", exclude_none=True))
            walls.append(time.perf_counter() - started)
            if not result.ok:
                raise RuntimeError(f"candidate {trial} failed: {result.reason}")
            results.append(result)
    return results, walls, sampler.busy


def report(results: list, walls: list[float], tokens: int, plain_s: float, sampled_busy: float | None) -> str:
    timed = list(zip(results[1:], walls[1:], strict=False))
    wall = statistics.median(w for _, w in timed)
    merge = statistics.median(r.merge_s for r, _ in timed)
    evaluation = statistics.median(r.eval_s for r, _ in timed)
    prepare = statistics.median(r.prepare_s for r, _ in timed)
    # A lower bound on the GPU's busy share: the merge plus a plain forward over the same tokens. It is
    # a fraction of the wall time, so it is capped at one should the scorer beat the plain forward.
    derived_busy = min(1.0, (merge + plain_s) / wall)
    # Here calls run one after another; a GPU Ray actor plans the next candidate during this one's
    # evaluation, so its share outside evaluation is the second figure.
    rows = [
        "| candidates timed | wall s | prepare s | merge s | eval s | outside eval | outside eval, prepare overlapped | eval tokens/s | plain forward tokens/s | eval / plain | GPU busy (sampled) | GPU busy (derived) | first candidate s |",
        "|---" * 13 + "|",
        f"| {len(timed)} | {wall:.3f} | {prepare:.4f} | {merge:.4f} | {evaluation:.3f} | {(wall - evaluation) / wall:.1%} "
        f"| {(wall - evaluation - prepare) / (wall - prepare):.1%} | {tokens / evaluation:,.0f} "
        f"| {tokens / plain_s:,.0f} | {plain_s / evaluation:.2f} | {'-' if sampled_busy is None else f'{sampled_busy:.0%}'} "
        f"| {derived_busy:.0%} | {walls[0]:.2f} |",
    ]
    return "\n".join(rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="1.5b", choices=sorted(SHAPES))
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument(
        "--words", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"), help="prompt length range in tokens"
    )
    parser.add_argument(
        "--candidates", type=int, default=5, help="timed candidates, after a first one that fills caches"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation.batch_size (the lm_eval backend's)")
    parser.add_argument("--token-budget", type=int, help="evaluation.token_budget (default: the device's)")
    parser.add_argument("--backend", default="native", choices=("native", "lm_eval"))
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench_merge")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, few docs, CPU-friendly: checks the script runs"
    )
    args = parser.parse_args()
    if args.smoke:
        args.size, args.docs, args.words, args.candidates, args.batch_size = "smoke", 24, (4, 12), 2, 8
        args.token_budget = 256
    if args.token_budget is None:
        from evomerge.evaluation.native import default_token_budget

        args.token_budget = default_token_budget(torch.device(args.device))
    return args


def main() -> None:
    args = parse_args()
    os.environ.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    args.cache.mkdir(parents=True, exist_ok=True)
    paths = build_checkpoints(args.size, args.cache, args.device)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as scratch:
        task_folder = write_task(Path(scratch), args.docs, tuple(args.words), SHAPES[args.size]["vocab_size"], seed=0)
        worker = make_worker(paths, task_folder, args)
        configs = candidate_configs(paths, "ties", args.candidates + 1, seed=0)
        results, walls, sampled_busy = run_candidates(worker, configs, args.device)
        sequences = scored_sequences(worker, task_folder)
    plain_s = plain_forward_seconds(worker.model, sequences, args.token_budget, args.device)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"Device: {device_name}; host: {machine_description()}")
    print(
        f"Model: {args.size} ({sum(p.numel() for p in worker.model.parameters()) / 1e9:.2f}B, bf16), TIES candidates, {worker.merger.path} merge path; "
        f"task: {args.docs} loglikelihood docs, {sum(map(len, sequences)):,} tokens, backend {args.backend}, "
        f"token budget {args.token_budget}, batch size {args.batch_size}\n"
    )
    print(report(results, walls, sum(map(len, sequences)), plain_s, sampled_busy))


if __name__ == "__main__":
    main()
