"""Which device holds which layers when one worker spans several devices (`workers.gpus_per_worker`).

A model too big for one GPU is cut by layers, the way Hugging Face's `device_map` places them: the
embeddings with the first layers on the first device, the final norm and head with the last
layers on the last device, contiguous runs of layers in between, balanced by bytes. The same cut
decides where each tensor's sources live, so every tensor is merged on the device that holds it.

Devices are plain names ("cuda:0", "cuda:1", ...). Tests pass "cpu" several times to stand in for k
GPUs: the split, the per-device merge and the cross-device forward (accelerate's hooks) then run
exactly as on a GPU node. Headers are enough to plan it (`unit_sizes`), so the memory plan
(`memory_plan.py`) and the worker cut the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from evomerge.merge.io import ModelFolder
from evomerge.merge.plan import LAYER_NAME
from evomerge.merge.validate import ValidatedMerge

EMBED = -1  # the unit before the layers: embeddings
HEAD = 1 << 30  # the unit after them: final norm and head
LAYER_MODULE = re.compile(r"^(.*?\.layers\.\d+)(\.|$)")


def unit_of(tensor: str) -> int:
    """The layer index of a tensor, EMBED for embeddings, HEAD for everything else outside the layers."""
    found = LAYER_NAME.match(tensor)
    if found:
        return int(found.group("index"))
    return EMBED if "embed" in tensor or tensor.startswith(("wte", "wpe")) else HEAD


@dataclass(frozen=True)
class LayerSplit:
    """The cut of one model over `devices`: the device (by position) of each unit: embeddings, layer, head.

    Positions, not names: simulated devices repeat a name ("cpu", "cpu") and must still be told apart.
    """

    devices: tuple[str, ...]
    unit_part: dict[int, int]

    def part_of(self, tensor: str) -> int:
        return self.unit_part.get(unit_of(tensor), 0)

    def device_of(self, tensor: str) -> str:
        return self.devices[self.part_of(tensor)]

    def tensors_on(self, part: int, tensors: Sequence[str]) -> frozenset[str]:
        """The tensors of `tensors` placed on the `part`-th device."""
        return frozenset(name for name in tensors if self.part_of(name) == part)


def unit_sizes(folder: ModelFolder, tensors: Sequence[str] | None = None) -> dict[int, int]:
    """Elements per unit (embeddings, each layer, head) of the given tensors (default: all), from headers."""
    sizes: dict[int, int] = {}
    for name in tensors if tensors is not None else folder.tensors:
        info = folder.tensors[name]
        numel = 1
        for extent in info.shape:
            numel *= extent
        sizes[unit_of(name)] = sizes.get(unit_of(name), 0) + numel
    return sizes


def contiguous_cut(weights: Sequence[int], parts: int) -> list[int]:
    """Part index per item: contiguous runs, the largest run as small as possible, every part used if it can be.

    Among cuts with that largest run, the one nearest equal shares is preferred, so no device is
    left with a small remainder while the others run full.
    """
    if parts <= 1 or not weights:
        return [0] * len(weights)
    parts = min(parts, len(weights))
    low, high = max(weights), sum(weights)
    while low < high:  # the smallest capacity that needs at most `parts` runs
        middle = (low + high) // 2
        if _runs_needed(weights, middle) <= parts:
            high = middle
        else:
            low = middle + 1
    even = _nearest_shares(weights, parts)
    return even if max(_loads(weights, even)) <= low else _fill(weights, low, parts)


def _nearest_shares(weights: Sequence[int], parts: int) -> list[int]:
    """Cut where the running total is nearest to each multiple of total / parts."""
    total, running, part = sum(weights), 0, 0
    cut: list[int] = []
    for index, weight in enumerate(weights):
        remaining_items = len(weights) - index
        boundary = total * (part + 1) / parts
        past = running > 0 and abs(running + weight - boundary) > abs(running - boundary)
        if part < parts - 1 and (past or remaining_items <= parts - 1 - part) and cut and cut[-1] == part:
            part += 1
        cut.append(part)
        running += weight
    return cut


def _loads(weights: Sequence[int], cut: list[int]) -> list[int]:
    loads = [0] * (max(cut) + 1)
    for weight, part in zip(weights, cut, strict=True):
        loads[part] += weight
    return loads


def _runs_needed(weights: Sequence[int], capacity: int) -> int:
    runs, load = 1, 0
    for weight in weights:
        if load + weight > capacity:
            runs, load = runs + 1, 0
        load += weight
    return runs


def _fill(weights: Sequence[int], capacity: int, parts: int) -> list[int]:
    """Greedy runs under `capacity`, cutting early when the remaining items are just enough for the remaining parts."""
    cut: list[int] = []
    part, load = 0, 0
    for index, weight in enumerate(weights):
        remaining_items = len(weights) - index
        must_cut = load > 0 and (load + weight > capacity or remaining_items <= parts - 1 - part)
        if must_cut and part < parts - 1:
            part, load = part + 1, 0
        cut.append(part)
        load += weight
    return cut


def split_layers(folder: ModelFolder, devices: Sequence[str], tensors: Sequence[str] | None = None) -> LayerSplit:
    """Cut the model's units over `devices` in order, balancing elements (bytes scale with them)."""
    sizes = unit_sizes(folder, tensors)
    order = sorted(sizes)
    cut = contiguous_cut([sizes[unit] for unit in order], len(devices))
    return LayerSplit(tuple(devices), dict(zip(order, cut, strict=True)))


def module_device_map(model, split: LayerSplit, tensors: Sequence[str]) -> dict[str, str]:
    """accelerate's device map: each decoder layer whole, every other module that owns tensors by itself.

    Modules whose tensors the split does not name (rotary buffers, a tied head) go to the first device.
    """
    mapping: dict[str, str] = {}
    named = set(tensors)
    for name, module in model.named_modules():
        own = [
            f"{name}.{tensor}" if name else tensor
            for tensor, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        ]
        if not own:
            continue
        layer = LAYER_MODULE.match(name)
        key = layer.group(1) if layer else name
        part = next((split.part_of(t) for t in own if t in named), 0)
        mapping.setdefault(key, split.devices[part])
    return mapping


def dispatch(model, split: LayerSplit, tensors: Sequence[str]):
    """Move the model's layers to their devices, with hooks that carry activations across (HF device_map style)."""
    from accelerate import dispatch_model

    mapping = module_device_map(model, split, tensors)
    # force_hooks: simulated devices ("cpu" k times) take the same hooked path as k GPUs.
    return dispatch_model(model, device_map=mapping, main_device=split.devices[0], force_hooks=True)


def split_for_merge(validated: ValidatedMerge, devices: Sequence[str]) -> LayerSplit:
    """The cut of a merge's output tensors over `devices` (shapes from the base model's headers)."""
    base = validated.config.base_model or validated.config.referenced_models()[0]
    return split_layers(validated.folders[base], devices, [plan.output for plan in validated.plan.tensors])


def place_model(model, validated: ValidatedMerge, devices: Sequence[str]):
    """(model on its device, None), or (model dispatched over `devices` by layers, the split used)."""
    if len(devices) == 1:
        return model.to(devices[0]), None
    split = split_for_merge(validated, devices)
    return dispatch(model, split, [plan.output for plan in validated.plan.tensors]), split
