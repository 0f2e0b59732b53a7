"""Where every tensor of the fused sources lives: flat segments, and the records that hold them.

The output tensors are laid end to end ("segments", each padded to whole kernel blocks) in one
flat index space, the layout of the model's flat output buffer. The sources (base and one delta
per expert) are stored as records: a record covers a run of whole segments ("chunk") and holds
them as [base | delta 0 | delta 1 | ...], each part as long as the chunk. Sources on the device
are one record covering every segment; host sources are one record per chunk, so streaming a
chunk to the GPU is one contiguous copy (a strided copy from pinned memory would go through a
pageable staging copy, at a fraction of the link's speed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from evomerge.merge.validate import ValidatedMerge

BLOCK = 1024


@dataclass(frozen=True)
class FlatLayout:
    """Where each output tensor lives in the flat buffers: segments padded to whole blocks."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    starts: np.ndarray
    numels: np.ndarray
    total: int

    @classmethod
    def of(cls, names: list[str], shapes: list[tuple[int, ...]]) -> FlatLayout:
        numels = np.array([int(np.prod(shape, dtype=np.int64)) for shape in shapes], dtype=np.int64)
        padded = -(-numels // BLOCK) * BLOCK
        starts = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
        return cls(tuple(names), tuple(tuple(s) for s in shapes), starts, numels, int(padded.sum()))

    def view(self, flat: torch.Tensor, segment: int) -> torch.Tensor:
        start = int(self.starts[segment])
        return flat[..., start : start + int(self.numels[segment])].view(*flat.shape[:-1], *self.shapes[segment])

    def end(self, segment: int) -> int:
        """One past the segment's last padded element."""
        return int(self.starts[segment] + -(-self.numels[segment] // BLOCK) * BLOCK)

    def block_segments(self, first: int, last: int) -> np.ndarray:
        """Segment index of every block of segments first..last-1."""
        blocks = -(-self.numels[first:last] // BLOCK)
        return np.repeat(np.arange(first, last, dtype=np.int32), blocks)

    def chunks(self, max_elements: int) -> list[tuple[int, int]]:
        """Runs of whole segments of at most max_elements each (or one segment, if bigger)."""
        runs, first = [], 0
        ends = self.starts + -(-self.numels // BLOCK) * BLOCK
        for segment in range(1, len(self.names) + 1):
            if segment == len(self.names) or ends[segment] - self.starts[first] > max_elements:
                runs.append((first, segment))
                first = segment
        return runs


@dataclass(frozen=True)
class Record:
    """One chunk's sources in the storage: [base | delta 0 | ... | delta E-1], each `elements` long."""

    first: int  # segments first..last-1
    last: int
    origin: int  # flat index of the chunk's first element
    elements: int  # padded elements of the chunk
    offset: int  # where the record starts in the storage

    def part(self, index: int) -> int:
        """Storage offset of part `index` (0 the base, 1 + e delta e)."""
        return self.offset + index * self.elements


def records(layout: FlatLayout, runs: list[tuple[int, int]], experts: int) -> list[Record]:
    """Records for the given runs of segments, packed one after another."""
    found, offset = [], 0
    for first, last in runs:
        origin = int(layout.starts[first])
        elements = layout.end(last - 1) - origin
        found.append(Record(first, last, origin, elements, offset))
        offset += (1 + experts) * elements
    return found


@dataclass
class Chunk:
    """One launch's worth of segments: its record and the block tables the kernel reads."""

    record: Record
    block_segment: torch.Tensor
    block_begins: torch.Tensor  # per segment of the chunk, its first and one-past-last block
    block_ends: torch.Tensor
    block_first: torch.Tensor  # per block, the first block of its segment

    @classmethod
    def of(cls, layout: FlatLayout, record: Record, device: torch.device) -> Chunk:
        blocks = -(-layout.numels[record.first : record.last] // BLOCK)
        ends = np.cumsum(blocks)
        begins = np.concatenate([[0], ends[:-1]])
        return cls(
            record,
            torch.from_numpy(layout.block_segments(record.first, record.last)).to(device),
            torch.from_numpy(begins).to(device),
            torch.from_numpy(ends).to(device),
            torch.from_numpy(np.repeat(begins, blocks).astype(np.int32)).to(device),
        )


def expert_models(validated: ValidatedMerge) -> list[str]:
    """Every model that feeds some tensor other than as its base, in first-use order: the deltas' rows."""
    experts: list[str] = []
    for plan in validated.plan.tensors:
        for index, (model, _) in enumerate(plan.inputs):
            if index != plan.base_index and model not in experts:
                experts.append(model)
    return experts


def segment_refs(plan, experts: list[str]):
    """(base ref, one ref or None per expert) for one output tensor."""
    by_model = {ref[0]: ref for index, ref in enumerate(plan.inputs) if index != plan.base_index}
    return plan.inputs[plan.base_index], [by_model.get(model) for model in experts]
