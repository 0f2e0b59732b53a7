"""The passes the fused merge runs over a chunk before its main kernel, when a candidate needs them.

Each reduces one number per block and input with a kernel, then combines those per tensor on the
device, so nothing per element is stored:

* `tied_before`: where a TIES cut splits a run of equal magnitudes, how many elements equal to
  the threshold lie in earlier blocks of each block's tensor; the main kernel adds those before an
  element in its own block and keeps the first m (flat-index order);
* `kept_l1` and `rescale_ratios`: DARE's L1 norm of what its mask keeps, per tensor, summed in
  float64 in block order (deterministic), and the rescale factor `methods.l1_rescaled` applies.
"""

from __future__ import annotations

import torch

from evomerge.merge.fused.layout import BLOCK, Chunk
from evomerge.merge.fused.streaming import Stage
from evomerge.merge.fused.tables import PARAM_FIELDS

# The kernels import triton, which must not be imported before TRITON_INTERPRET is settled.


def _experts(packed: torch.Tensor) -> int:
    """Inputs in a packed parameter table: PARAM_FIELDS per expert, then lambda and normalize."""
    return (packed.shape[1] - 2) // PARAM_FIELDS


def tied_before(
    chunk: Chunk, stage: Stage, packed: torch.Tensor, segment_start: torch.Tensor, segment_numel: torch.Tensor
) -> torch.Tensor:
    """(experts, blocks) int32: elements tied with each input's threshold in earlier blocks of the tensor."""
    from evomerge.merge.fused import kernels

    blocks = chunk.block_segment.numel()
    counts = torch.empty((_experts(packed), blocks), dtype=torch.int32, device=packed.device)
    kernels.tied_count_kernel[(blocks,)](
        stage.deltas,
        packed,
        counts,
        chunk.block_segment,
        segment_start,
        segment_numel,
        chunk.record.origin,
        stage.elements,
        M=counts.shape[0],
        P=packed.shape[1],
        BLOCK=BLOCK,
    )
    # One expert at a time bounds the int64 scan to 16 bytes per block (memory_plan.table_bytes).
    for row in counts:
        running = row.cumsum(0)
        running -= row  # exclusive: ties in earlier blocks of the chunk
        running -= running[chunk.block_first]
        row.copy_(running)
    return counts


def kept_l1(
    chunk: Chunk, stage: Stage, packed: torch.Tensor, segment_start: torch.Tensor, segment_numel: torch.Tensor
) -> torch.Tensor:
    """(segments of the chunk, experts) float64: the L1 norm of each input's delta that DARE keeps."""
    from evomerge.merge.fused import kernels

    blocks = chunk.block_segment.numel()
    partial = torch.empty((_experts(packed), blocks), dtype=torch.float32, device=packed.device)
    kernels.kept_magnitude_kernel[(blocks,)](
        stage.deltas,
        packed,
        partial,
        chunk.block_segment,
        segment_start,
        segment_numel,
        chunk.record.origin,
        stage.elements,
        M=partial.shape[0],
        P=packed.shape[1],
        BLOCK=BLOCK,
        enable_fp_fusion=False,
    )
    running = torch.nn.functional.pad(partial.double().cumsum(dim=1), (1, 0))
    return (running[:, chunk.block_ends] - running[:, chunk.block_begins]).T


def rescale_ratios(before: torch.Tensor, after: torch.Tensor, unscaled: torch.Tensor) -> torch.Tensor:
    """before / after where rescaled and both norms are above `l1_rescaled`'s epsilon, else 1 (float32)."""
    keep = unscaled | (before < 1e-7) | (after < 1e-7)
    return torch.where(keep, torch.ones_like(before), before / after).float()
