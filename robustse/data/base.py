"""The in-memory dataset: uint8 images (N, C, H, W) and int64 labels, converted to floats in [0, 1]
per batch by the consumer (:func:`to_float`); normalization lives inside the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from robustse.core.errors import DataError

Split = Literal["train", "test"]


@dataclass(frozen=True)
class Dataset:
    """An in-memory split of an image classification dataset.

    Attributes:
        name: registry name.
        split: ``train`` or ``test``.
        x: uint8 images, (N, C, H, W).
        y: int64 labels, (N,).
        classes: class names, index = label.
    """

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise DataError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise DataError(f"{self.name}: {self.x.shape[0]} images but labels of shape {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x.shape[2]), int(self.x.shape[3])

    def subset(self, n: int | None, *, seed: int = 0) -> Dataset:
        """A deterministic random subset of ``n`` examples (original order kept).

        ``None`` or ``n >= len(self)`` returns the whole dataset.

        Raises:
            DataError: if ``n < 1``.
        """
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise DataError(f"{self.name}/{self.split}: subset size must be >= 1 (got {n})")
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=gen)[:n].sort().values
        return Dataset(self.name, self.split, self.x[idx], self.y[idx], self.classes)

    def held_out(self, n: int | None, *, seed: int = 0, size: int = 2000) -> Dataset | None:
        """Up to ``size`` examples that ``subset(n, seed=seed)`` leaves out (original order kept);
        None when that subset is the whole split."""
        if n is None or n >= len(self):
            return None
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=gen)[n : n + size].sort().values
        return Dataset(self.name, self.split, self.x[idx], self.y[idx], self.classes)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and (sample) std of the pixels in [0, 1] (for the model's Normalize
        layer), summed over chunks of 1,024 images so a large set is never converted whole."""
        total = torch.zeros(2, self.in_channels, dtype=torch.float64)  # sums of x and x²
        for i in range(0, len(self), 1024):
            x = self.x[i : i + 1024].to(torch.float64) / 255.0
            total += torch.stack([x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))])
        n = len(self) * self.image_size[0] * self.image_size[1]
        mean = total[0] / n
        std = ((total[1] - n * mean.square()) / max(n - 1, 1)).clamp_min(0).sqrt().clamp_min(1e-6)
        return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [0, 1]."""
    return x.to(torch.float32).div_(255.0)


FORWARD_PIXELS = 1 << 21  # image pixels per forward-only pass: ≈ 41 images at 224², the cap at 28²


def forward_rows(x: torch.Tensor, cap: int) -> int:
    """Images per forward-only pass (prediction, calibration, gate means) over the images ``x``
    (N, C, H, W): ``cap``, fewer for large images, so a pass's activations stay about the same
    size whatever the resolution (about 1 GiB at 224² for a ResNet-50)."""
    return max(1, min(cap, FORWARD_PIXELS // max(1, x.shape[-1] * x.shape[-2])))


def as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [0, 1]; float images as they are."""
    return to_float(x) if x.dtype == torch.uint8 else x
