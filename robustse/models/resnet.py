"""CIFAR-style ResNet twins ``resnet20``/``se_resnet20``.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition" (CVPR 2016), §4.2: a 3x3
stem, three stages of n basic blocks at widths 16/32/64 (stride 2 entering stages 2 and 3),
global average pooling, linear head; depth 6n + 2. Shortcuts that change shape use a 1x1
convolution with batch norm (option B). The SE twin places an SE block on the residual branch
before the addition with the shortcut, as in SE-ResNet (Hu et al. 2018, Fig. 3); the static
control ``static_resnet20`` puts a learned input-independent channel scale there instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from robustse.models.layers import Block, Classifier, ConvBNReLU, init_weights, make_normalize, make_site
from robustse.models.registry import register_twins


class BasicBlock(Block):
    """conv-BN-ReLU-conv-BN → SE site (SE, static scale or identity) → + shortcut → ReLU."""

    def __init__(self, cin: int, cout: int, *, stride: int, stage: int, se: dict[str, Any] | None) -> None:
        super().__init__()
        self.stage = stage
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = make_site(cout, se)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))  # gate the residual branch, before the add
        return self.relu2(out + self.shortcut(x))


def cifar_resnet(
    *,
    depth: int,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    se: dict[str, Any] | None,
) -> Classifier:
    """CIFAR ResNet of depth 6n + 2; ``se=None`` builds the plain twin."""
    n = (depth - 2) // 6
    blocks, cin = [], 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(cin, width, stride=stride, stage=stage, se=se))
            cin = width
    model = Classifier(
        make_normalize(in_channels, mean, std), ConvBNReLU(in_channels, 16), nn.Sequential(*blocks), cin, num_classes
    )
    init_weights(model)
    return model


def _resnet20(**kw: Any) -> Classifier:
    return cifar_resnet(depth=20, **kw)


register_twins(
    "resnet20",
    _resnet20,
    description="CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64)",
    se_description="SE-ResNet-20: SE on every residual branch",
)
