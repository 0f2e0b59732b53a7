"""Where each kernel launch reads its record: in place, or streamed from host memory.

Sources on the device are one record, read where it lies. Host sources are one record per chunk;
each is copied into one of two device staging buffers with one contiguous copy on a side stream,
so chunk i+1's copy runs while chunk i's kernel does. Two CUDA events per buffer order it: `ready`
(the copy landed, the kernel may read) and `free` (the last kernel reading it finished, the next
copy may overwrite). On CPU (tests) the copy is a plain one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from evomerge.merge.fused.layout import Record


@dataclass
class Stage:
    """What a launch reads: one record, in the storage itself or copied to the device."""

    buffer: torch.Tensor  # [base | delta 0 | ...] of one record, `elements` each
    elements: int
    experts: int
    ready: torch.cuda.Event | None = None
    free: torch.cuda.Event | None = None

    @property
    def base(self) -> torch.Tensor:
        return self.buffer[: self.elements]

    @property
    def deltas(self) -> torch.Tensor:
        return self.buffer[self.elements : (1 + self.experts) * self.elements].view(self.experts, self.elements)


class Stager:
    """Hands out each record's stage in order, copying host records in ahead of their launch."""

    def __init__(
        self, storage: torch.Tensor, records: list[Record], experts: int, device: torch.device, streamed: bool
    ):
        self.storage = storage
        self.records = records
        self.experts = experts
        self.device = device
        self.streamed = streamed
        self._buffers: list[Stage] = []
        self._copy_stream: torch.cuda.Stream | None = None
        if streamed:
            widest = max(record.elements for record in records)
            self._buffers = [self._buffer(widest) for _ in range(2)]
            if device.type == "cuda":
                self._copy_stream = torch.cuda.Stream(device)

    def _buffer(self, elements: int) -> Stage:
        buffer = torch.empty((1 + self.experts) * elements, dtype=self.storage.dtype, device=self.device)
        stage = Stage(buffer, elements, self.experts)
        if self.device.type == "cuda":
            stage.ready, stage.free = torch.cuda.Event(), torch.cuda.Event()
        return stage

    def stages(self) -> Iterator[Stage]:
        """One stage per record, in order; call `release` once its launches are queued."""
        if not self.streamed:
            yield Stage(self.storage, self.records[0].elements, self.experts)
            return
        for index, record in enumerate(self.records):
            yield self._copy_in(self._buffers[index % 2], record)

    def _copy_in(self, stage: Stage, record: Record) -> Stage:
        size = (1 + self.experts) * record.elements
        view = Stage(stage.buffer[:size], record.elements, self.experts, stage.ready, stage.free)
        source = self.storage[record.offset : record.offset + size]
        stream = self._copy_stream
        if stream is None or stage.ready is None or stage.free is None:
            view.buffer.copy_(source)
            return view
        stream.wait_event(stage.free)
        with torch.cuda.stream(stream):
            view.buffer.copy_(source, non_blocking=True)
            stage.ready.record(stream)
        torch.cuda.current_stream(self.device).wait_event(stage.ready)
        return view

    def release(self, stage: Stage) -> None:
        if stage.free is not None:
            stage.free.record(torch.cuda.current_stream(self.device))
