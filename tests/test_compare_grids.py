"""scripts/compare_grids.py on hand-made grid rows: per-seed margins, means over seeds, and the A/A yardstick."""

from __future__ import annotations

import json

import compare_grids  # scripts/ is on sys.path (conftest)


def row(seed: int, score: float, se: float, share: float | None = None, zoo: str = "demo") -> dict:
    return {"zoo": zoo, "method": "ties", "seed": seed, "evolved": [score, se], "docs_share": share}


def cells(*rows: dict) -> dict:
    return {(r["zoo"], r["method"], r["seed"]): r for r in rows}


def test_seed_rows_give_the_margin_in_se_of_the_difference_and_the_docs_share():
    whole = cells(row(0, 0.80, 0.03), row(1, 0.70, 0.03))
    raced = cells(row(0, 0.76, 0.04, share=0.35), row(1, 0.70, 0.03, share=0.4))
    lines = compare_grids.seed_rows(whole, raced)
    assert "| 0.7600 ± 0.0400 | -0.0400 (-0.8 SE) | 35% |" in lines[2]
    assert "(equal) | 40% |" in lines[3]


def test_means_compare_only_the_seeds_both_sides_ran():
    whole = cells(row(0, 0.8, 0.01), row(1, 0.6, 0.01), row(2, 0.1, 0.01))
    raced = cells(row(0, 0.7, 0.01, share=0.3), row(1, 0.7, 0.01, share=0.4))
    [line] = compare_grids.mean_lines(whole, raced)
    assert "whole 0.7000 over 2 seeds, raced 0.7000 over 2 seeds; raced - whole +0.0000" in line
    assert line.endswith("docs scored 30%-40%")


def test_seed_pairs_count_how_often_two_unraced_seeds_agree_within_one_se():
    # 0.80 and 0.82 agree (|0.02| <= hypot(0.02, 0.02)); 0.90 agrees with neither.
    whole = cells(row(0, 0.80, 0.02), row(1, 0.82, 0.02), row(2, 0.90, 0.02), row(0, 1.0, 0.0, zoo="forget"))
    [line] = compare_grids.seed_pair_lines(whole)  # one seed of a zoo has no pair to compare
    assert line.startswith("demo ties, unraced seed against unraced seed: 1 of 3 pairs within 1 SE (33%)")


def test_the_script_reads_grid_files_and_prints_all_three_parts(tmp_path, capsys, monkeypatch):
    whole, raced = tmp_path / "whole.jsonl", tmp_path / "raced.jsonl"
    whole.write_text("\n".join(json.dumps(row(seed, 0.8, 0.02)) for seed in (0, 1)) + "\n")
    raced.write_text(json.dumps(row(0, 0.78, 0.02, share=0.3)) + "\n")
    monkeypatch.setattr("sys.argv", ["compare_grids.py", "--whole", str(whole), "--raced", str(raced)])
    compare_grids.main()
    out = capsys.readouterr().out
    assert "-0.7 SE" in out and "over 1 seeds" in out and "1 of 1 pairs within 1 SE (100%)" in out
