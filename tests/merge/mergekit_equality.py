"""Tensor-by-tensor comparison of `evomerge merge` with mergekit 0.1.5 on one config, for any model.

`compare_with_mergekit(config_path, work_dir)` merges the config with both tools into work_dir
and returns an `EqualityReport`: per tensor, how many elements differ and how many by more than
one bf16 step of mergekit's value. Tensors are read one at a time, so a real checkpoint compares
in about one tensor's memory beyond the two merges.

mergekit runs in-process through `run_merge`, exactly as `mergekit-yaml --no-write-model-card`
would (conftest.run_mergekit), or as the `mergekit-yaml` command itself with `cli=True`.
Random trims (DARE, DELLA) draw from other RNGs in the two tools, so `fixed_masks=True` replaces
`torch.bernoulli` in both with one deterministic draw (`fixed_draw`): element i is kept when a
fixed low-discrepancy number u_i is below its keep probability. Equal probabilities then give
equal masks, and what is compared is everything but the RNG.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class TensorDifference:
    numel: int
    differing: int  # elements whose bits differ
    beyond_one_step: int  # elements further from mergekit's than one bf16 step of its value
    max_abs: float


@dataclass
class EqualityReport:
    tensors: dict[str, TensorDifference] = field(default_factory=dict)
    only_ours: list[str] = field(default_factory=list)
    only_theirs: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # shape or dtype differs

    @property
    def differing_tensors(self) -> list[str]:
        return [name for name, found in self.tensors.items() if found.differing]

    @property
    def share_within_one_step(self) -> float:
        total = sum(found.numel for found in self.tensors.values())
        beyond = sum(found.beyond_one_step for found in self.tensors.values())
        return 1 - beyond / max(total, 1)

    def summary(self) -> str:
        worst = max(self.tensors.items(), key=lambda item: item[1].max_abs, default=None)
        return (
            f"{len(self.differing_tensors)} of {len(self.tensors)} tensors differ; "
            f"{self.share_within_one_step:.4%} of elements within one bf16 step"
            + (f"; worst {worst[0]}: max |diff| {worst[1].max_abs:.3g}" if worst else "")
            + (
                f"; names only in evomerge {self.only_ours}, only in mergekit {self.only_theirs}"
                if self.only_ours or self.only_theirs
                else ""
            )
            + (f"; shape or dtype differs: {self.mismatched}" if self.mismatched else "")
        )

    def assert_same_names(self) -> None:
        assert not (self.only_ours or self.only_theirs or self.mismatched), self.summary()

    def assert_bit_for_bit(self) -> None:
        self.assert_same_names()
        assert not self.differing_tensors, self.summary()

    def assert_within_one_step(self, share: float = 0.995) -> None:
        self.assert_same_names()
        assert self.share_within_one_step >= share, self.summary()


def one_bf16_step(reference: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |reference| (float64), never below bf16's smallest normal."""
    magnitude = reference.to(torch.bfloat16).abs()
    above = torch.nextafter(magnitude, torch.full_like(magnitude, float("inf")))
    return (above.double() - magnitude.double()).clamp_min(torch.finfo(torch.bfloat16).tiny)


def fixed_draw(probs: torch.Tensor, generator: torch.Generator | None = None, **_) -> torch.Tensor:
    """`torch.bernoulli` with one fixed draw: element i kept when frac((i + 1) * golden ratio) < p_i.

    p_i is first rounded to bf16: mergekit draws bf16 merges with bf16 probabilities (a density
    of 0.37 becomes 0.369140625), evomerge with float32 ones, and the two should still agree.
    """
    index = torch.arange(1, probs.numel() + 1, dtype=torch.float64, device=probs.device)
    uniform = torch.frac(index * GOLDEN).reshape(probs.shape)
    return (uniform < probs.to(torch.bfloat16).double()).to(probs.dtype)


@contextlib.contextmanager
def fixed_masks() -> Iterator[None]:
    """Both tools draw their random trims from `fixed_draw` while this is active."""
    original = torch.bernoulli
    torch.bernoulli = fixed_draw
    try:
        yield
    finally:
        torch.bernoulli = original


def run_mergekit_cli(config_path: Path, out_dir: Path) -> Path:
    """`HF_HUB_OFFLINE=1 mergekit-yaml --no-write-model-card CONFIG OUT`, the command users run."""
    command = Path(sys.executable).with_name("mergekit-yaml")
    finished = subprocess.run(
        [str(command), "--no-write-model-card", str(config_path), str(out_dir)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    return out_dir


def compare_with_mergekit(
    config_path: str | Path,
    work_dir: str | Path,
    *,
    seed: int = 0,
    fixed: bool = False,
    cli: bool = False,
    device: str = "cpu",
) -> EqualityReport:
    """Merge `config_path` with evomerge and mergekit into work_dir/{evomerge,mergekit}; compare them.

    `fixed`: random trims draw `fixed_draw` in both tools (in-process mergekit only).
    """
    from conftest import run_mergekit

    from evomerge.merge.config import load_merge_config
    from evomerge.merge.engine import merge_to_disk

    config_path, work_dir = Path(config_path), Path(work_dir)
    if fixed and cli:
        raise ValueError("fixed masks need mergekit in-process; drop cli=True")
    ours, theirs = work_dir / "evomerge", work_dir / "mergekit"
    with fixed_masks() if fixed else contextlib.nullcontext():
        if cli:
            run_mergekit_cli(config_path, theirs)
        else:
            run_mergekit(config_path, theirs, seed=seed)
        merge_to_disk(load_merge_config(config_path), ours, device=device, seed=seed, progress=False)
    return compare_folders(ours, theirs)


def _tensor_files(folder: Path) -> dict[str, Path]:
    where = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), shard))
    return where


def _read(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so "equal" means bit for bit (-0.0 is not 0.0, NaN is itself)."""
    integer = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(integer).reshape(-1)


def compare_folders(ours_dir: Path, theirs_dir: Path) -> EqualityReport:
    """Compare two checkpoints tensor by tensor (the second is the reference)."""
    ours, theirs = _tensor_files(Path(ours_dir)), _tensor_files(Path(theirs_dir))
    report = EqualityReport(only_ours=sorted(set(ours) - set(theirs)), only_theirs=sorted(set(theirs) - set(ours)))
    for name in sorted(set(ours) & set(theirs)):
        mine, reference = _read(ours[name], name), _read(theirs[name], name)
        if mine.shape != reference.shape or mine.dtype != reference.dtype:
            report.mismatched.append(name)
            continue
        difference = (mine.double() - reference.double()).abs()
        report.tensors[name] = TensorDifference(
            numel=reference.numel(),
            differing=int((_bits(mine) != _bits(reference)).sum()),
            beyond_one_step=int((difference > one_bf16_step(reference)).sum()),
            max_abs=float(difference.max()) if difference.numel() else 0.0,
        )
    return report
