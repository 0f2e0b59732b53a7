"""The standard mergekit merge YAML as pydantic models: read it, check its shape, write it back.

This is the exchange format with mergekit: `evomerge export` writes it, `evomerge merge` and
`mergekit-yaml` both read it. Semantic checks that need the models (paths, shapes, layer ranges)
live in `validate.py`; this module only knows the file. A model is a folder (relative to the working
directory, as mergekit reads it) or a hub ID (`org/name@revision`): `with_local_folders` resolves
them (`evomerge.hub`), and the config keeps the names as written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from evomerge.errors import UserError, describe_validation_error
from evomerge.hub import resolve_models

Scalar = bool | int | float | str
ScalarOrGradient = Scalar | list[Scalar]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionalParameter(_Strict):
    """`{filter: self_attn, value: 0.5}`: applies to tensors whose name contains `filter`."""

    value: ScalarOrGradient
    filter: str | None = None


ParameterSetting = ConditionalParameter | list[ConditionalParameter] | ScalarOrGradient
Parameters = dict[str, ParameterSetting] | None


class SourceSlice(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = None


class ModelEntry(_Strict):
    model: str
    parameters: Parameters = None


class OutputSlice(_Strict):
    sources: list[SourceSlice]
    base_model: str | None = None
    parameters: Parameters = None


class MergeConfig(_Strict):
    """One mergekit merge: the method, the inputs (`models:` or `slices:`) and their parameters."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None

    @model_validator(mode="after")
    def _one_input_form(self):
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models:' or 'slices:'")
        return self

    def referenced_models(self) -> list[str]:
        """Every model path, base first, each once, in order of appearance."""
        seen: list[str] = [self.base_model] if self.base_model else []
        for entry in self.models or []:
            seen.append(entry.model)
        for output_slice in self.slices or []:
            seen.extend(s.model for s in output_slice.sources)
            if output_slice.base_model:
                seen.append(output_slice.base_model)
        return list(dict.fromkeys(seen))

    def referenced_fields(self) -> dict[str, str]:
        """Every model name -> the first field that writes it, base first."""
        fields: dict[str, str] = {self.base_model: "base_model"} if self.base_model else {}
        for i, entry in enumerate(self.models or []):
            fields.setdefault(entry.model, f"models[{i}].model")
        for i, output_slice in enumerate(self.slices or []):
            for j, src in enumerate(output_slice.sources):
                fields.setdefault(src.model, f"slices[{i}].sources[{j}].model")
            if output_slice.base_model:
                fields.setdefault(output_slice.base_model, f"slices[{i}].base_model")
        return fields

    def with_models(self, names: Mapping[str, str]) -> MergeConfig:
        """This config with every model name renamed by `names` (a name it lacks is kept)."""
        return MergeConfig.model_validate(rename_models(self.model_dump(mode="json", exclude_none=True), names))

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


MODEL_KEYS = ("model", "base_model")


def rename_models(data, names: Mapping[str, str]):
    """Merge-config data (as the journal and workers carry it) with its model names renamed by `names`."""
    if not names:
        return data
    if isinstance(data, dict):
        return {
            key: names.get(value, value)
            if key in MODEL_KEYS and isinstance(value, str)
            else rename_models(value, names)
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [rename_models(value, names) for value in data]
    return data


def with_local_folders(config: MergeConfig, source: str) -> MergeConfig:
    """The config with each hub ID replaced by its snapshot folder (fetched if need be); UserError
    naming every model that cannot be had."""
    sources = resolve_models(config.referenced_fields(), source, fetch_hint="hf download REPO")
    return config.with_models(sources.folders())


UNSUPPORTED_KEYS = {
    "modules": "multi-module configs are not supported yet; use 'models:' or 'slices:'",
    "tokenizer": "the 'tokenizer:' block is not supported yet; use tokenizer_source: base",
}


def parse_merge_config(data, source: str) -> MergeConfig:
    """Validate already-parsed YAML data; every problem becomes a one-line UserError."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    for key, why in UNSUPPORTED_KEYS.items():
        if key in data:
            raise UserError(f"{source}: {key}: {why}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as error:
        raise UserError(describe_validation_error(error, source)) from None


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key, mark):
        super().__init__(f"key '{key}' appears twice")
        self.key = key
        self.problem_mark = mark


class UniqueKeySafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping holding one key twice (the last would win silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` may repeat keys on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:
                continue  # an unhashable key: SafeLoader itself refuses it below
            if repeated:
                raise DuplicateKeyError(key, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: str | Path, what: str = "YAML file") -> object:
    """Safe-load a UTF-8 YAML file; every way it can be unreadable is a one-line UserError.

    `what` names the expected file in the message for a folder ("spec file", "merge YAML").
    """
    path = Path(path)
    return _parse_yaml(read_yaml_text(path, what), path)


def read_yaml_text(path: Path, what: str) -> str:
    """The text of a UTF-8 YAML file (a leading BOM dropped); UserError when it cannot be read."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give the {what}")
    if not path.is_file():
        raise UserError(f"{path}: file not found; check the path")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); save it as UTF-8"
        ) from None
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror}); check its permissions") from None
    return text


def parse_yaml_documents(text: str, path: Path) -> list:
    """Every `---`-separated document of a YAML text, as `_parse_yaml` reads one (an empty one is None)."""
    return _parse_yaml(text, path, every_document=True)


def _parse_yaml(text: str, path: Path, every_document: bool = False):
    loader = UniqueKeySafeLoader(text)
    try:
        if every_document:
            documents = []
            while loader.check_data():
                documents.append(loader.get_data())
            return documents
        return loader.get_single_data()
    except DuplicateKeyError as error:
        line = error.problem_mark.line + 1
        raise UserError(f"{path}: key '{error.key}' appears twice (second time at line {line}); keep one") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{where}: {problem}; fix the indentation or quoting there") from None
    except RecursionError:
        raise UserError(
            f"{path}: nested too deeply to read; a config is only a few levels deep, fix the file"
        ) from None
    finally:
        loader.dispose()


def load_merge_config(path: str | Path) -> MergeConfig:
    """The one merge of a merge YAML; a multi-document YAML (`merge/multi.py`) is refused in one line."""
    path = Path(path)
    documents = parse_yaml_documents(read_yaml_text(path, "merge YAML"), path)
    if len(documents) > 1:
        raise UserError(
            f"{path}: holds {len(documents)} documents separated by '---' (several merges); `evomerge merge` it to a folder first and use that folder"
        )
    return parse_merge_config(documents[0] if documents else None, str(path))
