"""Length-sorted batches sized by a token budget: pure index arithmetic, no model, no torch.

Sorting by length keeps padding small, and a token budget (rows x padded length) keeps every
batch near the same size in memory whatever the lengths, where a fixed row count would either
waste short batches or overflow on long ones. The batches depend only on the lengths, never on
timing or weights, so a worker forms the same batches for every candidate and the same weights
always get the same scores.
"""

from __future__ import annotations

from collections.abc import Sequence


def token_budget_batches(lengths: Sequence[int], token_budget: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices into `lengths`, longest first, grouped so each batch's rows x longest length <= budget.

    A row longer than the budget gets a batch of its own. Ties keep index order, so the result is a
    function of `lengths` alone.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        # Longest first: the first row of a batch sets its padded width.
        width = max(1, lengths[order[start]])
        rows = max(1, token_budget // width)
        if max_rows is not None:
            rows = min(rows, max_rows)
        batches.append(order[start : start + rows])
        start += rows
    return batches
