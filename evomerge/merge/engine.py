"""Merge one tensor (`merge_tensor`), and apply a whole merge plan streamed to disk as a model folder.

The in-memory mode a search worker runs once per candidate (`resident.py`) calls the same
`merge_tensor` for every output tensor, so both modes produce identical tensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from rich.progress import Progress

from evomerge.errors import UserError
from evomerge.files import write_bytes_atomic, write_text_atomic
from evomerge.merge.config import MergeConfig
from evomerge.merge.io import LazyTensorReader, StreamingShardWriter
from evomerge.merge.methods import (
    MethodInfo,
    TieOrder,
    device_tie_order,
    linear_merge,
    slerp,
    sparsify,
    task_vector_merge,
    top_k_masks,
)
from evomerge.merge.output import StagedFolder, check_output_folder
from evomerge.merge.plan import TensorPlan
from evomerge.merge.tensor_adapters import PLAIN_ADAPTERS, arcee_fusion
from evomerge.merge.validate import ValidatedMerge, validate_merge_config

TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

DTYPE_CONFIG_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def tensor_seed(seed: int, output: str, input_index: int) -> int:
    """A 63-bit seed keyed by (seed, tensor, input), so random trims do not depend on merge order."""
    digest = hashlib.blake2b(f"{seed}|{output}|{input_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def tensor_generator(seed: int, output: str, input_index: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_seed(seed, output, input_index))
    return generator


def merge_tensor(
    plan: TensorPlan,
    method: MethodInfo,
    inputs: list[torch.Tensor],
    seed: int = 0,
    deltas: dict[int, torch.Tensor] | None = None,
    ranks: dict[int, torch.Tensor] | None = None,
    tie_order: TieOrder | None = None,
) -> torch.Tensor:
    """One output tensor from its inputs; `deltas`/`ranks` (by input index) skip recomputation.

    `tie_order` picks which elements tied at a TIES threshold are kept (default: the device's).
    The method's family picks the tensor function (`FAMILY_MERGES`).
    """
    return FAMILY_MERGES[method.family](plan, method, inputs, seed, deltas, ranks, tie_order)


def _linear(plan: TensorPlan, method: MethodInfo, inputs: list[torch.Tensor], *_) -> torch.Tensor:
    weights = [params["weight"] for params in plan.per_input]
    return linear_merge(inputs, weights, plan.shared["normalize"])


def _slerp(plan: TensorPlan, method: MethodInfo, inputs: list[torch.Tensor], *_) -> torch.Tensor:
    base_index = base_index_of(plan)
    return slerp(plan.shared["t"], inputs[base_index], inputs[1 - base_index])


def _task_vectors(
    plan: TensorPlan,
    method: MethodInfo,
    inputs: list[torch.Tensor],
    seed: int,
    deltas: dict[int, torch.Tensor] | None,
    ranks: dict[int, torch.Tensor] | None,
    tie_order: TieOrder | None,
) -> torch.Tensor:
    base_index = base_index_of(plan)
    base = inputs[base_index]
    others = [i for i in range(len(plan.per_input)) if i != base_index]
    task_vectors = {i: deltas[i] if deltas and i in deltas else inputs[i] - base for i in others}
    masks = _magnitude_masks(plan, method, task_vectors, ranks, tie_order)
    trimmed, weights = [], []
    for index in others:
        params, delta = plan.per_input[index], task_vectors[index]
        if method.sparsification:
            delta = sparsify(
                delta,
                params["density"],
                method.sparsification,
                rescale=plan.shared["rescale"],
                gamma=params.get("gamma", 0.01),
                epsilon=params.get("epsilon", 0.15),
                generator=tensor_generator(seed, plan.output, index, base.device) if method.is_random else None,
                rank=ranks.get(index) if ranks else None,
                mask=masks.get(index),
                order=tie_order,
            )
        trimmed.append(delta)
        weights.append(params["weight"])
    return task_vector_merge(
        base,
        trimmed,
        weights,
        sign_consensus=method.sign_consensus,
        normalize=plan.shared["normalize"],
        lam=plan.shared["lambda"],
    )


def _magnitude_masks(
    plan: TensorPlan,
    method: MethodInfo,
    task_vectors: dict[int, torch.Tensor],
    ranks: dict[int, torch.Tensor] | None,
    tie_order: TieOrder | None,
) -> dict[int, torch.Tensor]:
    """A magnitude trim's masks of every trimmed input at once (one batched selection); else none."""
    if method.magnitude_rank != "descending":
        return {}
    trimming = [i for i, delta in task_vectors.items() if 0 < plan.per_input[i]["density"] < 1 and delta.numel()]
    found = top_k_masks(
        [task_vectors[i] for i in trimming],
        [plan.per_input[i]["density"] for i in trimming],
        tie_order,
        [ranks.get(i) if ranks else None for i in trimming],
    )
    return dict(zip(trimming, found, strict=True))


def _arcee_fusion(plan: TensorPlan, method: MethodInfo, inputs: list[torch.Tensor], seed: int, *_) -> torch.Tensor:
    # Its quantile sample (tensors above 10**6 elements) is drawn per tensor, like random trims.
    return arcee_fusion(plan, inputs, tensor_generator(seed, plan.output, 0, inputs[0].device))


def _plain(adapter):
    def merge(plan: TensorPlan, method: MethodInfo, inputs: list[torch.Tensor], *_) -> torch.Tensor:
        return adapter(plan, inputs)

    return merge


# Each family's tensor function: (plan, method, inputs, seed, deltas, ranks, tie_order) -> tensor.
FAMILY_MERGES = {
    "linear": _linear,
    "slerp": _slerp,
    "task_vector": _task_vectors,
    "arcee_fusion": _arcee_fusion,
    **{family: _plain(adapter) for family, adapter in PLAIN_ADAPTERS.items()},
}


def base_index_of(plan: TensorPlan) -> int:
    if plan.base_index is None:  # validate_merge_config rejects such plans for methods that need a base
        raise ValueError(f"{plan.output}: this merge method needs a base model among its inputs")
    return plan.base_index


def named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a model by name, tied names included."""
    targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    return targets


class NonFiniteOutput(ValueError):
    """A merged tensor holds NaN or inf (typically a non-finite or huge weight in the config)."""

    def __init__(self, tensor: str):
        super().__init__(f"merged tensor {tensor} holds NaN or inf values")
        self.tensor = tensor


class TensorMergeFailed(ValueError):
    """A method's arithmetic refused a tensor (as mergekit's does), named in the message."""


def merge_to_disk(
    config: MergeConfig,
    out_dir: str | Path,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    max_shard_bytes: int = 2 * 1024**3,
    *,
    config_file: Path | None = None,
    force: bool = False,
    allow_non_finite: bool = False,
    model_card: str | None = None,
    tie_order: TieOrder | None = None,
) -> ValidatedMerge:
    """Write the merged model folder, streaming tensor by tensor, and publish it whole.

    Everything is checked before a weight is read; the folder is written beside `out_dir` and
    renamed into place complete (see output.py). `force` replaces a non-empty `out_dir`;
    `config_file` names the config in errors and is protected like the inputs; `model_card` is
    written as README.md. A non-finite merged tensor raises NonFiniteOutput unless allowed.
    `tie_order` overrides the device's TIES tie order ("flat" writes what a CUDA search scored).
    """
    source = str(config_file) if config_file is not None else "config"
    validated = validate_merge_config(config, source)
    target = check_output_folder(out_dir, _protected_inputs(validated, config_file), force)
    with StagedFolder(target, shown=str(out_dir)) as staged:
        try:
            order = tie_order or device_tie_order(torch.device(device))
            _write_tensors(validated, staged.path, device, seed, progress, max_shard_bytes, allow_non_finite, order)
            _write_model_metadata(validated, staged.path)
            if model_card is not None:
                write_text_atomic(staged.path / "README.md", model_card)
            staged.publish()
        except TensorMergeFailed as error:
            raise UserError(f"{source}: {error}; nothing was written") from None
        except OSError as error:  # disk full, a folder made read-only meanwhile, an input deleted mid-merge
            where = f": {error.filename}" if error.filename else ""
            raise UserError(
                f"{out_dir}: the merge failed ({error.strerror or error}{where}); nothing was written there, fix that and rerun"
            ) from None
    return validated


def _protected_inputs(validated: ValidatedMerge, config_file: Path | None) -> dict[str | Path, str]:
    roles: dict[str | Path, str] = {path: "the input model" for path in validated.folders}
    if validated.config.base_model:
        roles[validated.config.base_model] = "the base model"
    if validated.donor not in validated.config.referenced_models():
        roles[validated.donor] = "the tokenizer source"
    if config_file is not None:
        roles[config_file] = "the merge config"
    return roles


def _write_tensors(
    validated: ValidatedMerge,
    out_dir: Path,
    device: str,
    seed: int,
    progress: bool,
    max_shard_bytes: int,
    allow_non_finite: bool,
    tie_order: TieOrder,
) -> None:
    readers = {path: LazyTensorReader(folder) for path, folder in validated.folders.items()}
    plans = validated.plan.tensors
    outputs = [(p.output, _shape_of(validated, p), validated.out_dtype[p.output]) for p in plans]
    writer = StreamingShardWriter(out_dir, outputs, max_shard_bytes)
    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("merging", total=len(plans))
            for plan in plans:
                working = validated.working_dtype[plan.output]
                inputs = [readers[model].read(name, device).to(working) for model, name in plan.inputs]
                try:
                    merged = merge_tensor(plan, validated.plan.method, inputs, seed, tie_order=tie_order)
                except ValueError as error:  # e.g. multislerp's vanishing mean direction, as mergekit raises
                    raise TensorMergeFailed(f"tensor {plan.output}: {error}") from None
                merged = merged.to(validated.out_dtype[plan.output])
                # Checked in the output dtype: a finite float32 result can still overflow bfloat16.
                if not allow_non_finite and not bool(torch.isfinite(merged).all()):
                    raise NonFiniteOutput(plan.output)
                writer.write(plan.output, merged)
                bar.advance(task)
    except BaseException:
        writer.abort()
        raise
    writer.close()


def _shape_of(validated: ValidatedMerge, plan: TensorPlan) -> tuple[int, ...]:
    model, name = plan.inputs[0]
    return validated.folders[model].tensors[name].shape


def _write_model_metadata(validated: ValidatedMerge, out_dir: Path) -> None:
    donor = validated.folders[validated.config.base_model or validated.config.referenced_models()[0]]
    model_config = dict(donor.config)
    model_config["num_hidden_layers"] = validated.plan.num_layers
    out_dtypes = set(validated.out_dtype.values())
    if len(out_dtypes) == 1:
        dtype_name = DTYPE_CONFIG_NAMES.get(out_dtypes.pop())
        for key in ("torch_dtype", "dtype"):
            if key in model_config or key == "dtype":
                model_config[key] = dtype_name
    write_text_atomic(out_dir / "config.json", json.dumps(model_config, indent=2))
    tokenizer_folder = validated.folders[validated.donor].path
    for file_name in TOKENIZER_FILES:
        if (tokenizer_folder / file_name).exists():
            write_bytes_atomic(out_dir / file_name, (tokenizer_folder / file_name).read_bytes())
    write_text_atomic(out_dir / "mergekit_config.yml", validated.config.to_yaml())
