"""The gene table a run journals once: what every gene of the search vector means.

The genome writes it (`Genome.gene_table`), the search journals it on `run_started`, and the report
reads it to draw the per-layer heatmaps, so nothing downstream parses gene names. Journals written
before the table existed fall back to `rows_from_names`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

EMBED = "embed"
HEAD = "head"


@dataclass(frozen=True)
class GeneRow:
    """One gene: its display name, parameter, owner, where it acts and on which part."""

    name: str
    param: str
    model: int | None  # expert index; None for a parameter shared by all models
    group: int | str  # layer-group index, or EMBED / HEAD for the embeddings and head genes
    part: str | None  # "attn", "mlp", or None for the whole group
    layers: tuple[int, int] | None  # the group's [start, end) layers; None for embed/head or unknown

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> GeneRow:
        layers = data.get("layers")
        return cls(
            name=data["name"],
            param=data["param"],
            model=data.get("model"),
            group=data["group"],
            part=data.get("part"),
            layers=tuple(layers) if layers else None,
        )

    @property
    def column_label(self) -> str:
        """'L0-7' for layers 0..7, 'L3' for one layer, 'g3' when the range is unknown, or embed/head."""
        if isinstance(self.group, str):
            return self.group
        if self.layers is None:
            return f"g{self.group}"
        start, end = self.layers
        return f"L{start}" if end - start == 1 else f"L{start}-{end - 1}"


def gene_name(param: str, model: int | None, group: int | str, part: str | None) -> str:
    """'weight/m0/g3/attn', 'lambda/all/g1', 'density/m1/gembed': for display and journal keys only."""
    owner = "all" if model is None else f"m{model}"
    return "/".join([param, owner, f"g{group}", *([part] if part else [])])


def rows_from_names(names) -> list[GeneRow]:
    """The table of a journal written before it was journaled, read back from the gene names."""
    rows = []
    for name in names:
        param, owner, group, *part = name.split("/")
        index = group.removeprefix("g")
        model = owner.removeprefix("m")
        rows.append(
            GeneRow(
                name=name,
                param=param,
                model=int(model) if model.isdigit() else None,
                group=int(index) if index.isdigit() else index,
                part=part[0] if part else None,
                layers=None,
            )
        )
    return rows
