"""Score the merges a patient user would set by hand on the demo zoo, for docs/RESULTS.md.

    python scripts/demo_hand_tuned.py

The search's own baselines are mergekit's defaults. This adds the two hand-tuned recipes a user
who knows the zoo would try: task arithmetic with one global lambda swept over a grid (picked on
the search split), and per-layer weights of 1 in each expert's own block of layers and 0
elsewhere. Every merge goes through evomerge's merge engine and evaluator (one in-process worker,
the spec's search and held-out splits), so the numbers are comparable with a demo run's table.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval prints a bar per task and merge

LAMBDA_GRID = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)


def per_layer_config(genome, weight_of) -> dict:
    """The demo genome's candidate with weight_of(expert index, first layer of the group) per gene.

    The demo spec has one weight gene per expert per layer, so this is exactly the family the
    search explores, built by the same code.
    """
    values = {gene.name: weight_of(gene.model, genome.groups[gene.group][0]) for gene in genome.genes}
    return genome.merge_config_dict(genome.encode(values))


def hand_tuned_configs(genome, expert_layers: dict[str, list[int]]) -> dict[str, dict]:
    configs = {
        f"task arithmetic, lambda {lam}": per_layer_config(genome, lambda i, layer, lam=lam: lam) for lam in LAMBDA_GRID
    }
    blocks = [expert_layers[Path(path).name.removeprefix("expert_")] for path in genome.spec.models.experts]
    configs["per layer by hand: 1 in own block, 0 elsewhere"] = per_layer_config(
        genome, lambda i, layer: 1.0 if layer in blocks[i] else 0.0
    )
    return configs


def main() -> int:
    import build_demo_zoo

    from evomerge.preflight import preflight
    from evomerge.rundir.results import standard_error
    from evomerge.search.worker import MergeWorker, WorkerSettings
    from evomerge.spec import load_spec

    build_demo_zoo.build_zoo(build_demo_zoo.DEFAULT_OUT)
    prepared = preflight(load_spec(REPO / "search_spaces" / "demo.yaml"))
    spec = prepared.spec
    worker = MergeWorker(WorkerSettings(spec.models.base, prepared.union_config, prepared.eval_sets))
    print(f"{'merge':52s} {'search':>16s} {'held-out':>16s}")
    for label, config in hand_tuned_configs(prepared.genome, build_demo_zoo.RECIPE["expert_layers"]).items():
        cells = []
        for eval_set in ("search", "heldout"):
            result = worker.evaluate(0, config, eval_set)
            se = standard_error(result.metrics, result.n_docs)
            cells.append(f"{result.score:.3f} ± {se:.3f}")
        print(f"{label:52s} {cells[0]:>16s} {cells[1]:>16s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
