"""GPU benchmark of the fused merge at real scale, sources built on the GPU (no checkpoint on disk).

Per row (model size, experts, method, placement) it builds random Llama-shaped bf16 sources on the
device (base ~ N(0, 0.02); each fine-tune = base + seeded noise, rounded to bf16, so deltas tie as
real bf16 deltas do), fills the worker's `FusedSources` from them, and times one candidate's merge
(genome candidates: per layer group and attention/MLP weights and densities), against:

* the HBM bound: base + deltas read and the model written once, over the device-to-device copy
  bandwidth (read + write) measured in the same run (sources on the device);
* the link bound: the records (base + deltas) moved over the host-to-device bandwidth of a pinned
  copy measured in the same run (sources in host memory, streamed);

and reports the peak device memory (bytes per parameter) and whether the first candidate equals the
reference path (`merge_tensor`) on a sample of tensors, bit for bit.

    python scripts/bench_fused.py --device cuda --out device_check_out
    python scripts/bench_fused.py --device cpu --smoke        # Triton's interpreter: the script runs, no timing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_models  # noqa: E402

from evomerge.merge.config import MergeConfig
from evomerge.merge.engine import merge_tensor
from evomerge.merge.fused.candidate import reference_view
from evomerge.merge.fused.sources import FusedSources
from evomerge.merge.io import ModelFolder
from evomerge.merge.methods import METHODS
from evomerge.merge.validate import validate_merge_config

SHAPES = {
    "1.5b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=28, num_attention_heads=16),
    "3.6b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=34, num_attention_heads=24),
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "smoke": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4),
}
# (size, experts, method, placement): the real-scale checks.
# Most telling first: a run cut short by the device script's time limit keeps those.
ROWS = (
    ("7b", 3, "ties", "device"),
    ("1.5b", 2, "ties", "device"),
    ("1.5b", 2, "ties", "host"),
    ("1.5b", 2, "dare_ties", "device"),
    ("1.5b", 2, "dare_ties", "host"),
    ("3.6b", 2, "ties", "device"),
    ("3.6b", 2, "dare_ties", "device"),
)
SMOKE_ROWS = (("smoke", 2, "ties", "device"), ("smoke", 2, "dare_ties", "host"))
FINETUNE_SCALES = (0.004, 0.01, 0.007)


@dataclass
class Row:
    size: str
    experts: int
    method: str
    placement: str
    parameters: int
    load_s: float
    first_ms: float  # includes the kernels' compilation
    median_ms: float
    prepare_ms: float  # host-side plan + parameter table, per candidate
    bound_ms: float
    bound: str  # "HBM" or "H2D"
    peak_gib: float | None
    peak_bytes_per_parameter: float | None
    exact: bool | None  # first candidate == reference on the sampled tensors (None: random masks)


def in_memory_folders(size: str, experts: int) -> dict[str, ModelFolder]:
    """Base + fine-tunes as ModelFolders (config + tensor headers), with no files behind them."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        **SHAPES[size],
        num_key_value_heads=8 if size != "smoke" else 2,
        vocab_size=32000 if size != "smoke" else 64,
        tie_word_embeddings=False,
    )
    return synthetic_models.in_memory_folders(config, size, ("base", *(f"ft{i}" for i in range(experts))))


def random_inputs(sources: FusedSources, device: str):
    """`fill`'s inputs: per tensor a random base and fine-tunes, generated on the device from a seed."""

    def inputs(segment: int):
        generator = torch.Generator(device=device).manual_seed(segment)
        shape = sources.layout.shapes[segment]
        base = (0.02 * torch.randn(shape, generator=generator, device=device)).to(torch.bfloat16)
        if sources.layout.names[segment].endswith("norm.weight"):
            base = base + 1
        noise = [scale * torch.randn(shape, generator=generator, device=device) for scale in FINETUNE_SCALES]
        return base, [(base + noise[e]).to(torch.bfloat16) for e in range(len(sources.experts))]

    return inputs


def candidates(folders: dict[str, ModelFolder], method: str, count: int) -> list[MergeConfig]:
    base, *experts = folders
    return synthetic_models.genome_candidates(base, experts, folders[base].num_layers, method, count, seed=1)


