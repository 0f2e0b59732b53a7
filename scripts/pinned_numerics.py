"""CPU numerics that do not depend on the processor, so the demo reproduces bit for bit on any x86-64.

torch picks its vectorized kernels (AVX2, AVX-512, ...) by what the CPU offers, and MKL picks its
matmul code path the same way; sums then round differently, a few hundred training steps amplify
that, and another machine builds another demo zoo (seen: task arithmetic scored 0.806 held-out on
one 2-core machine and 0.593 on another, same seed). Set before torch loads, these pin one path:

- ATEN_CPU_CAPABILITY=default: ATen's portable kernels instead of the CPU's widest ones;
- MKL_CBWR=COMPATIBLE: MKL's conditional numerical reproducibility, the same results on every
  Intel or compatible processor.

They cost speed (a zoo build takes about twice as long), so only the demo scripts set them; the
search itself never does. Ray workers of a local cluster inherit them from the driver's process.
"""

from __future__ import annotations

import os
import sys

PINNED = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}


def pin() -> None:
    """Pin the numerics for this process and its children; call before anything imports torch."""
    if "torch" in sys.modules:
        raise RuntimeError("pinned_numerics.pin() must run before torch is imported")
    os.environ.update(PINNED)


def is_pinned() -> bool:
    """True when this process computes with the pinned numerics (so its results are portable)."""
    if any(os.environ.get(key) != value for key, value in PINNED.items()):
        return False
    import torch

    return torch.backends.cpu.get_cpu_capability() == "DEFAULT"
