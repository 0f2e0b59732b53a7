"""The journaled gene table drives the report's heatmaps: columns are layer ranges, names are never
parsed; a journal written before the table existed still draws from the gene names."""

from __future__ import annotations

import numpy as np

from evomerge.rundir.genes import GeneRow, rows_from_names
from evomerge.rundir.report import gene_grids, journaled_gene_table

# Names on purpose unlike the genome's scheme: with a table, nothing may read meaning from them.
TABLE = [
    GeneRow("a", "weight", 0, 0, None, (0, 3)),
    GeneRow("b", "weight", 0, 1, None, (3, 5)),
    GeneRow("c", "weight", 0, "head", None, None),
    GeneRow("d", "weight", 1, 0, None, (0, 3)),
    GeneRow("e", "weight", 1, 1, None, (3, 5)),
    GeneRow("f", "weight", 1, "head", None, None),
    GeneRow("g", "lambda", None, 0, None, (0, 3)),
    GeneRow("h", "lambda", None, 1, None, (3, 4)),
]


def test_heatmap_columns_are_the_journaled_layer_ranges():
    params = {row.name: float(index) for index, row in enumerate(TABLE)}
    weight, shared = gene_grids(params, ["math", "code"], TABLE)
    assert (weight.columns, weight.layer_columns, weight.rows) == (["L0-2", "L3-4", "head"], 2, ["math", "code"])
    np.testing.assert_array_equal(weight.values, [[0, 1, 2], [3, 4, 5]])
    assert (shared.param, shared.columns, shared.rows) == ("lambda", ["L0-2", "L3"], ["all"])


def test_the_table_is_read_from_run_started():
    events = [
        {"event": "run_started", "workers": 1},  # an older driver's line: no table
        {"event": "run_started", "workers": 1, "genes": [row.to_json() for row in TABLE]},
    ]
    assert journaled_gene_table(events) == TABLE
    assert journaled_gene_table(events[:1]) is None


def test_a_journal_without_a_table_falls_back_to_the_gene_names():
    rows = rows_from_names(["density/m1/g10/mlp", "lambda/all/g2", "weight/m0/gembed"])
    assert rows == [
        GeneRow("density/m1/g10/mlp", "density", 1, 10, "mlp", None),
        GeneRow("lambda/all/g2", "lambda", None, 2, None, None),
        GeneRow("weight/m0/gembed", "weight", 0, "embed", None, None),
    ]
    assert [row.column_label for row in rows] == ["g10", "g2", "embed"]
