"""The report's figures, drawn with matplotlib's object API onto Agg canvases and saved as PNGs.

`matplotlib.figure.Figure` is used directly rather than pyplot so that drawing never touches a
global backend or window state (safe in a headless driver and in tests). Inputs are the plain
numbers that `evomerge.rundir.report` reduces a journal to.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

EVOLVED = "#2563eb"
BEST = "#1e3a8a"
BASELINE = "#d97706"
WINNER = "#f59e0b"
FAILED = "#dc2626"
# One hue per kind of merge, so parents, default merges and evolved merges read apart at a glance;
# members of a kind get distinct shades of its hue.
FAMILY_BASE = "#64748b"
FAMILY_SHADES = {"parent": "Greens", "default merge": "Oranges"}
FAMILY_LINES = {"parent": "#15803d", "default merge": "#c2410c"}
FRONT = "#e11d48"
MUTED = "#94a3b8"
PARAM_COLORMAPS = {"weight": "viridis", "density": "cividis"}
DPI = 110
MAX_ANNOTATED_CELLS = 40
MAX_FIGURE_WIDTH = 10.5  # inches; the page shows figures about 1000 px wide


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, color="#e2e8f0", linewidth=0.8)
    ax.set_axisbelow(True)


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, facecolor="white")


@dataclass(frozen=True)
class ScoreMarks:
    """What the score plot marks besides the dots: where the search came within 95 % of its final
    best, as (search evaluations, evaluation number), and the held-out winner's trial id."""

    reach: tuple[int, int] | None = None
    winner: int | None = None


def score_over_evaluations(history, marks: ScoreMarks, path: Path) -> None:
    """Dots per evaluation (baselines as diamonds coloured by kind, failures as crosses on the
    floor), the best evolved score so far as a staircase, the best parent and best default merge as
    dashed references, and the held-out winner as a star. The legend sits outside the axes, so no
    label covers a dot."""
    fig = Figure(figsize=(10.5, 4.4), layout="constrained")
    ax = fig.add_subplot()
    _style(ax)
    evolved = [e for e in history if e.kind == "optimizer"]
    baselines = [e for e in history if e.kind != "optimizer" and e.score is not None]
    done = [e for e in evolved if e.score is not None]
    failed = [e for e in history if e.score is None]
    if done:
        ax.scatter(
            [e.number for e in done],
            [e.score for e in done],
            s=22,
            color=EVOLVED,
            alpha=0.55,
            label="evolved merge",
            zorder=3,
        )
    _baseline_diamonds(ax, baselines)
    if failed:
        ax.scatter(
            [e.number for e in failed],
            [0.03] * len(failed),
            transform=ax.get_xaxis_transform(),
            marker="x",
            s=40,
            color=FAILED,
            label=f"failed ({len(failed)})",
            zorder=4,
        )
    if done:
        _best_line(ax, evolved, history[-1].number)
    _reference_lines(ax, baselines)
    _marks(ax, history, marks)
    ax.margins(y=0.12)  # room above the best dot for its label
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("evaluation (in order finished)")
    ax.set_ylabel("search score")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8.5)
    _save(fig, path)


def _baseline_diamonds(ax, baselines) -> None:
    colors = _family_colors([e.family.value for e in baselines])
    for family in ("base", "parent", "default merge"):
        members = [(e, c) for e, c in zip(baselines, colors, strict=True) if e.family.value == family]
        if members:
            ax.scatter(
                [e.number for e, _ in members],
                [e.score for e, _ in members],
                s=60,
                marker="D",
                color=[c for _, c in members],
                edgecolor="white",
                label=family if family == "base" else f"{family}s",
                zorder=3,
            )


def _reference_lines(ax, baselines) -> None:
    """The best parent and the best default merge as dashed lines, named in the legend."""
    for family in ("parent", "default merge"):
        members = [e for e in baselines if e.family.value == family]
        if members:
            top = max(members, key=lambda e: e.score)
            label = f"best {family}: {_short(top.label)} ({top.score:.3f})"
            ax.axhline(top.score, color=FAMILY_LINES[family], linestyle="--", linewidth=1.1, zorder=2, label=label)


def _marks(ax, history, marks: ScoreMarks) -> None:
    winner = next((e for e in history if e.trial == marks.winner and e.score is not None), None)
    if winner is not None:
        ax.scatter(
            [winner.number],
            [winner.score],
            s=230,
            marker="*",
            color=WINNER,
            edgecolor=BEST,
            linewidth=1.0,
            zorder=6,
            label=f"held-out winner (export): trial {winner.trial}",
        )
    if marks.reach is not None:
        searched, number = marks.reach
        label = f"95% of the best after {searched} evolved evaluation{'s' if searched != 1 else ''}"
        ax.axvline(number, color=MUTED, linestyle=":", linewidth=1.4, zorder=1, label=label)


