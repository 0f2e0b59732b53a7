"""The results grid: one search per merge method and seed on a zoo, and the held-out tables.

    python scripts/results_grid.py --zoo demo --methods task_arithmetic,ties,dare_ties,breadcrumbs_ties,della \\
        --seeds 0,1,2 --max-evals 300 --out runs/grid-demo [--set dotted.key=yaml_value ...]

The zoo is built first (its builder's `build_zoo(DEFAULT_OUT)`, cached). Each cell runs the zoo's
spec with merge.method, optimizer.seed, budget.max_evals (baselines included) and the run name
OUT/ZOO-METHOD-seedN set, genome.params dropped (the method's default space), and what the method
cannot take dropped with a note (merge.fixed keys that are not its parameters, genome.bounds of
parameters it does not search). Every `--set` applies after that, to the spec's mapping before it
is checked: `--set genome.params=[weight]`, `--set evaluation.limit=60`, `--set
evaluation.fidelity=...`; values are YAML, paths relative to the spec file's folder. A method
`ties+task_arithmetic+dare_ties` is a method gene (merge.method lists them; run name ties-or-...),
and `--spec search_spaces/X.yaml` runs another spec of the zoo (a layer space) in place of its own.

Resumable: a cell whose run finished with the same spec is reused, an unfinished one is resumed
(its "wall s" is then this resume's), one run with another spec is refused (give another --out).
OUT/grid.jsonl gets one line per cell as it finishes (append-only); OUT/grid.md, the tables.

"Evolved" is the verdict's best evolved merge (the top-k by search score re-scored on held-out);
margins are differences over sqrt(SE1² + SE2²); "reach 95 %" is rundir.verdict.evals_to_reach.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import pinned_numerics  # noqa: E402

# Zoos built with the CPU's own kernels: pinned ones would double the SmolLM2 zoo's minutes-long
# candidates, and its weights are not processor-independent anyway.
UNPINNED_ZOOS = ("smol",)

# As scripts/run_demo.py: before torch loads, inherited by the Ray workers. A test that imports this
# module for its functions, with torch already loaded, runs no search and is not pinned.
_zoo_arg = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
_zoo_arg.add_argument("--zoo")
if (__name__ == "__main__" or "torch" not in sys.modules) and _zoo_arg.parse_known_args()[0].zoo not in UNPINNED_ZOOS:
    pinned_numerics.pin()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.files import write_text_atomic  # noqa: E402
from evomerge.merge.config import load_yaml_file  # noqa: E402
from evomerge.merge.methods import METHODS  # noqa: E402
from evomerge.rundir.results import load_trials, status, status_of  # noqa: E402
from evomerge.rundir.trials import search_seconds  # noqa: E402
from evomerge.rundir.verdict import HELDOUT, Measured, RowKind, _margin, build_verdict  # noqa: E402
from evomerge.spec import SEARCH_VERSION, Spec, default_parameters, parse_spec  # noqa: E402

ZOOS = {
    "demo": ("build_demo_zoo", "demo.yaml"),
    "forget": ("build_forgetting_zoo", "forget.yaml"),
    "smol": ("build_smol_zoo", "smol.yaml"),
    "stacking": ("build_stacking_zoo", "stacking_params.yaml"),
    "stacking_pass": ("build_stacking_pass_zoo", "stacking_pass_params.yaml"),
}
PASS_SE = 2.0  # the bar: the evolved merge beats the base by at least 2 SE held-out


@dataclass
class CellRecord:
    """One finished cell's figures, as OUT/grid.jsonl holds them (scores on `basis`)."""

    zoo: str
    method: str
    seed: int
    max_evals: int
    run_dir: str
    fingerprint: str  # Spec.fingerprint(): a record is reused only for the same spec
    basis: str  # "held-out", or "search" when nothing was re-scored
    evolved_trial: int | None
    evolved_name: str | None  # "evolved" or "evolved (seeded: BASELINE)"
    evolved: list[float] | None  # [score, SE]
    base: list[float] | None
    baseline_label: str | None  # the best parent or default merge
    baseline: list[float] | None
    over_base_se: float | None
    over_baseline_se: float | None
    reach: int | None
    searched: int
    failed: int  # trials that failed (a merge the method refused, a worker error)
    search_s: float
    wall_s: float | None  # this script's time for the cell; None when reused from the journal alone
    overrides: list[str] = field(default_factory=list)
    docs_share: float | None = None  # fidelity racing: search docs scored / scoring every candidate whole

    @property
    def passed(self) -> bool:
        return self.basis == HELDOUT and self.over_base_se is not None and self.over_base_se >= PASS_SE


