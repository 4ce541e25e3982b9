"""Moving models' weights into channels_last memory layout and back, in place (a sweep's
``channels_last`` option: the same function up to float rounding, README "Performance")."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def to_channels_last(models: Iterable[nn.Module]) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """Convert the models' 4-d parameters and buffers to channels_last; (tensor, original strides).

    Converts as ``Module.to(memory_format=torch.channels_last)`` does, ambiguous shapes included
    (a (16, 1, 5, 5) weight counts as contiguous in both layouts, yet its strides steer the kernels).
    Pass each model once: models sharing weights would record converted strides as their own.
    """
    converted = []
    for model in models:
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == 4:
                converted.append((t, t.stride()))
                t.data = t.data.to(memory_format=torch.channels_last)
    return converted


def restore_strides(converted: list[tuple[torch.Tensor, tuple[int, ...]]]) -> None:
    """Put converted tensors back in their own strides, on whatever device they are now."""
    for t, stride in converted:
        t.data = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t.data)