def _short(label: str, width: int = 28) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _best_line(ax, evolved, last_number: int) -> None:
    scores = np.array([np.nan if e.score is None else e.score for e in evolved])
    running = np.fmax.accumulate(scores)
    numbers = np.array([e.number for e in evolved])
    keep = ~np.isnan(running)
    xs, ys = np.append(numbers[keep], last_number), np.append(running[keep], running[keep][-1])
    ax.step(xs, ys, where="post", color=BEST, linewidth=2, label="best evolved so far", zorder=4)
    best = max((e for e in evolved if e.score is not None), key=lambda e: e.score)
    ax.scatter([best.number], [best.score], s=120, facecolor="none", edgecolor=BEST, linewidth=1.8, zorder=5)
    ax.annotate(
        f"best search score: {best.label}",
        (best.number, best.score),
        xytext=(0, 9),
        textcoords="offset points",
        ha="center",
        color=BEST,
        fontsize=8.5,
        fontweight="bold",
        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
    )


def task_bars(panels: list[dict], path: Path) -> None:
    """Grouped bars, one group per task, one bar per baseline and the best evolved merge."""
    widest = max(len(_tasks(p)) * (len(p["entries"]) * 0.32 + 0.5) for p in panels)
    fig = Figure(figsize=(min(16.0, max(7.5, 3.5 + widest)), 3.4 * len(panels)), layout="constrained")
    for index, panel in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, index + 1)
        _style(ax)
        ax.grid(False, axis="x")
        tasks, entries = _tasks(panel), panel["entries"]
        width = 0.8 / len(entries)
        colors = _family_colors([entry["family"] for entry in entries])
        for offset, (entry, color) in enumerate(zip(entries, colors, strict=False)):
            xs = np.arange(len(tasks)) - 0.4 + width * (offset + 0.5)
            values = [entry["values"].get(t, np.nan) for t in tasks]
            errors = [entry["errors"].get(t, 0.0) for t in tasks]
            evolved = entry["family"] == "evolved"
            ax.bar(
                xs,
                values,
                width * 0.92,
                yerr=errors,
                color=color,
                edgecolor=BEST if evolved else "white",
                linewidth=1.2 if evolved else 0.5,
                error_kw={"elinewidth": 0.9, "ecolor": "#334155", "capsize": 2},
                label=entry["label"],
            )
        ax.set_xticks(np.arange(len(tasks)), tasks)
        ax.set_ylabel("metric")
        ax.set_title(panel["title"], loc="left", fontsize=10, color="#334155")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8.5)
    _save(fig, path)


def _tasks(panel: dict) -> list[str]:
    return list(dict.fromkeys(task for entry in panel["entries"] for task in entry["values"]))


def _family_colors(families: list[str]) -> list:
    """A colour per entry: grey for the base, shades of green for parents and of orange for
    default merges (distinct within a kind), blue for evolved merges."""
    counts = {family: families.count(family) for family in FAMILY_SHADES}
    seen = dict.fromkeys(FAMILY_SHADES, 0)
    colors = []
    for family in families:
        if family in FAMILY_SHADES:
            shades = matplotlib.colormaps[FAMILY_SHADES[family]](np.linspace(0.45, 0.9, max(counts[family], 1)))
            colors.append(shades[seen[family]])
            seen[family] += 1
        else:
            colors.append(EVOLVED if family == "evolved" else FAMILY_BASE)
    return colors