def parse_override(item: str) -> tuple[list[str], object]:
    """'a.b.c=yaml' as (['a', 'b', 'c'], the parsed value)."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise SystemExit(f"--set {item!r}: give dotted.key=value, e.g. --set evaluation.limit=60")
    return key.split("."), yaml.safe_load(value)


def apply_override(data: dict, keys: list[str], value: object) -> None:
    """Set data[k1][k2]...[kn] = value, creating the mappings on the way."""
    for key in keys[:-1]:
        if not isinstance(data.get(key), dict):
            data[key] = {}
        data = data[key]
    data[keys[-1]] = value


def fit_to_method(data: dict, method: str) -> list[str]:
    """Drop genome.params and what `method` cannot take from the spec dict; return notes on what went."""
    info = METHODS[method]
    genome, merge = data.setdefault("genome", {}), data.setdefault("merge", {})
    genome.pop("params", None)
    fixed = merge.get("fixed") or {}
    foreign = [name for name in fixed if name not in info.input_params and name not in info.shared_params]
    merge["fixed"] = {name: value for name, value in fixed.items() if name not in foreign}
    searched = default_parameters(info, merge["fixed"], data.get("version", SEARCH_VERSION))
    unsearched = [name for name in genome.get("bounds") or {} if name not in searched]
    for name in unsearched:
        del genome["bounds"][name]
    return [f"{method}: dropped merge.fixed.{name}" for name in foreign] + [
        f"{method}: dropped genome.bounds.{name} (not searched)" for name in unsearched
    ]


def cell_spec(spec_path: Path, zoo: str, method: str, seed: int, args: argparse.Namespace) -> Spec:
    """The zoo's spec for one cell: method, seed, budget, name and runs_dir set, then the --set items."""
    data = copy.deepcopy(load_yaml_file(spec_path, what="spec file"))
    assert isinstance(data, dict), f"{spec_path}: not a mapping"
    name, budget = f"{zoo}-{method}-seed{seed}", args.max_evals
    # "ties+task_arithmetic" is a method gene: merge.method lists the methods the search chooses among.
    setting = method.split("+") if "+" in method else method
    name = name.replace("+", "-or-")
    cell = {"name": name, "runs_dir": str(args.out), "merge.method": setting, "optimizer.seed": seed}
    for key, value in {**cell, "budget.max_evals": budget}.items():
        apply_override(data, key.split("."), value)
    for note in (note for one in method.split("+") for note in fit_to_method(data, one)):
        print(f"note: {note}", file=sys.stderr)
    for item in args.set:
        apply_override(data, *parse_override(item))
    return parse_spec(data, str(spec_path), spec_path.resolve().parent)


def search_cell(spec: Spec) -> tuple[Path, bool]:
    """(run dir, whether it searched now): a new run, an unfinished one of the same spec resumed, or
    a finished one as it is; a run of another spec under the cell's name is refused."""
    from evomerge.errors import UserError
    from evomerge.rundir.events import EventName
    from evomerge.rundir.layout import RunDir
    from evomerge.search.progress import ProgressSettings
    from evomerge.search.runs import open_run
    from evomerge.search.start import resume_search, start_search

    progress = ProgressSettings.for_stream(sys.stderr)
    run = RunDir.inside(spec.runs_dir, spec.name)
    if not run.journal.exists():
        return start_search(spec, progress=progress), True
    _, frozen, events = open_run(run)
    if frozen.fingerprint() != spec.fingerprint():
        raise UserError(f"{run.root} was run with another spec (other --set or --max-evals); give another --out")
    if any(event["event"] == EventName.RUN_FINISHED for event in events):
        return run.root, False  # finished, but its grid.jsonl line was lost: read back from the journal
    return resume_search(run.root, progress=progress).run.root, True


