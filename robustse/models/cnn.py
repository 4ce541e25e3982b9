"""VGG-style twin families: ``cnn``/``se_cnn`` and the fast ``small_cnn``/``se_small_cnn``
(each with its ``static_`` control).

Each stage is ``convs`` × (3x3 conv, BN, ReLU), then an SE site (an SE block in the SE twin, a
static channel scale in the static control, identity in the plain twin), then 2x2 max pooling.
``cnn`` pools after all but its last stage and ends in global average pooling; ``small_cnn``
pools after both of its stages and averages to a 4x4 grid before the linear head, which
converges in two or three epochs (Simonyan & Zisserman 2015 for the conv stacks; Hu et al.
2018 for SE).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from robustse.models.layers import Block, Classifier, ConvBNReLU, MaxPool2d, init_weights, make_normalize, make_site
from robustse.models.registry import register_twins


class VGGStage(Block):
    """convs × ConvBNReLU → SE site (SE, static scale or identity) → max pool (or identity)."""

    def __init__(self, cin: int, cout: int, *, convs: int, pool: bool, se: dict[str, Any] | None) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[ConvBNReLU(cin if i == 0 else cout, cout) for i in range(convs)])
        self.se = make_site(cout, se)
        self.pool = MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x):
        return self.pool(self.se(self.convs(x)))


def vgg(
    *,
    widths: Sequence[int],
    convs: int,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    se: dict[str, Any] | None,
    pool_last: bool = False,
    pool_size: int = 1,
) -> Classifier:
    """A VGG-style classifier; ``se=None`` builds the plain twin."""
    stages, cin = [], in_channels
    for i, width in enumerate(widths):
        stages.append(VGGStage(cin, width, convs=convs, pool=pool_last or i < len(widths) - 1, se=se))
        cin = width
    model = Classifier(
        make_normalize(in_channels, mean, std),
        nn.Identity(),
        nn.Sequential(*stages),
        cin,
        num_classes,
        pool_size=pool_size,
    )
    init_weights(model)
    return model


def _cnn(**kw: Any) -> Classifier:
    return vgg(widths=(32, 64, 128), convs=2, **kw)


def _small_cnn(**kw: Any) -> Classifier:
    return vgg(widths=(16, 32), convs=1, pool_last=True, pool_size=4, **kw)


register_twins(
    "cnn",
    _cnn,
    description="VGG-style, 3 stages x 2 convs (32/64/128)",
    se_description="cnn with an SE block closing each stage",
)
register_twins(
    "small_cnn",
    _small_cnn,
    description="fast VGG-style, 2 stages x 1 conv (16/32), 4x4 pooled head",
    se_description="small_cnn with an SE block closing each stage",
    reduction=4,
)
