"""GPU benchmark: one search candidate's in-memory merge, against its bound and against mergekit.

For each model size it builds (once, cached) a random Llama-shaped bf16 base and two fine-tunes,
keeps them resident as a search worker does (`ResidentSources`), and times `merge_into_model`
for linear, TIES and DARE-TIES candidates with different weights/densities per layer group and
for attention and MLP (the `slices:` config a search writes). In the same run it measures:

* the bound: bytes every candidate must read (each input tensor) and write (each output tensor)
  divided by the device's copy bandwidth, from a large `Tensor.copy_`;
* mergekit 0.1.5's in-memory API (`mergekit.merge_methods.merge_state_dicts`) on the same
  resident tensors and per-tensor parameters, plus the copy into the resident model;
* `mergekit-yaml --cuda` as a whole process on the same YAML (disk in, disk out).

    python scripts/bench_merge.py --device cuda --sizes 1.5b,3.6b
    python scripts/bench_merge.py --device cpu --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge_cpu import machine_description  # noqa: E402
from bench_merge_tables import MethodResult, fused_table, markdown_table  # noqa: E402
from synthetic_models import (  # noqa: E402  (SHAPES, build_checkpoints, synchronize: also what bench_eval.py imports from here)
    SHAPES,
    build_checkpoints,
    candidate_configs,
    peak_gib,
    reset_peak,
    synchronize,
    union_config,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
METHODS = ("linear", "ties", "dare_ties")
FUSED_METHODS = ("ties", "dare_ties")


def copy_bandwidth(device: str, megabytes: int, repeats: int = 10) -> float:
    """Bytes moved per second (read + write) by a large device-to-device `copy_`."""
    source = torch.empty(megabytes * 1024**2 // 2, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * source.numel() * source.element_size() * repeats / (time.perf_counter() - started)


def traffic_bytes(sources, config) -> int:
    """What any implementation must move per candidate: read every input once, write every output once."""
    total = 0
    for plan in sources.plan_for(config).plan.tensors:
        inputs = [sources.tensors[ref] for ref in plan.inputs]
        total += sum(t.numel() * t.element_size() for t in inputs) + inputs[0].numel() * inputs[0].element_size()
    return total


def time_evomerge(model, sources, configs: list, device: str) -> tuple[float, float, float | None]:
    """(first candidate s, median of the rest s, peak GiB) for `merge_into_model`."""
    from evomerge.merge.resident import merge_into_model

    reset_peak(device)
    seconds = []
    for config in configs:
        synchronize(device)
        started = time.perf_counter()
        merge_into_model(model, sources, config)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds[0], statistics.median(seconds[1:]), peak_gib(device)


def mergekit_api_inputs(sources, config):
    """State dicts (views of the resident tensors) and per-tensor parameters from evomerge's plan."""
    from mergekit.merge_methods import PerGroupValues

    validated = sources.plan_for(config)
    plans = validated.plan.tensors
    models = validated.config.referenced_models()
    state_dicts = {model: {} for model in models}
    values: dict[str, list] = {name: [] for name in validated.plan.method.input_params if name in ("weight", "density")}
    for plan in plans:
        for model, name in plan.inputs:
            state_dicts[model][plan.output] = sources.tensors[(model, name)]
        for name in values:
            values[name].append(
                {
                    model: params[name]
                    for (model, _), params in zip(plan.inputs, plan.per_input, strict=False)
                    if name in params
                }
            )
    parameters = {name: PerGroupValues(per_tensor) for name, per_tensor in values.items()}
    # Per-tensor settings a genome may evolve (TIES's lambda since search version 2).
    for name in ("lambda", "normalize"):
        if name in validated.plan.method.shared_params:
            parameters[name] = PerGroupValues([plan.shared[name] for plan in plans])
    return state_dicts, parameters, validated.config.base_model