def is_finished(spec: Spec) -> bool:
    from evomerge.rundir.layout import RunDir

    run = RunDir.inside(spec.runs_dir, spec.name)
    return run.journal.exists() and bool(status(run)["finished"])


def pair(measured: Measured | None) -> list[float] | None:
    return None if measured is None else [measured.score, measured.se]


def record_of(spec: Spec, zoo: str, run_dir: Path, wall_s: float | None, overrides: list[str]) -> CellRecord:
    """The cell's figures from its run's verdict."""
    events, trials = load_trials(run_dir)
    verdict = build_verdict(run_dir, events, trials)
    basis, evolved = verdict.basis, verdict.best_evolved
    base = next((row for row in verdict.rows if row.kind == RowKind.BASE and row.on(basis)), None)
    over_base = _margin(evolved, base, basis)
    over_baseline = verdict.over_best_baseline
    return CellRecord(
        zoo=zoo,
        method="+".join(spec.merge.methods),
        seed=spec.optimizer.seed,
        max_evals=spec.budget.max_evals or 0,
        run_dir=str(run_dir),
        fingerprint=spec.fingerprint(),
        basis=basis,
        evolved_trial=evolved.trial if evolved else None,
        evolved_name=evolved.name if evolved else None,
        evolved=pair(evolved.on(basis)) if evolved else None,
        base=pair(base.on(basis)) if base else None,
        baseline_label=over_baseline.rival.label if over_baseline else None,
        baseline=pair(over_baseline.rival.on(basis)) if over_baseline else None,
        over_base_se=over_base.sigmas if over_base else None,
        over_baseline_se=over_baseline.sigmas if over_baseline else None,
        reach=verdict.reach,
        searched=verdict.searched,
        failed=status_of(run_dir, events, trials)["failed"],
        search_s=round(search_seconds(events), 1),
        wall_s=None if wall_s is None else round(wall_s, 1),
        overrides=overrides,
        docs_share=round(verdict.racing.share, 4) if verdict.racing else None,
    )


