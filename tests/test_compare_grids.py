"""scripts/compare_grids.py on hand-made grid rows: per-seed margins, means over seeds, and the A/A yardstick."""

from __future__ import annotations

import json
from pathlib import Path

import compare_grids  # scripts/ is on sys.path (conftest)


def row(seed: int, score: float, se: float, share: float | None = None, zoo: str = "demo", run_dir: str = "") -> dict:
    return {"zoo": zoo, "method": "ties", "seed": seed, "evolved": [score, se], "docs_share": share, "run_dir": run_dir}


def journal_with(run_dir: Path, docs_per_trial: list[int]) -> str:
    """A run directory whose journal holds one scored trial per entry, with that many documents."""
    run_dir.mkdir()
    events: list[dict] = [{"event": "run_created", "spec_sha256": "0" * 64}]
    for trial, docs in enumerate(docs_per_trial):
        events.append({"event": "asked", "trial": trial, "kind": "optimizer", "label": "x", "merge_config": {}})
        events.append({"event": "completed", "trial": trial, "ok": True, "score": 0.5, "n_docs": {"a": docs}})
    (run_dir / "journal.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    return str(run_dir)


def cells(*rows: dict) -> dict:
    return {(r["zoo"], r["method"], r["seed"]): r for r in rows}


def test_seed_rows_give_the_margin_in_se_of_the_difference_and_the_docs_share(tmp_path):
    # The raced seed-0 run had more candidates than the unraced one: 3 x 20 documents against 2 x 50.
    whole = cells(row(0, 0.80, 0.03, run_dir=journal_with(tmp_path / "w", [50, 50])), row(1, 0.70, 0.03))
    raced_dir = journal_with(tmp_path / "r", [20, 20, 20])
    raced = cells(row(0, 0.76, 0.04, share=0.35, run_dir=raced_dir), row(1, 0.70, 0.03, share=0.4))
    lines = compare_grids.seed_rows(whole, raced)
    assert lines[2].endswith("| 0.7600 ± 0.0400 | -0.0400 (-0.8 SE) | 35% | 60% |")
    assert lines[3].endswith("(equal) | 40% | n/a |")  # no run directory to count documents in


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
