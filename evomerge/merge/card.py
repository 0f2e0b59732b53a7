"""The model card (README.md) `evomerge merge` writes beside the merged weights.

Hugging Face's card format: YAML front matter (`base_model`, `tags`, `library_name`), then
Markdown saying how the model was made: the merge method, the source models, the exact merge YAML
and, when the config came from `evomerge export`, the search that found it (run, trial, search and
held-out scores against the baselines). Text in, text out: the command line reads the run
directory and hands the scores over as a `SearchOrigin`. Imports no torch (`export` uses it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from evomerge.merge.config import MergeConfig

_ORIGIN_LINE = re.compile(r"^# evomerge run: (?P<run>.+) \(trial (?P<trial>-?\d+)\)$")


def origin_comment(run_dir: str, trial: int) -> str:
    """The header line `evomerge export` writes, so that a later merge can find the run again."""
    return f"# evomerge run: {run_dir} (trial {trial})\n"


def parse_origin(config_text: str) -> tuple[str, int] | None:
    """(run directory, trial) from an exported config's leading comments, or None."""
    for line in config_text.splitlines():
        if not line.startswith("#"):
            break
        match = _ORIGIN_LINE.match(line.rstrip())
        if match:
            return match["run"], int(match["trial"])
    return None


@dataclass(frozen=True)
class ScoreRow:
    """One merge's weighted score on the search tasks and on the held-out tasks, with standard errors."""

    label: str
    search: float
    search_se: float | None
    heldout: float | None
    heldout_se: float | None


@dataclass(frozen=True)
class SearchOrigin:
    """The search a config was exported from, and its scores when the run directory was readable."""

    run_dir: str
    trial: int
    merged: ScoreRow | None = None  # this merge's row; None when it has no held-out score or no run
    baselines: tuple[ScoreRow, ...] = ()
    unreadable: str | None = None  # why the run directory could not be read


def render_model_card(
    title: str, config: MergeConfig, config_text: str, seed: int, origin: SearchOrigin | None = None
) -> str:
    """The whole README.md: front matter, method, sources, the search (if any) and the YAML."""
    models = config.referenced_models()
    front_matter = {
        "base_model": models,
        "base_model_relation": "merge",
        "tags": ["merge", "evomerge"],
        "library_name": "transformers",
    }
    base = f" with `{config.base_model}` as the base" if config.base_model else ""
    sections = [
        f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n",
        f"# {title}\n",
        f"A merge of {len(models)} models made with evomerge. `evomerge merge` or `mergekit-yaml` rebuilds it "
        "from the configuration below.\n",
        f"## Merge method\n\n`{config.merge_method}`{base}, merged with seed {seed} "
        "(the seed matters only for the random trims of `dare_*` and `della*`).\n",
        "## Source models\n\n" + "".join(f"- `{model}`\n" for model in models),
    ]
    if origin is not None:
        sections.append(_search_section(origin))
    sections.append(f"## Configuration\n\n```yaml\n{config_text.rstrip()}\n```\n")
    return "\n".join(sections)


def _search_section(origin: SearchOrigin) -> str:
    text = f"## Search\n\nFound by an evolutionary search: trial {origin.trial} of the run `{origin.run_dir}`.\n"
    if origin.unreadable is not None:
        return text + f"\nThe run could not be read when this card was written ({origin.unreadable}).\n"
    if origin.merged is None:
        text += f"\nTrial {origin.trial} was not re-scored on the held-out tasks; `evomerge status` lists its score.\n"
    rows = ([(f"this merge (trial {origin.trial})", origin.merged)] if origin.merged else []) + [
        (r.label, r) for r in origin.baselines
    ]
    if not rows:
        return text
    table = "| merge | search score | held-out score |\n|---|---|---|\n"
    table += "".join(
        f"| {name} | {_score(r.search, r.search_se)} | {_score(r.heldout, r.heldout_se)} |\n" for name, r in rows
    )
    return (
        text
        + "\nWeighted scores on the search tasks and on the disjoint held-out tasks (± standard error):\n\n"
        + table
    )


def _score(value: float | None, standard_error: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if standard_error is None else f"{value:.4f} ± {standard_error:.4f}"
