"""The random seeds lm-eval's simple_evaluate sets, applied around one scoring call and then undone.

Both backends seed the same way, so the few-shot examples, and any metric that draws random
numbers, are those a plain lm-eval run would get.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

PYTHON_SEED = 0
NUMPY_SEED = 1234
TORCH_SEED = 1234
FEWSHOT_SEED = 1234


@contextmanager
def seeded_global_rngs(device: torch.device) -> Iterator[None]:
    """Seed Python, NumPy and torch as simple_evaluate does, then restore their states.

    Restoring matters when an optimizer shares the process: cma draws from NumPy's
    global RNG, and reseeding it every call would repeat its samples.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            random.seed(PYTHON_SEED)
            np.random.seed(NUMPY_SEED)
            torch.manual_seed(TORCH_SEED)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
