"""What every attack call checks before it runs, and the documented limits (README "Reliability"):
one line naming the problem instead of an error from deep inside a pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from robustse.core.errors import AttackError
from robustse.core.types import MAX_RUNGS

# Documented limits (README "Reliability"): beyond them a command is refused, not left to run for days.
MAX_STEPS = 10_000  # iterations of an iterative attack (also torchattacks' steps / n_queries: 100,000)
MAX_RESTARTS = 100
MAX_QUERIES = 100_000
MAX_PIXEL_UNITS = 1e6  # an eps or step size beyond this is no budget at all (and overflows float32)


def check_members(attack: Any, x: torch.Tensor, eps: tuple[float, ...], *, members: int, accuracy_only: bool) -> None:
    """Refuse a stacked-model call the attack cannot make the way K separate calls would.

    Raises:
        AttackError: naming the reason.
    """
    if not is_int(members) or members < 1 or x.shape[0] % members:
        raise AttackError(f"{x.shape[0]} rows cannot hold {members!r} members' batches")
    if members > 1 and (accuracy_only or not attack.tiles_draws()):
        raise AttackError(f"{attack.name} cannot attack a stacked model (members > 1)")
    if members > 1 and sum(e > 0 for e in eps) > 1:  # draws must follow a lone member's order
        raise AttackError("a stacked model is attacked one eps at a time")


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """Refuse what an attack cannot use, with one line: non-tensors, an empty batch, inputs that
    are not finite or outside [0, 1], labels that are not integers or not one per input.

    Raises:
        AttackError: naming the problem.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise AttackError(f"x and y must be tensors (got {type(x).__name__}, {type(y).__name__})")
    if x.dim() < 2 or x.shape[0] == 0:
        raise AttackError(f"x must be a non-empty batch (B, ...) (got shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise AttackError(f"x must be floats in [0, 1] (got {x.dtype}; divide uint8 images by 255)")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise AttackError(f"labels must be integers (got {y.dtype})")
    if y.shape != (x.shape[0],):
        raise AttackError(f"{x.shape[0]} inputs but labels of shape {tuple(y.shape)}: one label per input")
    if not bool(torch.isfinite(x).all()):
        raise AttackError("inputs hold NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise AttackError(f"inputs must lie in [0, 1] (got [{float(x.min()):.3g}, {float(x.max()):.3g}])")
    if y.min() < 0:
        raise AttackError(f"labels must be >= 0 (got {int(y.min())})")


def check_fits(model: nn.Module, x: torch.Tensor, *, members: int = 1) -> None:
    """Refuse inputs the model cannot take, with one line instead of torch's error from deep inside
    a pass: a dtype other than the model's weights' (no silent conversion: a bfloat16 model gets
    bfloat16 inputs, a float32 model float32), or a channel count other than its first convolution's
    (``members`` stacked seed models take ``members`` times the channels: README "Seed batching").

    Raises:
        AttackError: naming both sides of the mismatch.
    """
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is not None and weight.dtype != x.dtype:
        raise AttackError(
            f"inputs are {x.dtype} but the model's weights are {weight.dtype}: pass x.to({weight.dtype}) "
            "(or convert the model)"
        )
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and x.dim() == 4 and x.shape[1] * members != conv.in_channels:
        raise AttackError(
            f"inputs have {x.shape[1]} channel(s) but the model takes {conv.in_channels // max(members, 1)}"
        )


def check_epsilons(epsilons: Sequence[float], norm: str) -> tuple[float, ...]:
    """Validate an epsilon ladder (pixel units).

    Raises:
        AttackError: empty ladder, a negative or non-finite eps, or a Linf eps above 1.
    """
    if isinstance(epsilons, (str, bytes)) or not isinstance(epsilons, (Sequence, torch.Tensor)):
        raise AttackError(f"epsilons must be a list of numbers, e.g. [0.03] (got {epsilons!r})")
    try:
        eps = tuple(float(e) for e in epsilons)
    except (TypeError, ValueError):
        raise AttackError(f"epsilons must be a list of numbers (got {list(epsilons)!r})") from None
    if not eps:
        raise AttackError("no epsilons given")
    if len(eps) > MAX_RUNGS:
        raise AttackError(f"a ladder of {len(eps):,} epsilons is over the limit of {MAX_RUNGS:,}")
    for e in eps:
        if not 0 <= e <= MAX_PIXEL_UNITS:
            raise AttackError(f"eps must be a number in [0, {MAX_PIXEL_UNITS:g}] (got {e})")
        if norm == "linf" and e > 1:
            raise AttackError(f"Linf eps {e} > 1 is larger than the whole pixel range [0, 1]")
    return eps


def is_int(v: object) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
