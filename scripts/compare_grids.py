"""Compare a raced results grid with an unraced one: per seed and over seeds.

    python scripts/compare_grids.py --whole runs/grid-demo/grid.jsonl runs/grid-demo-more/grid.jsonl \
        --raced runs/grid-demo-halve/grid.jsonl

Cells are matched by zoo, method and seed. Per seed it prints both held-out scores, their
difference in SE of the difference, the raced run's share of the documents its own candidates
would take whole, and the documents it scored against those the unraced run scored (the two differ
when the raced run was given more evaluations; read from the run directories' journals). Because one raced
run changes what CMA-ES is told and from there the whole trajectory, one seed measures the search's
own spread as much as racing: the next lines compare the means over seeds, with the SE of that
difference from the seeds' spread. The last lines are the yardstick for the per-seed rows: how
often two unraced searches with different seeds land within 1 SE of each other (an A/A test), so
a per-seed "within 1 SE" that even two unraced seeds rarely meet is read as the search's spread.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from itertools import combinations
from pathlib import Path

from evomerge.rundir.results import docs_scored, load_trials


def read_cells(paths: list[Path]) -> dict[tuple[str, str, int], dict]:
    """(zoo, method, seed) -> the grid row; a later file's row replaces an earlier one's."""
    cells = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                cells[(row["zoo"], row["method"], row["seed"])] = row
    return cells


def docs_of_run(row: dict) -> int | None:
    """The search documents the row's run scored; None when its run directory is gone."""
    run_dir = Path(row.get("run_dir") or "")
    return docs_scored(load_trials(run_dir)[1]) if (run_dir / "journal.jsonl").is_file() else None


def seed_rows(whole: dict, raced: dict) -> list[str]:
    lines = [
        "| zoo | method | seed | whole: held-out | raced: held-out | raced - whole | docs scored (raced) "
        "| docs against the unraced run |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|")
    for key in sorted(set(whole) & set(raced)):
        (w, w_se), (r, r_se) = whole[key]["evolved"], raced[key]["evolved"]
        se = math.hypot(w_se, r_se)
        margin = "equal" if r == w else f"{(r - w) / se:+.1f} SE" if se else "n/a"
        share = raced[key].get("docs_share")
        w_docs, r_docs = docs_of_run(whole[key]), docs_of_run(raced[key])
        against = f"{r_docs / w_docs:.0%}" if w_docs and r_docs is not None else "n/a"
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {w:.4f} ± {w_se:.4f} | {r:.4f} ± {r_se:.4f} | "
            f"{r - w:+.4f} ({margin}) | {'100 %' if share is None else f'{share:.0%}'} | {against} |"
        )
    return lines


def mean_lines(whole: dict, raced: dict) -> list[str]:
    lines = []
    both = set(whole) & set(raced)  # the same seeds on both sides
    for zoo, method in sorted({key[:2] for key in both}):
        keys = sorted(key for key in both if key[:2] == (zoo, method))
        w, r = [whole[key]["evolved"][0] for key in keys], [raced[key]["evolved"][0] for key in keys]
        shares = [raced[key]["docs_share"] for key in keys if raced[key].get("docs_share")]
        spread = (
            math.sqrt(statistics.variance(w) / len(w) + statistics.variance(r) / len(r))
            if min(len(w), len(r)) > 1
            else math.nan
        )
        difference = statistics.mean(r) - statistics.mean(w)
        lines.append(
            f"{zoo} {method}: whole {statistics.mean(w):.4f} over {len(w)} seeds, raced {statistics.mean(r):.4f} "
            f"over {len(r)} seeds; raced - whole {difference:+.4f} ± {spread:.4f} (SE over seeds); "
            f"docs scored {min(shares, default=1):.0%}-{max(shares, default=1):.0%}"
        )
    return lines


def within_one_se(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two held-out scores (score, SE) differ by at most one SE of their difference."""
    (x, x_se), (y, y_se) = a, b
    return abs(x - y) <= math.hypot(x_se, y_se) + 1e-12


def seed_pair_lines(whole: dict) -> list[str]:
    """Per zoo and method: the share of pairs of different unraced seeds within 1 SE of each other."""
    lines = []
    for zoo, method in sorted({key[:2] for key in whole}):
        scores = [whole[key]["evolved"] for key in sorted(whole) if key[:2] == (zoo, method)]
        pairs = list(combinations(scores, 2))
        if not pairs:
            continue
        agree = sum(within_one_se(a, b) for a, b in pairs)
        lines.append(
            f"{zoo} {method}, unraced seed against unraced seed: {agree} of {len(pairs)} pairs within "
            f"1 SE ({agree / len(pairs):.0%}); held-out spread over {len(scores)} seeds "
            f"{statistics.stdev([score for score, _ in scores]):.4f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--whole", type=Path, nargs="+", required=True, help="grid.jsonl files of unraced searches")
    parser.add_argument("--raced", type=Path, nargs="+", required=True, help="grid.jsonl files of raced searches")
    args = parser.parse_args()
    whole, raced = read_cells(args.whole), read_cells(args.raced)
    print("\n".join([*seed_rows(whole, raced), "", *mean_lines(whole, raced), "", *seed_pair_lines(whole)]))


if __name__ == "__main__":
    main()
