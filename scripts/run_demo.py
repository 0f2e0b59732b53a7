"""The bundled demo, start to finish on CPU: build the zoo, search, re-score on held-out data,
print parents vs default merges vs the evolved merge, and write the HTML report.

    python scripts/run_demo.py [--seed N] [--max-evals N]

Each call is a new run, runs/demo-seedN-TIMESTAMP/, so earlier demo runs are never touched.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import pinned_numerics  # noqa: E402

# Processor-independent numerics for the zoo build and the local cluster's workers, which inherit
# this environment: the demo's table is then the same on every x86-64 machine.
pinned_numerics.pin()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def heldout_margins(trials) -> list[str]:
    """The evolved held-out winner against the best parent and the best default merge, in SEs."""
    import math

    from evomerge.rundir.results import leaderboard
    from evomerge.rundir.trials import is_default_merge, is_parent

    rows = [r for r in leaderboard(trials) if r["heldout"] is not None]
    evolved = [r for r in rows if r["kind"] == "optimizer"]
    if not evolved:
        return []
    best = evolved[0]
    rivals = {
        "the best parent": [r for r in rows if r["kind"] == "baseline" and is_parent(r["label"])],
        "the best default merge": [r for r in rows if r["kind"] == "baseline" and is_default_merge(r["label"])],
    }
    lines = []
    for name, group in rivals.items():
        if group:
            rival = max(group, key=lambda r: r["heldout"])
            gap = best["heldout"] - rival["heldout"]
            se = math.hypot(best["heldout_se"], rival["heldout_se"])
            lines.append(f"held-out margin over {name} ({rival['label']}): {gap:+.4f} = {gap / se:.1f} SE")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="optimizer seed")
    parser.add_argument("--max-evals", type=int, default=None, help="override the spec's budget")
    args = parser.parse_args()

    import build_demo_zoo

    started = time.time()
    build_demo_zoo.build_zoo(build_demo_zoo.DEFAULT_OUT)  # about 2 minutes the first time, then cached
    from evomerge.cli import _print_summary
    from evomerge.rundir.report import evals_to_reach, write_report
    from evomerge.rundir.results import load_trials
    from evomerge.search.loop import start_search
    from evomerge.spec import load_spec

    spec = load_spec(REPO / "search_spaces" / "demo.yaml")
    budget = spec.budget.model_copy(update={"max_evals": args.max_evals or spec.budget.max_evals})
    optimizer = spec.optimizer.model_copy(update={"seed": args.seed})
    name = f"demo-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    spec = spec.model_copy(update={"name": name, "optimizer": optimizer, "budget": budget})
    run_dir = start_search(spec, progress=sys.stderr.isatty())
    _print_summary(run_dir)
    _, trials = load_trials(run_dir)
    searched = [
        t
        for t in sorted(trials.values(), key=lambda t: t.trial_id)
        if t.kind == "optimizer" and t.status in ("completed", "failed")
    ]
    reach = evals_to_reach([t.score for t in searched])
    print(f"evaluations to reach 95% of the final best: {reach} of {len(searched)} searched")
    for line in heldout_margins(trials):
        print(line)
    print(f"report: {write_report(run_dir)}")
    print(f"export the held-out winner: evomerge export {run_dir} -o best.yaml")
    print(f"total time: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
