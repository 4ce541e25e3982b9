"""External classifiers: any torchvision or timm model by name, wrapped so pixels stay in [0, 1].

``torchvision:<name>`` builds ``torchvision.models.get_model(name, weights=None,
num_classes=...)`` and ``timm:<name>`` builds ``timm.create_model(name, pretrained=False,
num_classes=...)`` (the ``timm`` extra). Weights come from the user's checkpoint, never from the
internet. The network sits behind a :class:`~robustse.models.layers.Normalize` layer; a grey
input is repeated to the 3 channels these models expect. Each wrapper carries its
:class:`Preprocess` (input size, crop fraction, interpolation: timm's pretrained config, or
ImageNet's usual 224/0.875/bilinear for torchvision), which image-folder datasets follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from robustse.core.errors import ModelError
from robustse.models.layers import Normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How a model wants full-size images prepared (README "Datasets": "Image folders").

    Attributes:
        size: (height, width) of the crop the model takes.
        crop_pct: the crop's share of the resized image: the shorter side is resized to
            ``size / crop_pct``, then the centre ``size`` is cut out.
        interpolation: ``bilinear``, ``bicubic`` or ``nearest``.
    """

    size: tuple[int, int] = (224, 224)
    crop_pct: float = 0.875
    interpolation: str = "bilinear"


class ExternalClassifier(nn.Module):
    """Normalize → (grey → RGB) → external network. Outputs logits."""

    def __init__(
        self,
        net: nn.Module,
        *,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        preprocess: Preprocess | None = None,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.in_channels = in_channels
        self.net = net
        self.preprocess = preprocess or Preprocess()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 1, H, W) → (B, 3, H, W)
        return self.net(x)


def create_external_model(name: str, **kwargs: object) -> ExternalClassifier:
    """``torchvision:<name>`` or ``timm:<name>`` → the wrapped model (see the builders below).

    Raises:
        ModelError: unknown source, name or option.
    """
    source, _, net_name = name.partition(":")
    build = {"torchvision": create_torchvision_model, "timm": create_timm_model}[source]
    allowed = ("num_classes", "in_channels", "mean", "std")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ModelError(f"{name}: unknown option {unknown[0]!r} (valid: {', '.join(allowed)})")
    return build(net_name, **kwargs)  # type: ignore[arg-type]


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

    _refuse_unknown("torchvision classifier", name, tvm.list_models(module=tvm))
    _check_channels(f"torchvision:{name}", in_channels)
    net = tvm.get_model(name, weights=None, num_classes=num_classes)
    mean, std = mean or _default(IMAGENET_MEAN, in_channels), std or _default(IMAGENET_STD, in_channels)
    return _wrap(net, in_channels, mean, std)


def create_timm_model(
    name: str,
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ExternalClassifier:
    """Build timm model ``name`` with random weights (nothing is downloaded); its pretrained
    config gives the normalization and the :class:`Preprocess`.

    Raises:
        ModelError: timm not installed, unknown name (listing close matches) or unsupported
            channel count.
    """
    timm = _import_timm()
    if not timm.is_model(name):  # a pretrained tag (resnet50.a1_in1k) picks that tag's config
        _refuse_unknown("timm model", name, timm.list_models())
    _check_channels(f"timm:{name}", in_channels)
    net = timm.create_model(name, pretrained=False, num_classes=num_classes)
    cfg = timm.data.resolve_data_config({}, model=net)
    preprocess = Preprocess(tuple(cfg["input_size"][1:]), float(cfg["crop_pct"]), str(cfg["interpolation"]))
    mean, std = mean or _default(cfg["mean"], in_channels), std or _default(cfg["std"], in_channels)
    return _wrap(net, in_channels, mean, std, preprocess)


def _import_timm():
    try:
        import timm
        import timm.data
    except ImportError:
        raise ModelError("timm:<name> models need timm: pip install 'robustse[timm]'") from None
    return timm


def _refuse_unknown(what: str, name: str, known: list[str]) -> None:
    """ModelError naming up to five close matches when ``name`` is not in ``known``."""
    if name in known:
        return
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=5)
    hint = f" (did you mean: {', '.join(close)})" if close else ""
    raise ModelError(f"unknown {what} {name!r}{hint}")


def _check_channels(name: str, in_channels: int) -> None:
    if in_channels not in (1, 3):
        raise ModelError(f"{name} takes 1 or 3 input channels (got {in_channels})")


def _default(rgb: Sequence[float], in_channels: int) -> Sequence[float]:
    """The default normalization: the model's RGB values, or 0.5 for a grey input."""
    return tuple(rgb) if in_channels == 3 else (0.5,)


def _wrap(
    net: nn.Module,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    preprocess: Preprocess | None = None,
) -> ExternalClassifier:
    if len(mean) != in_channels or len(std) != in_channels:
        raise ModelError(f"normalization has {len(mean)} channels but the model takes {in_channels}")
    return ExternalClassifier(net, in_channels=in_channels, mean=mean, std=std, preprocess=preprocess)
