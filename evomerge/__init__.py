"""evomerge: evolutionary search for LLM merge recipes, exported as standard mergekit YAML.

Data flow of `evomerge search SPEC`:
1. `spec.py` loads the YAML (models by hub ID or folder, tasks by lm-eval name or file); `hub.py`
   pins every model's commit and `preflight.py` refuses bad input before any weights load.
2. `genome.py` turns the method's entry in `merge/registry.py` (the method registry: one source of
   truth for what a method takes, searches, and is compared with) into genes and baseline points.
3. `optim/` (CMA-ES, TPE, NSGA-II, random) proposes a point; `search/loop.py` asks and tells.
4. `search/cluster.py` hands each candidate to a Ray worker that keeps the sources resident,
   merges in memory (`merge/resident.py`, or `merge/fused/` on a GPU) and scores it (`evaluation/`).
5. Every ask and result is appended to `journal.jsonl`; `rundir/ledger.py` (the run ledger: the
   other source of truth) folds it once for resume, status, report, verdict and export.
6. `export` writes the winner as a mergekit YAML that `mergekit-yaml` rebuilds exactly.
"""

__version__ = "0.1.0"
