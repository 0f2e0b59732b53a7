"""A search journals its gene table once on run_started, and the report draws layer-range columns
from it (the in-process fake workers of tests/fake_workers.py: real Search and Scheduler, no Ray)."""

from __future__ import annotations

from fake_workers import fake_scheduler, fake_spec_data, open_search

from evomerge.rundir.journal import read_events
from evomerge.rundir.report import gene_grids, journaled_gene_table
from evomerge.search.runs import create_run_dir
from evomerge.spec import parse_spec


def test_run_started_carries_the_genome_s_table_and_the_report_reads_it(tmp_path):
    spec = parse_spec(fake_spec_data(tmp_path / "runs", "genes", budget={"max_evals": 9}), "spec", tmp_path)
    run_dir = create_run_dir(spec)
    search = open_search(spec, run_dir)
    search.run_with(fake_scheduler())

    events = read_events(run_dir / "journal.jsonl")
    table = journaled_gene_table(events)
    assert table == search.prepared.genome.gene_table()
    best = max((t for t in search.trials.values() if t.kind == "optimizer" and t.params), key=lambda t: t.score)
    grids = gene_grids(best.params, ["a", "b"], table)
    assert [grid.columns for grid in grids] == [["L0-1", "L2-3"]] * len(grids)  # 4 layers in 2 groups