def copy_bandwidth(device: str, megabytes: int) -> float:
    """Bytes moved per second (read + write) by a large device-to-device `copy_`."""
    source = torch.randn(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / _timed(lambda: target.copy_(source), device)


def host_to_device_bandwidth(device: str, megabytes: int) -> float:
    """Bytes per second of a pinned host-to-device copy (what host placement streams over)."""
    pinned = torch.cuda.is_available() and device.startswith("cuda")
    source = torch.empty(megabytes * 2**20 // 4, pin_memory=pinned).normal_()
    target = torch.empty(source.shape, device=device)
    return source.numel() * 4 / _timed(lambda: target.copy_(source, non_blocking=True), device)


def _timed(action, device: str, repeats: int = 5) -> float:
    action()
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        action()
    _synchronize(device)
    return (time.perf_counter() - started) / repeats


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(size: str, experts: int, method: str, placement: str, args, bandwidth: dict) -> Row:
    folders = in_memory_folders(size, experts)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    sources, out = load(folders, method, placement, args)
    load_s = time.perf_counter() - started
    launch_s, prepare_s = [], []
    for config in candidates(folders, method, args.candidates + 1):
        began = time.perf_counter()
        validated = validate_merge_config(config, "candidate", folders=folders)
        prepared = sources.prepare(validated, seed=0)
        planned = time.perf_counter()
        sources.launch(prepared, out)
        _synchronize(args.device)
        launch_s.append(time.perf_counter() - planned)
        prepare_s.append(planned - began)
    peak = torch.cuda.max_memory_allocated() if cuda else None  # before the check's own temporaries
    exact = None if validated.plan.method.is_random else sampled_equal(sources, out, validated)
    parameters = int(sources.layout.numels.sum())
    if placement == "host":
        bound_s, bound = sources.planned_bytes() / bandwidth["h2d"], "H2D"
    else:
        bound_s, bound = (sources.planned_bytes() + parameters * out.element_size()) / bandwidth["copy"], "HBM"
    return Row(
        size, experts, method, placement, parameters, round(load_s, 2), round(1000 * launch_s[0], 2),
        round(1000 * statistics.median(launch_s[1:]), 3), round(1000 * statistics.median(prepare_s[1:]), 2),
        round(1000 * bound_s, 3), bound, None if peak is None else round(peak / 2**30, 2),
        None if peak is None else round(peak / parameters, 2), exact,
    )  # fmt: skip


def load(folders: dict[str, ModelFolder], method: str, placement: str, args) -> tuple[FusedSources, torch.Tensor]:
    """The worker's sources (built on the device) and its model's flat output buffer."""
    base, *models = folders
    union = MergeConfig.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "dtype": "bfloat16",
            "models": [{"model": path, "parameters": {"weight": 1.0}} for path in models],
        }
    )
    sources = FusedSources(validate_merge_config(union, folders=folders), METHODS[method], args.device, placement)
    # The model first, as a worker adopts it before reading its sources (candidate.py).
    out = torch.zeros(sources.layout.total, dtype=sources.out_dtype, device=args.device)
    sources.fill(args.chunk_mib * 2**20, inputs=random_inputs(sources, args.device))
    _synchronize(args.device)
    return sources, out


def sampled_equal(sources: FusedSources, out: torch.Tensor, validated) -> bool:
    """The fused result equals the reference path's on the first, middle, last and largest tensors."""
    reference = reference_view(sources)
    plans = validated.plan.tensors
    largest = max(range(len(plans)), key=lambda i: int(sources.layout.numels[sources.segment_of[plans[i].output]]))
    for index in sorted({0, len(plans) // 2, len(plans) - 1, largest}):
        plan = plans[index]
        inputs, deltas, ranks = reference.cached_inputs(plan, validated.plan.method)
        expected = merge_tensor(plan, validated.plan.method, inputs, 0, deltas, ranks)
        got = sources.layout.view(out, sources.segment_of[plan.output])
        if not torch.equal(expected.to(got.dtype), got):
            return False
        del expected
    reference.deltas.clear()
    return True


def markdown(rows: list[Row], bandwidth: dict) -> str:
    lines = [
        f"copy bandwidth (read + write) {bandwidth['copy'] / 1e12:.2f} TB/s; pinned host-to-device {bandwidth['h2d'] / 1e9:.1f} GB/s",
        "",
        "| model | experts | method | sources | ms/candidate | bound ms | x bound | link share | host ms | peak GiB | peak B/param | exact | load s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{r.bound_ms / r.median_ms:.2f}" if r.bound == "H2D" else "-"
        peak = "-" if r.peak_gib is None else f"{r.peak_gib:.1f}"
        per_parameter = "-" if r.peak_bytes_per_parameter is None else f"{r.peak_bytes_per_parameter:.2f}"
        lines.append(
            f"| {r.size} ({r.parameters / 1e9:.2f}B) | {r.experts} | {r.method} | {r.placement} | {r.median_ms:.2f} | "
            f"{r.bound_ms:.2f} ({r.bound}) | {r.median_ms / r.bound_ms:.2f}x | {share} | {r.prepare_ms:.2f} | {peak} | "
            f"{per_parameter} | {'-' if r.exact is None else r.exact} | {r.load_s} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: Triton's interpreter)")
    parser.add_argument("--rows", default="", help="comma-separated row indices to run (default: all)")
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--chunk-mib", type=int, default=512, help="host placement: staging chunk size")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_fused.md and bench_fused.jsonl")
    return parser.parse_args(argv)


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    rows_wanted = SMOKE_ROWS if args.smoke else ROWS
    if args.rows:
        rows_wanted = tuple(rows_wanted[int(i)] for i in args.rows.split(","))
    if args.smoke:
        args.candidates, args.chunk_mib = 2, 1
    bandwidth = {"copy": copy_bandwidth(args.device, 64 if args.smoke else 2048)}
    bandwidth["h2d"] = host_to_device_bandwidth(args.device, 64 if args.smoke else 1024)
    print(f"copy {bandwidth['copy'] / 1e9:.0f} GB/s, host-to-device {bandwidth['h2d'] / 1e9:.1f} GB/s", flush=True)
    rows: list[Row] = []
    for spec in rows_wanted:
        try:
            rows.append(measure(*spec, args, bandwidth))
            print(json.dumps(asdict(rows[-1])), flush=True)
        except Exception as error:  # noqa: BLE001 - an OOM in one row leaves the others
            print(f"{spec}: {type(error).__name__}: {str(error)[:300]}", file=sys.stderr, flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if args.out:  # after every row: a run cut short by its time limit keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "bench_fused.md").write_text(markdown(rows, bandwidth) + "\n")
            (args.out / "bench_fused.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows))
    print(markdown(rows, bandwidth))
    return rows


if __name__ == "__main__":
    main()