def time_mergekit_api(
    model, sources, configs: list, method: str, device: str
) -> tuple[float, float | None, float | None]:
    """(median s, peak GiB, max relative difference to evomerge on the last candidate)."""
    from mergekit.merge_methods import merge_state_dicts

    from evomerge.merge.resident import merge_into_model

    targets = dict(model.named_parameters())
    reset_peak(device)
    seconds = []
    for config in configs:
        state_dicts, parameters, base = mergekit_api_inputs(sources, config)
        synchronize(device)
        started = time.perf_counter()
        with torch.no_grad():
            merged = merge_state_dicts(state_dicts, method, parameters=parameters, base=base)
            for name, tensor in merged.items():
                targets[name].copy_(tensor)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
        del merged
    peak = peak_gib(device)
    if method == "dare_ties":  # random trims: the two tools draw different masks
        return statistics.median(seconds[1:]), peak, None
    with torch.no_grad():
        merge_into_model(model, sources, configs[-1])
        theirs = merge_state_dicts(state_dicts, method, parameters=parameters, base=base)
        # Both keep exactly k elements with mergekit's tie order on this device, so no element is left out.
        difference = max(
            float((targets[n].float() - t.float()).abs().max() / t.float().abs().max().clamp_min(1e-30))
            for n, t in theirs.items()
        )
    return statistics.median(seconds[1:]), peak, difference


def time_mergekit_yaml(config, device: str, scratch: Path) -> float:
    """Whole-process wall time of `mergekit-yaml` (imports, reading, merging, writing)."""
    config_path = scratch / "candidate.yml"
    config_path.write_text(config.to_yaml())
    command = [str(BIN / "mergekit-yaml"), str(config_path), str(scratch / "out"), "--no-write-model-card"]
    command += ["--cuda"] if device.startswith("cuda") else []
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if finished.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed:\n{finished.stderr[-2000:]}")
    return time.perf_counter() - started


