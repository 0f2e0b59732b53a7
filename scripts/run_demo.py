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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="optimizer seed")
    parser.add_argument("--max-evals", type=int, default=None, help="override the spec's budget")
    parser.add_argument(
        "--backend", choices=["native", "lm_eval"], default=None, help="override evaluation.backend (side-by-side runs)"
    )
    args = parser.parse_args()

    import build_demo_zoo

    started = time.time()
    build_demo_zoo.build_zoo(build_demo_zoo.DEFAULT_OUT)  # about 2 minutes the first time, then cached
    from evomerge.cli import print_summary
    from evomerge.rundir.report import write_report
    from evomerge.search.progress import ProgressSettings
    from evomerge.search.start import start_search
    from evomerge.spec import load_spec

    spec = load_spec(REPO / "search_spaces" / "demo.yaml")
    budget = spec.budget.model_copy(update={"max_evals": args.max_evals or spec.budget.max_evals})
    optimizer = spec.optimizer.model_copy(update={"seed": args.seed})
    name = f"demo-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    evaluation = spec.evaluation.model_copy(update={"backend": args.backend or spec.evaluation.backend})
    spec = spec.model_copy(update={"name": name, "optimizer": optimizer, "budget": budget, "evaluation": evaluation})
    run_dir = start_search(spec, progress=ProgressSettings.for_stream(sys.stderr))  # a bar, or lines in a log
    print_summary(run_dir)  # the verdict `evomerge search` ends with: table, margins in SE, winner, export
    print(f"report: {write_report(run_dir)}")
    print(f"total time: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