def read_records(path: Path) -> dict[tuple[str, str, int, str], CellRecord]:
    """OUT/grid.jsonl by (zoo, method, seed, fingerprint); a later line wins, a torn last line is skipped."""
    records = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = CellRecord(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue
        records[record.zoo, record.method, record.seed, record.fingerprint] = record
    return records


def append_record(path: Path, record: CellRecord) -> None:
    """One line, one write, fsynced: a crash leaves every earlier line whole."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(record)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def fmt(value: list[float] | None) -> str:
    return "-" if value is None else f"{value[0]:.4f} ± {value[1]:.4f}"


def fmt_se(sigmas: float | None) -> str:
    return "-" if sigmas is None else f"{sigmas:+.1f}"


def seeded(record: CellRecord) -> str:
    """', seeded: BASELINE' when the evolved winner is the optimizer's copy of a baseline, else ''."""
    seed = (record.evolved_name or "").partition("(")[2].rstrip(")")
    return f", {seed}" if seed else ""


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def cell_table(records: list[CellRecord]) -> str:
    header = ["method", "seed", "evolved", "base", "over base (SE)", "best baseline", "over baseline (SE)"]
    header += ["reach 95 %", "docs scored", "failed", "search s", "wall s", f">= {PASS_SE:g} SE over base"]
    rows = [
        [
            r.method,
            str(r.seed),
            f"{fmt(r.evolved)} (trial {r.evolved_trial}{seeded(r)})",
            fmt(r.base),
            fmt_se(r.over_base_se),
            f"{r.baseline_label}: {fmt(r.baseline)}",
            fmt_se(r.over_baseline_se),
            "-" if r.reach is None else f"{r.reach} of {r.searched}",
            "100 %" if r.docs_share is None else f"{r.docs_share:.0%}",
            str(r.failed),
            f"{r.search_s:.0f}",
            "-" if r.wall_s is None else f"{r.wall_s:.0f}",
            "pass" if r.passed else "FAIL",
        ]
        for r in records
    ]
    return table(header, rows)


def method_table(records: list[CellRecord]) -> str:
    rows = []
    for method in dict.fromkeys(r.method for r in records):
        mine = [r for r in records if r.method == method]
        margins = [r.over_base_se for r in mine if r.over_base_se is not None]
        reaches = [r.reach for r in mine if r.reach is not None]
        worst = f"{min(margins):+.1f}" if margins else "-"
        reach = f"{statistics.median(reaches):g}" if reaches else "-"
        rows.append([method, f"{sum(r.passed for r in mine)} of {len(mine)}", worst, reach])
    return table(["method", "seeds passing", "worst margin over base (SE)", "median reach 95 %"], rows)


def report(records: list[CellRecord], args: argparse.Namespace) -> str:
    basis = {r.basis for r in records}
    settings = f"zoo {args.zoo}, max_evals {args.max_evals}" + "".join(f", --set {s}" for s in args.set)
    return (
        f"Results grid ({settings}; scores on {', '.join(sorted(basis))}, margins in SE of the difference)\n\n"
        f"{cell_table(records)}\n\n{method_table(records)}\n"
    )


def build_zoo(zoo: str) -> Path:
    """Build (or reuse) the zoo through its builder; returns the zoo's spec path."""
    builder, spec_name = ZOOS[zoo]
    if importlib.util.find_spec(builder) is None:
        print(f"note: no scripts/{builder}.py; using search_spaces/{spec_name} as it stands", file=sys.stderr)
    else:
        module = importlib.import_module(builder)
        module.build_zoo(module.DEFAULT_OUT)
    return REPO / "search_spaces" / spec_name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--zoo", choices=sorted(ZOOS), default="demo")
    parser.add_argument("--methods", default="task_arithmetic,ties,dare_ties,breadcrumbs_ties,della")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated optimizer seeds")
    parser.add_argument("--max-evals", type=int, default=300, help="budget.max_evals per search (baselines included)")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/grid-ZOO")
    parser.add_argument("--spec", type=Path, default=None, help="this spec instead of the zoo's (a layer space)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override, repeatable")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for item in args.methods for m in item.split("+") if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.out = (args.out or REPO / "runs" / f"grid-{args.zoo}").resolve()
    for item in args.set:
        parse_override(item)  # a malformed --set fails before any search
    return args


def run_grid(args: argparse.Namespace) -> list[CellRecord]:
    spec_path = build_zoo(args.zoo)
    spec_path = args.spec.resolve() if args.spec else spec_path
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "grid.jsonl"
    cells = [(method, seed) for method in args.methods for seed in args.seeds]
    records = []
    for number, (method, seed) in enumerate(cells, 1):
        spec = cell_spec(spec_path, args.zoo, method, seed, args)
        record = read_records(log).get((args.zoo, method, seed, spec.fingerprint()))
        if record is not None and is_finished(spec):
            print(f"[{number}/{len(cells)}] {spec.name}: finished before, reused", file=sys.stderr)
            records.append(record)
            continue
        started = time.time()
        run_dir, searched = search_cell(spec)
        record = record_of(spec, args.zoo, run_dir, time.time() - started if searched else None, args.set)
        append_record(log, record)
        records.append(record)
        print(
            f"[{number}/{len(cells)}] {spec.name}: evolved {fmt(record.evolved)}, base {fmt(record.base)}, "
            f"{fmt_se(record.over_base_se)} SE, {'pass' if record.passed else 'FAIL'}",
            file=sys.stderr,
        )
    return records


def main() -> int:
    from evomerge.errors import UserError

    args = parse_args()
    try:
        text = report(run_grid(args), args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    write_text_atomic(args.out / "grid.md", text)
    print(f"written: {args.out / 'grid.jsonl'}, {args.out / 'grid.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
