"""Multi-document merge YAMLs, as `mergekit-multi` reads them: named intermediate merges, then one final merge.

The file holds several `---`-separated mergekit configs. Every document but one carries a `name:`;
a named merge is built first, and the other documents refer to it by that bare name wherever a model
goes (`models[].model`, `base_model`, `slices[].sources[].model`, `slices[].base_model`,
`tokenizer_source`). The one unnamed document is the final merge, the model the user asked for.

`read_documents` parses and checks such a text (the named merges come out in dependency order);
`multi_document_yaml` writes one that both it and `mergekit-multi` read. Text in, configs out: no
model is read and no torch is imported here; `multi_disk.py` materializes the merges.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from evomerge.errors import UserError
from evomerge.merge.config import (
    MergeConfig,
    parse_merge_config,
    parse_yaml_documents,
    read_yaml_text,
    rename_models,
)

# A name becomes a folder name (INTERMEDIATE_DIR/NAME), and mergekit would read '@' as a revision and '+' as a LoRA.
_NAME_FORM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
# tokenizer_source words that are not models: a merge named so could not be told from them.
_RESERVED_NAMES = ("base", "union")


@dataclass(frozen=True)
class NamedMerge:
    """One named document: its name, its config (other merges still named) and how messages call it."""

    name: str
    config: MergeConfig
    label: str  # "FILE: document 2 ('name')"


@dataclass(frozen=True)
class MultiMerge:
    """The named merges, each after every merge it uses, and the final merge."""

    intermediates: tuple[NamedMerge, ...]
    final: MergeConfig
    final_label: str

    def source_models(self) -> list[str]:
        """Every model the documents read that is not one of their merges, each once, in order."""
        names = {merge.name for merge in self.intermediates}
        models = [m for merge in self.intermediates for m in merge.config.referenced_models()]
        models += self.final.referenced_models()
        return [model for model in dict.fromkeys(models) if model not in names]


def with_merge_folders(config: MergeConfig, folders: Mapping[str, str]) -> MergeConfig:
    """`config` with each merge name it uses replaced by the folder that merge was written to."""
    data = rename_models(config.model_dump(mode="json", exclude_none=True), folders)
    if data.get("tokenizer_source") in folders:
        data["tokenizer_source"] = folders[data["tokenizer_source"]]
    return MergeConfig.model_validate(data)


def load_documents(path: Path) -> MultiMerge | None:
    """The multi-document merge YAML at `path`, or None when it holds a single document (a plain merge YAML)."""
    text = read_yaml_text(Path(path), "merge YAML")
    if len(parse_yaml_documents(text, Path(path))) < 2:
        return None
    return read_documents(text, str(path))


def read_documents(text: str, source: str) -> MultiMerge:
    """Parse and check a multi-document merge YAML; every problem is a one-line UserError naming the document."""
    multi = _multi_merge(parse_yaml_documents(text, Path(source)), source)
    for merge in multi.intermediates:
        if Path(merge.name).expanduser().exists():
            raise UserError(
                f"{merge.label}: '{merge.name}' is also a file or folder here, and a model of that name would be read from it; rename the merge"
            )
    return multi


def multi_document_yaml(intermediates: list[tuple[str, dict]], final: dict, header: str = "") -> str:
    """A multi-document merge YAML: `header` (comment lines), each named merge with `name:` first, the final merge last.

    The configs are merge-config data (`MergeConfig.model_dump(mode="json", exclude_none=True)`);
    ValueError when the result would not read back (a bad name, a cycle, an unused merge).
    """
    if any(line.strip() and not line.lstrip().startswith("#") for line in header.splitlines()):
        raise ValueError(f"header must be comment lines, got {header!r}")
    documents = [{"name": name, **{k: v for k, v in config.items() if k != "name"}} for name, config in intermediates]
    documents.append(final)
    texts = [yaml.safe_dump(document, sort_keys=False, default_flow_style=None) for document in documents]
    text = (header.rstrip("\n") + "\n" if header.strip() else "") + "---\n".join(texts)
    try:
        _multi_merge(list(yaml.safe_load_all(text)), "multi-document YAML")
    except UserError as error:
        raise ValueError(str(error)) from None
    return text


def _multi_merge(documents: list, source: str) -> MultiMerge:
    named: dict[str, NamedMerge] = {}
    finals: list[tuple[MergeConfig, str]] = []
    for number, document in enumerate(documents, start=1):
        label = f"{source}: document {number}"
        if not document:
            raise UserError(f"{label}: empty; remove the extra '---' or write the merge config there")
        if not isinstance(document, dict) or "name" not in document:
            finals.append((parse_merge_config(document, label), label))
            continue
        name = _checked_name(document["name"], label)
        label = f"{label} ('{name}')"
        if name in named:
            raise UserError(f"{label}: {named[name].label} has this name too; give each merge its own name")
        rest = {key: value for key, value in document.items() if key != "name"}
        named[name] = NamedMerge(name, parse_merge_config(rest, label), label)
    final, final_label = _the_final(finals, source)
    uses = {name: _merges_used(merge.config, named) for name, merge in named.items()}
    _refuse_unused(named, uses, _merges_used(final, named))
    return MultiMerge(tuple(named[name] for name in _dependency_order(uses, named)), final, final_label)


def _checked_name(name, label: str) -> str:
    if not isinstance(name, str):
        raise UserError(f"{label}: name: {name!r} is not text; give the merge a name such as 'step1'")
    if "/" in name:
        raise UserError(
            f"{label}: name: '{name}' looks like a hub ID (org/name); rename it to a bare name such as '{name.replace('/', '-')}'"
        )
    if not _NAME_FORM.match(name):
        raise UserError(
            f"{label}: name: '{name}' is not a plain folder name; rename it using letters, digits, '.', '_' and '-' only"
        )
    if name in _RESERVED_NAMES:
        raise UserError(f"{label}: name: '{name}' means something else in tokenizer_source; rename the merge")
    return name


def _the_final(finals: list[tuple[MergeConfig, str]], source: str) -> tuple[MergeConfig, str]:
    if not finals:
        raise UserError(
            f"{source}: every document has a name:, so none is the final merge; remove name: from the one that makes the model"
        )
    if len(finals) > 1:
        labels = " and ".join(label.rsplit(": ", 1)[-1] for _, label in finals)
        raise UserError(
            f"{source}: {labels} have no name:, and only the final merge may lack one; name each intermediate merge"
        )
    return finals[0]


def _merges_used(config: MergeConfig, named: Mapping[str, NamedMerge]) -> list[str]:
    """The named merges `config` reads, in order of appearance."""
    models = [*config.referenced_models(), config.tokenizer_source]
    return [name for name in dict.fromkeys(m for m in models if m) if name in named]


def _refuse_unused(named: Mapping[str, NamedMerge], uses: Mapping[str, list[str]], final_uses: list[str]) -> None:
    used = set(final_uses).union(*uses.values())
    for name, merge in named.items():
        if name not in used:
            raise UserError(
                f"{merge.label}: no other document uses this merge; name it as a model where it goes, or remove the document"
            )


def _dependency_order(uses: Mapping[str, list[str]], named: Mapping[str, NamedMerge]) -> list[str]:
    """The names, each after every name it uses (file order otherwise); UserError naming a cycle."""
    order: list[str] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in done:
            return
        if name in path:
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise UserError(
                f"{named[name].label}: the merges use each other in a cycle ({cycle}); break it so each merge uses only earlier ones"
            )
        for used in uses[name]:
            visit(used, [*path, name])
        done.add(name)
        order.append(name)

    for name in uses:
        visit(name, [])
    return order
