"""Triton kernels for the fused candidate merge: task arithmetic, TIES and DARE in one pass.

Pure per-element math over flat buffers (`sources.py` builds them and drives these kernels). Each
program handles one BLOCK of one tensor ("segment"); tensors are padded to BLOCK multiples so a
block never straddles two. Per-segment, per-input parameters come from one int32 table with float
fields stored as their bits (`PARAM_FIELDS`), so a candidate uploads a single small tensor.

The arithmetic reproduces `methods.task_vector_merge` bit for bit: every step rounds to the working
dtype where torch's eager ops round (compute in float32, round each op's result), with sums taken in
input order. bfloat16 rounding is done with integer ops (round to nearest even) because Triton's
interpreter truncates in `.to(tl.bfloat16)`; the integer form is exact on GPUs too.

Launch with `enable_fp_fusion=False`: a multiply fused into the following add (FMA) rounds once
where torch rounds twice, which would break bit equality in float32.

A magnitude trim keeps exactly k_j elements of input j (`methods.magnitude_mask`, "flat" tie
order): those with |d_j(e)| > t_j, the k_j-th largest magnitude, and the first m_j of those equal to
it in flat-index order. m_j and t_j are per tensor and input; an element's place among the tied
ones is the count of tied elements in earlier blocks of its tensor (`tied_count_kernel`, one
number per block and input, summed per tensor between the two launches) plus those before it in
its block. So a TIES merge reads nothing per element but the base and the deltas.
"""

from __future__ import annotations

import triton
import triton.language as tl

from evomerge.merge.fused import tables as flat_tables

# The parameter table's layout, by the names `tables.ParameterTable` writes it with.
PARAM_FIELDS: tl.constexpr = tl.constexpr(flat_tables.PARAM_FIELDS)
WEIGHT: tl.constexpr = tl.constexpr(flat_tables.WEIGHT)
THRESHOLD: tl.constexpr = tl.constexpr(flat_tables.THRESHOLD)
DENSITY: tl.constexpr = tl.constexpr(flat_tables.DENSITY)
SEED: tl.constexpr = tl.constexpr(flat_tables.SEED)
TIED: tl.constexpr = tl.constexpr(flat_tables.TIED)
LAMBDA: tl.constexpr = tl.constexpr(flat_tables.LAMBDA)
NORMALIZE: tl.constexpr = tl.constexpr(flat_tables.NORMALIZE)


@triton.jit
def _round(x, MODE: tl.constexpr):
    """Round float32 values to the working dtype and back (identity for float32)."""
    if MODE == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif MODE == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _param_float(table, row, field, j, M: tl.constexpr):
    return tl.load(table + row + field * M + j).to(tl.float32, bitcast=True)


