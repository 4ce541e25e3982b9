"""External classifiers: any torchvision model by name, wrapped so pixels stay in [0, 1].

``torchvision:<name>`` builds ``torchvision.models.get_model(name, weights=None,
num_classes=...)`` (weights come from the user's checkpoint, never from the internet) behind a
:class:`~robustse.models.layers.Normalize` layer; a grey input is repeated to the 3 channels
torchvision models expect.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ModelError
from .layers import Normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExternalClassifier(nn.Module):
    """Normalize → (grey → RGB) → external network. Outputs logits."""

    def __init__(self, net: nn.Module, *, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.in_channels = in_channels
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 1, H, W) → (B, 3, H, W)
        return self.net(x)


def create_torchvision_model(
    name: str,
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ExternalClassifier:
    """Build torchvision classifier ``name`` without downloading weights.

    Raises:
        ModelError: unknown name (listing close matches) or unsupported channel count.
    """
    import torchvision.models as tvm

    classifiers = set(tvm.list_models(module=tvm))
    if name not in classifiers:
        import difflib

        close = difflib.get_close_matches(name, sorted(classifiers), n=5)
        hint = f" (did you mean: {', '.join(close)})" if close else ""
        raise ModelError(f"unknown torchvision classifier {name!r}{hint}")
    if in_channels not in (1, 3):
        raise ModelError(f"torchvision:{name} takes 1 or 3 input channels (got {in_channels})")
    net = tvm.get_model(name, weights=None, num_classes=num_classes)
    if mean is None:
        mean = IMAGENET_MEAN if in_channels == 3 else (0.5,)
    if std is None:
        std = IMAGENET_STD if in_channels == 3 else (0.5,)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ModelError(f"normalization has {len(mean)} channels but the model takes {in_channels}")
    return ExternalClassifier(net, in_channels=in_channels, mean=mean, std=std)
