"""Which merges the fused kernel can run: the methods with a fused trim, on CUDA with Triton installed.

`NotFusable` is how any step of the fused path says "take the reference path instead".
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from evomerge.merge.registry import METHODS, MethodInfo

__all__ = ["NotFusable", "fused_methods", "fused_unavailable_reason"]


class NotFusable(Exception):
    """This merge or candidate cannot take the fused path; the caller uses the reference path."""


def fused_unavailable_reason(device: str, method: MethodInfo, interpreter_ok: bool = False) -> str | None:
    """None when the fused kernel can run `method` on `device`, else why not.

    `interpreter_ok` lets tests run it on CPU under TRITON_INTERPRET=1 (set before triton is
    imported); a worker never picks that path, it is far slower than the reference path.
    """
    if not method.fused:
        return f"method {method.name} has no fused kernel"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.startswith("cuda"):
        return None if torch.cuda.is_available() else "CUDA is not available"
    if interpreter_ok and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "the fused kernel needs CUDA (or TRITON_INTERPRET=1, Triton's CPU interpreter)"


def fused_methods(method_names: str | Sequence[str]) -> list[MethodInfo]:
    """The methods of a search's list that the fused kernel runs, in list order; NotFusable if none."""
    names = [method_names] if isinstance(method_names, str) else list(method_names)
    found = [METHODS[name] for name in names if METHODS[name].fused]
    if not found:
        raise NotFusable(f"no method of {', '.join(names)} has a fused kernel")
    return found
