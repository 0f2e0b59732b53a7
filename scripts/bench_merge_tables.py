"""What scripts/bench_merge.py measures per model size and method, and its Markdown tables
(docs/BENCHMARKS.md quotes them): evomerge's merge against the bound and mergekit, and the fused kernel."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MethodResult:
    size: str
    method: str
    evomerge_s: float  # median per candidate, caches warm
    first_s: float  # first candidate: also builds the task-vector and rank caches
    bound_s: float
    peak_gib: float | None
    api_s: float | None = None
    api_peak_gib: float | None = None
    api_max_rel_diff: float | None = None
    yaml_s: float | None = None
    fused_device: dict | None = None  # time_fused's figures, sources on the GPU
    fused_host: dict | None = None  # the same, sources in pinned host memory, streamed


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def _ratio(numerator: float | None, denominator: float) -> str:
    return "-" if numerator is None else f"{numerator / denominator:.1f}x"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(results: list[MethodResult]) -> str:
    header = [
        "model",
        "method",
        "evomerge ms/candidate",
        "bound ms",
        "evomerge / bound",
        "first candidate ms",
        "peak GiB",
        "mergekit API ms",
        "API / evomerge",
        "API peak GiB",
        "API max rel. diff",
        "mergekit-yaml s",
        "yaml / evomerge",
    ]
    rows = [
        [
            r.size,
            r.method,
            _ms(r.evomerge_s),
            _ms(r.bound_s),
            _ratio(r.evomerge_s, r.bound_s),
            _ms(r.first_s),
            _gib(r.peak_gib),
            _ms(r.api_s),
            _ratio(r.api_s, r.evomerge_s),
            _gib(r.api_peak_gib),
            "-" if r.api_max_rel_diff is None else f"{r.api_max_rel_diff:.1e}",
            "-" if r.yaml_s is None else f"{r.yaml_s:.1f}",
            _ratio(r.yaml_s, r.evomerge_s),
        ]
        for r in results
    ]
    return _markdown(header, rows)


def fused_table(results: list[MethodResult]) -> str:
    header = [
        "model",
        "method",
        "sources on",
        "fused ms/candidate",
        "bound ms",
        "fused / bound",
        "reference ms",
        "reference / fused",
        "mergekit API / fused",
        "first candidate ms (with self-check)",
        "load s",
        "peak GiB",
        "path",
    ]
    rows = []
    for r in results:
        for placement in ("device", "host"):
            f = getattr(r, f"fused_{placement}")
            if f:
                rows.append(
                    [
                        r.size,
                        r.method,
                        placement,
                        _ms(f["median_s"]),
                        _ms(r.bound_s),
                        _ratio(f["median_s"], r.bound_s),
                        _ms(r.evomerge_s),
                        _ratio(r.evomerge_s, f["median_s"]),
                        _ratio(r.api_s, f["median_s"]),
                        _ms(f["first_s"]),
                        f"{f['load_s']:.1f}",
                        _gib(f["peak_gib"]),
                        f["path"],
                    ]
                )
    return _markdown(header, rows)