@triton.jit
def _load_delta(deltas, j, offs, valid, total):
    row_start = total.to(tl.int64) * j  # past 2**31 elements with three experts at 1.5B
    return tl.load(deltas + row_start + offs, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _kept_delta(
    deltas,
    table,
    tied_before,
    row,
    j,
    offs,
    local,
    valid,
    total,
    M: tl.constexpr,
    SPARSIFY: tl.constexpr,
    EXACT: tl.constexpr,
):
    """Input j's task vector after the trim, in float32 (zero where trimmed).

    EXACT: some tie straddles a cut, so tied elements are counted (`tied_before` per block and input).
    """
    delta = _load_delta(deltas, j, offs, valid, total)
    if SPARSIFY == 1:
        magnitude = tl.abs(delta)
        threshold = _param_float(table, row, THRESHOLD, j, M)
        if EXACT:
            tied = (magnitude == threshold) & valid
            place = tl.load(tied_before + j * tl.num_programs(0) + tl.program_id(0)) + tl.cumsum(tied.to(tl.int32), 0)
            keep = (magnitude > threshold) | (tied & (place <= tl.load(table + row + TIED * M + j)))
        else:
            keep = magnitude >= threshold
        delta = tl.where(keep, delta, 0.0)
    elif SPARSIFY == 2:
        density = _param_float(table, row, DENSITY, j, M)
        seed = tl.load(table + row + SEED * M + j)
        delta = tl.where(tl.rand(seed, local) < density, delta, 0.0)
    return delta


@triton.jit
def _block_position(block_segment, segment_start, segment_numel, origin, BLOCK: tl.constexpr):
    """This program's tensor, element offsets in the buffers and in the tensor, and which are real."""
    segment = tl.load(block_segment + tl.program_id(0))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    local = (offs + origin - tl.load(segment_start + segment)).to(tl.int32)
    return segment, offs, local, local < tl.load(segment_numel + segment)


@triton.jit
def task_vector_merge_kernel(
    base,
    deltas,
    table,
    ratios,
    tied_before,
    out,
    block_segment,
    segment_start,
    segment_numel,
    origin,
    total,
    M: tl.constexpr,
    P: tl.constexpr,
    SPARSIFY: tl.constexpr,
    CONSENSUS: tl.constexpr,
    RESCALE: tl.constexpr,
    WORK: tl.constexpr,
    OUT: tl.constexpr,
    BLOCK: tl.constexpr,
    EXACT: tl.constexpr,
):
    """out = base + lambda * combine(w_j * trim(delta_j)) for one block of one tensor."""
    segment, offs, local, valid = _block_position(block_segment, segment_start, segment_numel, origin, BLOCK)
    row = segment * P
    mixed = tl.zeros([BLOCK], dtype=tl.float32)
    elected_sum = tl.zeros([BLOCK], dtype=tl.float32)
    weight_sum = tl.zeros([BLOCK], dtype=tl.float32)
    # The weighted, trimmed deltas are needed twice with sign consensus (elect, then sum those
    # that agree); recomputing them from the same loads is cheaper than keeping M blocks live.
    for j in tl.static_range(M):
        weighted = _weighted(
            deltas,
            table,
            ratios,
            tied_before,
            row,
            segment,
            j,
            offs,
            local,
            valid,
            total,
            M,
            SPARSIFY,
            RESCALE,
            WORK,
            EXACT,
        )
        elected_sum += weighted
        weight_sum += _param_float(table, row, WEIGHT, j, M)
    if CONSENSUS:
        positive = _round(elected_sum, WORK) >= 0
        weight_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(M):
            weighted = _weighted(
                deltas,
                table,
                ratios,
                tied_before,
                row,
                segment,
                j,
                offs,
                local,
                valid,
                total,
                M,
                SPARSIFY,
                RESCALE,
                WORK,
                EXACT,
            )
            agrees = tl.where(positive, weighted > 0, weighted < 0)
            mixed += tl.where(agrees, weighted, 0.0)
            weight_sum += tl.where(agrees, _param_float(table, row, WEIGHT, j, M), 0.0)
        divisor = _round(weight_sum, WORK)
        divisor = tl.where(divisor == 0, 1.0, divisor)
    else:
        mixed = elected_sum
        divisor = _round(weight_sum, WORK)
        divisor = tl.where(tl.abs(divisor) < 1e-8, 1.0, divisor)
    mixed = _round(mixed, WORK)
    if tl.load(table + row + PARAM_FIELDS * M + NORMALIZE) != 0:
        mixed = _round(tl.math.div_rn(mixed, divisor), WORK)  # '/' may be approximate on GPUs
    mixed = _round(mixed * tl.load(table + row + PARAM_FIELDS * M + LAMBDA).to(tl.float32, bitcast=True), WORK)
    merged = _round(tl.load(base + offs, mask=valid, other=0.0).to(tl.float32) + mixed, WORK)
    merged = _round(merged, OUT)
    tl.store(out + offs, merged.to(out.dtype.element_ty), mask=valid)


@triton.jit
def _weighted(
    deltas,
    table,
    ratios,
    tied_before,
    row,
    segment,
    j,
    offs,
    local,
    valid,
    total,
    M: tl.constexpr,
    SPARSIFY: tl.constexpr,
    RESCALE: tl.constexpr,
    WORK: tl.constexpr,
    EXACT: tl.constexpr,
):
    kept = _kept_delta(deltas, table, tied_before, row, j, offs, local, valid, total, M, SPARSIFY, EXACT)
    if RESCALE:
        kept = _round(kept * tl.load(ratios + segment * M + j), WORK)
    return _round(kept * _param_float(table, row, WEIGHT, j, M), WORK)


@triton.jit
def kept_magnitude_kernel(
    deltas,
    table,
    partial,
    block_segment,
    segment_start,
    segment_numel,
    origin,
    total,
    M: tl.constexpr,
    P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per block and input: the L1 norm of the delta a random (DARE) trim keeps, for its rescale."""
    segment, offs, local, valid = _block_position(block_segment, segment_start, segment_numel, origin, BLOCK)
    row = segment * P
    blocks = tl.num_programs(0)
    for j in tl.static_range(M):
        kept = _kept_delta(deltas, table, partial, row, j, offs, local, valid, total, M, 2, False)
        tl.store(partial + j * blocks + tl.program_id(0), tl.sum(tl.abs(kept), axis=0))


@triton.jit
def tied_count_kernel(
    deltas,
    table,
    counts,
    block_segment,
    segment_start,
    segment_numel,
    origin,
    total,
    M: tl.constexpr,
    P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per block and input: how many elements have |delta| equal to that input's TIES threshold."""
    segment, offs, local, valid = _block_position(block_segment, segment_start, segment_numel, origin, BLOCK)
    row = segment * P
    blocks = tl.num_programs(0)
    for j in tl.static_range(M):
        magnitude = tl.abs(_load_delta(deltas, j, offs, valid, total))
        tied = (magnitude == _param_float(table, row, THRESHOLD, j, M)) & valid
        tl.store(counts + j * blocks + tl.program_id(0), tl.sum(tied.to(tl.int32), axis=0))