def gene_heatmaps(trials: list[tuple[str, list]], ranges: dict[str, tuple[float, float]], path: Path) -> int:
    """A grid of heatmaps, one row per parameter and one column per trial (best first), as many
    trials as fit the page width at a legible cell size; returns how many were drawn."""
    params = list(dict.fromkeys(grid.param for _, grids in trials for grid in grids))
    sample = trials[0][1]
    cell_rows = max(len(grid.rows) for grid in sample)
    panel_width = max(1.4, 0.38 * max(len(grid.columns) for grid in sample) + 0.3)
    frame_width = max(len(row) for grid in sample for row in grid.rows) * 0.075 + 1.3  # row labels and colour bar
    trials = trials[: max(1, int((MAX_FIGURE_WIDTH - frame_width) // panel_width))]
    fig = Figure(
        figsize=(frame_width + len(trials) * panel_width, len(params) * (0.36 * cell_rows + 0.8)), layout="constrained"
    )
    axes = fig.subplots(len(params), len(trials), squeeze=False)
    for row, param in enumerate(params):
        image = None
        for col, (title, grids) in enumerate(trials):
            grid = next((g for g in grids if g.param == param), None)
            ax = axes[row][col]
            if grid is None:
                ax.set_axis_off()
                continue
            image = _heatmap(ax, grid, ranges.get(param), show_rows=col == 0)
            if row == 0:
                ax.set_title(
                    title,
                    fontsize=9.5,
                    color=BEST if col == 0 else "#334155",
                    fontweight="bold" if col == 0 else "normal",
                )
        if image is not None:
            fig.colorbar(image, ax=list(axes[row]), label=param, shrink=0.9, pad=0.01)
    _save(fig, path)
    return len(trials)


def _heatmap(ax, grid, value_range, show_rows: bool):
    colormap = matplotlib.colormaps[PARAM_COLORMAPS.get(grid.param, "viridis")].with_extremes(bad="#f1f5f9")
    low, high = value_range or (np.nanmin(grid.values), np.nanmax(grid.values))
    if high <= low:
        low, high = low - 0.5, high + 0.5
    image = ax.imshow(np.ma.masked_invalid(grid.values), cmap=colormap, vmin=low, vmax=high, aspect="auto")
    ax.set_xticks(range(len(grid.columns)), grid.columns, fontsize=8, rotation=90 if len(grid.columns) > 8 else 0)
    ax.set_yticks(range(len(grid.rows)), grid.rows if show_rows else [], fontsize=8)
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    for start in grid.model_starts:
        ax.axhline(start - 0.5, color="white", linewidth=2.5)
    if 0 < grid.layer_columns < len(grid.columns):  # between the layer groups and embed/head
        ax.axvline(grid.layer_columns - 0.5, color="white", linewidth=2.5)
    if len(grid.labels) <= MAX_ANNOTATED_CELLS:
        for y, x, value in grid.labels:
            shade = colormap((value - low) / (high - low))
            ink = "white" if 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.55 else "black"
            ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=7.5, color=ink)
    return image


def pareto_front(points: np.ndarray, on_front: np.ndarray, names: list[str], evaluations: list, path: Path) -> None:
    """Scatter of each pair of objectives with the non-dominated evaluations highlighted; with two
    objectives the front is joined as the staircase bounding what it dominates."""
    pairs = list(combinations(range(points.shape[1]), 2))[:6]
    columns = min(3, len(pairs))
    rows = -(-len(pairs) // columns)
    fig = Figure(figsize=(4.6 * columns + 1.0, 4.0 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    baseline = np.array([e.kind != "optimizer" for e in evaluations])
    for ax, (i, j) in zip(axes, pairs, strict=False):
        _pareto_panel(ax, points[:, [i, j]], on_front, baseline, evaluations, staircase=points.shape[1] == 2)
        ax.set_xlabel(f"{names[i]} →")
        ax.set_ylabel(f"{names[j]} →")
    for ax in axes[len(pairs) :]:
        ax.set_axis_off()
    axes[0].legend(loc="best", frameon=False, fontsize=8.5)
    _save(fig, path)


def _pareto_panel(ax, xy: np.ndarray, on_front: np.ndarray, baseline: np.ndarray, evaluations: list, staircase: bool):
    """One pair of objectives: dominated candidates, baselines, and the front (labelled when small)."""
    _style(ax)
    rest = ~on_front
    dominated, baselines, front = xy[rest & ~baseline], xy[rest & baseline], xy[on_front]
    ax.scatter(dominated[:, 0], dominated[:, 1], s=22, color=MUTED, alpha=0.7, label="dominated")
    ax.scatter(baselines[:, 0], baselines[:, 1], s=50, marker="D", color=BASELINE, alpha=0.8, label="baseline")
    ax.scatter(
        front[:, 0], front[:, 1], s=60, color=FRONT, edgecolor="white", zorder=3, label=f"Pareto front ({len(front)})"
    )
    if staircase:
        order = np.argsort(front[:, 0])
        ax.step(front[order, 0], front[order, 1], where="pre", color=FRONT, linewidth=1.3, zorder=2)
    if len(front) <= 8:
        for k in np.flatnonzero(on_front):
            ax.annotate(
                evaluations[k].label,
                tuple(xy[k]),
                xytext=(5, 4),
                textcoords="offset points",
                fontsize=8,
                color="#334155",
            )