def bench_size(size: str, args, bandwidth: float, log) -> list[MethodResult]:
    paths = build_checkpoints(size, args.cache, args.device)
    sources, model = load_resident(size, paths, args, log)
    results, configs_of = [], {}
    for index, method in enumerate(args.methods):
        configs = configs_of[method] = candidate_configs(paths, method, args.repeats + 1, seed=index)
        row = _guarded(partial(_evomerge_row, model, sources, configs, bandwidth, args.device), log, None)
        if row is None:  # e.g. out of memory: the log says why, the table leaves the method out
            continue
        result = MethodResult(size, method, *row)
        log(f"{size} {method}: evomerge {result.evomerge_s:.3f} s/candidate, bound {result.bound_s:.3f} s")
        api = partial(time_mergekit_api, model, sources, configs, method, args.device)
        result.api_s, result.api_peak_gib, result.api_max_rel_diff = _guarded(api, log, (None,) * 3)
        if method in args.yaml_methods:
            with tempfile.TemporaryDirectory(dir=args.cache) as scratch:
                result.yaml_s = _guarded(partial(time_mergekit_yaml, configs[0], args.device, Path(scratch)), log, None)
        results.append(result)
        args.on_result(result)
    del sources  # the fused sources replace the reference path's: both at once may not fit
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    for result in results:
        if result.method in args.fused_methods:
            for placement in args.placements:
                fused = _guarded(
                    partial(time_fused, model, paths, configs_of[result.method], result.method, placement, args),
                    log,
                    None,
                )
                if fused:
                    setattr(result, f"fused_{placement}", fused)
                    log(
                        f"{size} {result.method} fused ({placement}): {fused['median_s']:.4f} s/candidate, {fused['median_s'] / result.bound_s:.2f}x bound"
                    )
            args.on_result(result)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def load_resident(size: str, paths: dict[str, Path], args, log):
    """Every model's tensors resident as a search worker keeps them, and the model merged into."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.resident import ResidentSources

    started = time.perf_counter()
    sources = ResidentSources.load(union_config(paths), device=args.device)
    model = AutoModelForCausalLM.from_pretrained(str(paths["base"]), dtype=torch.bfloat16).to(args.device).eval()
    resident = (
        f", {torch.cuda.memory_allocated() / 1024**3:.1f} GiB allocated" if args.device.startswith("cuda") else ""
    )
    args.notes.append(
        f"{size}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters; sources + model resident in {time.perf_counter() - started:.1f} s{resident}"
    )
    log(args.notes[-1])
    return sources, model


def time_fused(model, paths, configs: list, method: str, placement: str, args) -> dict:
    """The fused kernel (`CandidateMerger`) on the same candidates: load time, first, median, peak."""
    from evomerge.merge.fused.candidate import CandidateMerger
    from evomerge.merge.fused.sources import FusedSources

    reset_peak(args.device)
    started = time.perf_counter()
    sources = FusedSources.load(union_config(paths), method, args.device, placement)
    merger = CandidateMerger.adopting(model, sources)
    loaded = time.perf_counter() - started
    seconds = []
    for config in configs:
        synchronize(args.device)
        began = time.perf_counter()
        merger.merge(config)
        synchronize(args.device)
        seconds.append(time.perf_counter() - began)
    result = {
        "median_s": statistics.median(seconds[1:]),
        "first_s": seconds[0],
        "load_s": loaded,
        "peak_gib": peak_gib(args.device),
        "path": merger.path,
        "verified": merger.verified,
    }
    del merger, sources
    return result


def _evomerge_row(model, sources, configs, bandwidth, device):
    first, median, peak = time_evomerge(model, sources, configs, device)
    return median, first, traffic_bytes(sources, configs[0]) / bandwidth, peak


def _guarded(measure, log, failed):
    """A competitor that fails (OOM, unsupported) leaves its cells empty instead of ending the run."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 - reported in the log, the table shows "-"
        log(f"  skipped: {type(error).__name__}: {str(error)[:300]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return failed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="1.5b,3.6b", help=f"comma-separated, from: {', '.join(SHAPES)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=5, help="timed candidates per method, after the first")
    parser.add_argument(
        "--cache", type=Path, default=REPO / ".cache" / "bench_merge", help="where the random checkpoints are kept"
    )
    parser.add_argument(
        "--yaml-methods", default=",".join(METHODS), help="methods also timed with mergekit-yaml ('' for none)"
    )
    parser.add_argument(
        "--results", type=Path, help="also append each row as a JSON line here (kept if the run is cut short)"
    )
    parser.add_argument(
        "--placements",
        default="device,host",
        help="fused-kernel rows: sources on the GPU, in pinned host memory ('' for none)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, 2 repeats: checks the script runs (CPU, seconds)"
    )
    args = parser.parse_args()
    args.sizes, args.methods, args.yaml_methods = (
        args.sizes.split(","),
        args.methods.split(","),
        args.yaml_methods.split(","),
    )
    args.placements = [p for p in args.placements.split(",") if p]
    args.fused_methods = FUSED_METHODS
    if args.smoke:
        args.sizes, args.repeats, args.yaml_methods = ["smoke"], 2, ["linear"]
        args.placements, args.fused_methods = args.placements[-1:], ("ties",)  # the interpreter is slow
    unknown = [s for s in args.sizes if s not in SHAPES]
    if unknown:
        parser.error(f"--sizes: unknown size(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    return args


def main() -> None:
    args = parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if not args.device.startswith("cuda"):
        # The fused rows on CPU run Triton's interpreter: a check that the script works, not a timing.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.cache.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {message}", file=sys.stderr, flush=True)

    def on_result(result: MethodResult) -> None:
        if args.results:
            with open(args.results, "a") as handle:
                handle.write(json.dumps(asdict(result)) + "\n")

    args.on_result, args.notes = on_result, []
    bandwidth = copy_bandwidth(args.device, 64 if args.smoke else 2048)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    log(f"{device_name}: copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    results = [row for size in args.sizes for row in bench_size(size, args, bandwidth, log)]
    print(
        f"Device: {device_name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); host: {machine_description()}"
    )
    print("\n".join(args.notes) + "\n")
    print(markdown_table(results))
    if any(r.fused_device or r.fused_host for r in results):
        print("\nFused kernel (reference = the evomerge column above, same candidates):\n")
        print(fused_table(results))


if __name__ == "__main__":
    main()
