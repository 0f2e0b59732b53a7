"""The model card (README.md) `evomerge merge` writes beside the merged weights.

Hugging Face's card format: YAML front matter (`base_model`, `tags`, `library_name`), then
Markdown saying how the model was made: the merge method, the source models, the exact merge YAML
and, when the config came from `evomerge export`, the search that found it (run, trial, search and
held-out scores against the baselines). Text in, text out: the command line reads the run
directory and hands the scores over as a `SearchOrigin`. Imports no torch (`export` uses it).
Every name that comes from outside (models, labels, the run's path) is written as literal text:
Markdown and HTML in it are escaped, and a `|` or a line break cannot split a table row; a backtick cannot end a code span or the YAML block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from evomerge.errors import UserError
from evomerge.merge.config import MergeConfig

_ORIGIN_LINE = re.compile(r"^# evomerge run: (?P<run>.+) \(trial (?P<trial>-?\d+)\)$")


def origin_comment(run_dir: str, trial: int) -> str:
    """The header line `evomerge export` writes, so that a later merge can find the run again.

    A line break in the path would end the comment and write YAML keys of its own, so a path with
    any control character is refused.
    """
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in run_dir):
        raise UserError(
            f"{run_dir!r}: the run's path holds a control character (a newline or a tab), which exported YAML cannot carry; move the run to a folder without one"
        )
    return f"# evomerge run: {run_dir} (trial {trial})\n"


# Characters Markdown or HTML would read as syntax, written as numeric entities (read as literal text).
_LITERAL = {ord(ch): f"&#{ord(ch)};" for ch in "&<>`*_[]|\\~"}


def literal(text: str) -> str:
    """`text` as literal Markdown on one line: syntax escaped, control characters shown as spaces."""
    flat = "".join(" " if ord(ch) < 32 or ord(ch) == 127 else ch for ch in str(text))
    return flat.translate(_LITERAL)


def _code(text: str) -> str:
    """A code span (Markdown and HTML inside stay literal) that no backtick in `text` can close."""
    flat = "".join(" " if ord(ch) < 32 or ord(ch) == 127 else ch for ch in str(text))
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", flat)), default=0) + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") else ""
    return f"{ticks}{pad}{flat}{pad}{ticks}"


def _fenced(text: str, language: str) -> str:
    """A fenced block no backtick run in `text` can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}\n"


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
    title: str,
    config: MergeConfig,
    config_text: str,
    seed: int,
    origin: SearchOrigin | None = None,
    source_models: list[str] | None = None,
) -> str:
    """The whole README.md: front matter, method, sources, the search (if any) and the YAML.

    `source_models` is given for a multi-document YAML (`config` is its final merge, which reads the
    intermediate merges by name): the models they were made from, listed instead of `config`'s.
    """
    models = config.referenced_models() if source_models is None else source_models
    front_matter = {
        "base_model": models,
        "base_model_relation": "merge",
        "tags": ["merge", "evomerge"],
        "library_name": "transformers",
    }
    base = f" with {_code(config.base_model)} as the base" if config.base_model else ""
    sections = [
        f"---\n{yaml.safe_dump(front_matter, sort_keys=False)}---\n",
        f"# {literal(title)}\n",
        f"A merge of {len(models)} models made with evomerge. `evomerge merge` or "
        f"`{'mergekit-yaml' if source_models is None else 'mergekit-multi'}` rebuilds it from the configuration below.\n",
        f"## Merge method\n\n`{config.merge_method}`{base}, merged with seed {seed} "
        "(the seed matters only for the random trims of `dare_*` and `della*`).\n",
        "## Source models\n\n" + "".join(f"- {_code(model)}\n" for model in models),
    ]
    if origin is not None:
        sections.append(_search_section(origin))
    sections.append("## Configuration\n\n" + _fenced(config_text.rstrip(), "yaml"))
    return "\n".join(sections)


def _search_section(origin: SearchOrigin) -> str:
    text = f"## Search\n\nFound by an evolutionary search: trial {origin.trial} of the run {_code(origin.run_dir)}.\n"
    if origin.unreadable is not None:
        return text + f"\nThe run could not be read when this card was written ({literal(origin.unreadable)}).\n"
    if origin.merged is None:
        text += f"\nTrial {origin.trial} was not re-scored on the held-out tasks; `evomerge status` lists its score.\n"
    rows = ([(f"this merge (trial {origin.trial})", origin.merged)] if origin.merged else []) + [
        (r.label, r) for r in origin.baselines
    ]
    if not rows:
        return text
    table = "| merge | search score | held-out score |\n|---|---|---|\n"
    table += "".join(
        f"| {literal(name)} | {_score(r.search, r.search_se)} | {_score(r.heldout, r.heldout_se)} |\n"
        for name, r in rows
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
