"""How many rows one gradient or probe pass takes, and which rows it carries (README
"Performance": memory-budgeted passes). Context variables, so attacks, probes and gate
interventions agree on a pass's rows without passing them through every call."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_PASS_ROWS: contextvars.ContextVar[int | None] = contextvars.ContextVar("pass_rows", default=None)


@contextlib.contextmanager
def pass_rows(rows: int | None) -> Iterator[None]:
    """Inside the block, input gradients are taken ``rows`` rows at a time (None: the whole batch).

    Every row's gradient is its own (eval mode: rows never interact), so the results are the same
    up to float rounding while the autograd graph, the memory of a gradient pass, shrinks to
    ``rows`` rows: full-size images at a large batch fit in less memory (README "Performance").
    """
    token = _PASS_ROWS.set(rows)
    try:
        yield
    finally:
        _PASS_ROWS.reset(token)


CPU_PASS_MEMORY = 1 << 29  # bytes a gradient pass may hold by default (README "Performance")


def pass_memory(device: torch.device) -> int:
    """The default memory budget of one gradient pass on ``device``: 512 MiB on a CPU, a quarter of
    a GPU's memory."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory) // 4
    return CPU_PASS_MEMORY


def rows_within(budget: int, bytes_per_row: int) -> int:
    """How many rows one gradient pass may take within ``budget`` bytes (at least 1)."""
    return max(1, budget // max(1, bytes_per_row))


_PASS_SLICE: contextvars.ContextVar[tuple[slice, int] | None] = contextvars.ContextVar("pass_slice", default=None)


@contextlib.contextmanager
def rows_of_pass(rows: slice, total: int) -> Iterator[None]:
    """Inside the block, forward passes carry the rows ``rows`` of a batch of ``total`` rows (under
    :func:`pass_rows`), so per-example values held for the whole batch (the held_gates
    intervention's clean gates) can pick their rows (:func:`rows_for_pass`)."""
    token = _PASS_SLICE.set((rows, total))
    try:
        yield
    finally:
        _PASS_SLICE.reset(token)


def rows_for_pass(value: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of the per-example ``value`` (one row per example of a batch of B) that a pass of
    ``n`` rows carries: all of them outside :func:`rows_of_pass`; ``value`` itself when it was
    taken for the pass's own rows (B = n); several epsilons stacked as one batch (E·B rows,
    eps-major, as :meth:`Attack._ladder` lays them out) carry them once per eps.

    Raises:
        ValueError: the pass is not of the batch ``value`` belongs to, row for row (a row count
            that is not a multiple of B, or a part of such a batch): its rows cannot be matched.
    """
    rows, total = _PASS_SLICE.get() or (slice(0, n), n)
    b = len(value)
    if total == b:  # the held batch, or a part of it
        picked = value[rows]
    elif b == n:  # taken for this pass's own rows (clean_gates records s(x) per part)
        picked = value
    elif b and total % b == 0:  # E copies of the batch, or a part of them
        picked = value[torch.arange(total, device=value.device)[rows] % b]
    else:
        picked = value[:0]
    if len(picked) != n:
        raise ValueError(
            f"a pass of {n} rows inside a per-example intervention held for {b} rows: "
            "every pass must carry the held batch, row for row"
        )
    return picked


def current_pass_rows() -> int | None:
    """The rows per pass set by the innermost :func:`pass_rows` (None: the whole batch)."""
    return _PASS_ROWS.get()
