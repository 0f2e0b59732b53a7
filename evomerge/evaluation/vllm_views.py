"""The resident model's parameters made views of the vLLM engine's own blocks: a merge in place lands in the engine.

Where an engine takes candidates by direct write (`vllm_weights.direct_writer` approved its
layout) and its model lives in this process, every resident parameter that fills exactly one block
of an engine parameter (its q rows of `qkv_proj`, its gate rows of `gate_up_proj`, a whole plain
parameter; a tied `lm_head` with its embedding) is rebound to that block, `parameter.data = block`.
The merge then writes the engine's weights itself, and the direct writer finds each such tensor
already in place (`vllm_weights.same_memory`) and copies nothing; the resident model's own copy of
those weights is freed.

A tensor keeps its copy, with the reason recorded, when:

* its block is not one contiguous piece, or the engine holds it in another dtype or on another device;
* it fills several blocks, or none (a tensor vLLM does not load);
* it is a view into a larger buffer that someone else writes: the fused merger's parameters are
  views of its flat output buffer, which its kernel fills; rebound, they would no longer see the
  kernel's output. A view an engine made (`ENGINE_VIEW` on the parameter records its address) is
  not such a buffer: a fresh engine rebinds it.

Nothing else needs telling: the reference merger (`resident.write_merge`) and the worker's checks
look the model's tensors up by name for every candidate, and a writer that rebinds a parameter
later (the fused merger adopting the model) only turns that tensor back into a copy, as the
direct writer checks every tensor's address for every candidate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from evomerge.evaluation.vllm_weights import WeightMap

# Attribute set on a rebound resident parameter: the address of the engine block it views.
ENGINE_VIEW = "evomerge_engine_view"


@dataclass
class ViewBinding:
    """Which resident tensors are views of the engine's blocks, and why the others keep a copy."""

    views: dict[str, torch.Tensor] = field(default_factory=dict)  # resident name -> the engine block it views
    copies: dict[str, str] = field(default_factory=dict)  # resident name -> why it stays a copy

    def describe(self) -> str:
        if not self.copies:
            return f"all {len(self.views)} of the resident model's tensors are views of the engine's blocks (no copy)"
        reasons = sorted(set(self.copies.values()))
        return (
            f"{len(self.views)} of the resident model's tensors are views of the engine's blocks, "
            f"{len(self.copies)} are copied ({'; '.join(reasons)})"
        )


def bind_views(resident: torch.nn.Module, engine_model: torch.nn.Module, weight_map: WeightMap) -> ViewBinding:
    """Rebind each resident parameter that can be one to a view of its engine block; the rest keep copies."""
    engine_parameters = dict(engine_model.named_parameters())
    binding = ViewBinding()
    with torch.no_grad():
        for members in _shared_storage_groups(resident).values():
            names = [name for name, _ in members]
            slots = {slot for name in names for slot in weight_map.get(name, ())}
            if not slots:
                continue  # nothing of it reaches the engine: no copy either
            block, reason = _view_target(members[0][1], slots, engine_parameters)
            if block is None:
                binding.copies.update(dict.fromkeys(names, reason))
                continue
            for name, parameter in members:
                parameter.data = block
                setattr(parameter, ENGINE_VIEW, block.data_ptr())
                binding.views[name] = block
    return binding


def _shared_storage_groups(resident: torch.nn.Module) -> dict[tuple, list[tuple[str, torch.nn.Parameter]]]:
    """The resident parameters by the memory they hold: tied ones (an embedding and its head) together."""
    groups: dict[tuple, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, parameter in resident.named_parameters(remove_duplicate=False):
        key = (parameter.device, parameter.data_ptr(), tuple(parameter.shape), tuple(parameter.stride()))
        groups.setdefault(key, []).append((name, parameter))
    return groups


def _view_target(
    parameter: torch.nn.Parameter, slots: set, engine_parameters: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor | None, str]:
    """The engine block `parameter` can become (shaped as it is), or None and why not."""
    if len(slots) > 1:
        return None, "a tensor that fills several blocks of the engine"
    if not _owns_its_memory(parameter):
        return None, "a view into a larger buffer its writer fills (the fused merger's flat output)"
    (slot,) = slots
    block = engine_parameters[slot.parameter].data[slot.index]
    if not block.is_contiguous():
        return None, "a block of the engine that is not contiguous"
    if (block.dtype, block.device) != (parameter.dtype, parameter.device):
        return None, f"a tensor the engine holds as {block.dtype} on {block.device}"
    return block.view(parameter.shape), ""


def _owns_its_memory(parameter: torch.nn.Parameter) -> bool:
    """Whether the parameter is all of its storage, or a view an engine made of its own block."""
    if getattr(parameter, ENGINE_VIEW, None) == parameter.data_ptr():
        return True
    whole = parameter.numel() * parameter.element_size()
    return (
        parameter.is_contiguous() and parameter.storage_offset() == 0 and parameter.untyped_storage().nbytes() == whole
    )
