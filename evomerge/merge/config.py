"""The standard mergekit merge YAML as pydantic models: read it, check its shape, write it back.

This is the exchange format with mergekit: `evomerge export` writes it, `evomerge merge` and
`mergekit-yaml` both read it. Semantic checks that need the models (paths, shapes, layer ranges)
live in `validate.py`; this module only knows the file.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from evomerge.errors import UserError, describe_validation_error

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

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


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


def load_yaml_file(path: str | Path) -> object:
    """yaml.safe_load a file; a missing file or a syntax error becomes a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; check the path")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{where}: {problem}; fix the indentation or quoting there") from None


def load_merge_config(path: str | Path) -> MergeConfig:
    return parse_merge_config(load_yaml_file(path), str(path))
