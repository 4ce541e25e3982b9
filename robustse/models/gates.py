"""Where the channel gates and blocks of a model are (README "Models": "Channel gates found").

A *gate* is the module whose output is the excitation vector ``s`` of a channel-gating block:
``<block>.se.gate`` in robustse's own :class:`~robustse.models.layers.SEBlock`, ``scale_activation``
in ``torchvision.ops.SqueezeExcitation`` (RegNetY, EfficientNet, MobileNetV3), and, when timm is
installed, the gate of timm's channel gates listed in ``_TIMM_GATES`` (SE in its current and legacy
naming, effective SE, ECA/CECA, CBAM's channel attention, HGNet's ESE). A model with no gates is a
valid plain model. *Sites* are the places an SE block sits (also in the plain twin and the static
control); *blocks* are the depth steps of the amplification profile.
"""

from __future__ import annotations

import functools

from torch import nn

from robustse.models.layers import SEBlock


@functools.cache
def _torchvision_se() -> type | None:
    """torchvision's SE class, imported on first use (importing torchvision costs ~1.6 s of start-up)."""
    try:
        from torchvision.ops import SqueezeExcitation
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    return SqueezeExcitation


def _gate_of(module: nn.Module) -> tuple[str, nn.Module] | None:
    """(attribute name, gate module) if ``module`` is a known SE-style block, else None."""
    if isinstance(module, SEBlock):
        return "gate", module.gate
    tv_se = _torchvision_se()
    if tv_se is not None and isinstance(module, tv_se):
        act = module.scale_activation
        assert isinstance(act, nn.Module)
        return "scale_activation", act
    cls = type(module)
    # timm's channel gates, matched by exact class so timm stays an optional import; each applies
    # its gate module to a squeezed descriptor and scales its (B, C, H, W) input by the output.
    attr = _TIMM_GATES.get((cls.__module__, cls.__name__))
    gate = getattr(module, attr, None) if attr else None
    return (attr, gate) if attr and isinstance(gate, nn.Module) else None


# (module, class) → the attribute holding the gate. Not listed: LightChannelAttn (applies
# F.sigmoid inline, so there is no module to record) and SqueezeExciteCl (channels-last input).
_TIMM_GATES = {
    ("timm.layers.squeeze_excite", "SEModule"): "gate",
    ("timm.layers.squeeze_excite", "EffectiveSEModule"): "gate",
    ("timm.models._efficientnet_blocks", "SqueezeExcite"): "gate",
    ("timm.models.senet", "SEModule"): "sigmoid",  # the legacy SENet ports (legacy_seresnet*, legacy_senet154)
    ("timm.layers.eca", "EcaModule"): "gate",
    ("timm.layers.eca", "CecaModule"): "gate",
    ("timm.layers.cbam", "ChannelAttn"): "gate",
    ("timm.models.hgnet", "EseModule"): "sigmoid",
}


def _se_modules(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """``{gate name: (SE module, gate module)}`` in forward order (one walk over the model)."""
    found: dict[str, tuple[nn.Module, nn.Module]] = {}
    for name, module in model.named_modules():
        hit = _gate_of(module)
        if hit is not None:
            attr, gate = hit
            found[f"{name}.{attr}" if name else attr] = (module, gate)
    return found


def _gateless_sites(model: nn.Module) -> dict[str, nn.Module]:
    """robustse's SE sites without a gate: the plain twin's :class:`~robustse.models.layers.EmptySite`
    and the static control's :class:`~robustse.models.layers.StaticGate`, by module name."""
    from robustse.models.layers import EmptySite, StaticGate

    return {n: m for n, m in model.named_modules() if isinstance(m, (EmptySite, StaticGate))}


def site_of(gate_name: str) -> str:
    """The site of a gate: the name of the gating block that holds it (``blocks.0.se.gate`` → ``blocks.0.se``)."""
    return gate_name.rsplit(".", 1)[0] if "." in gate_name else ""


def find_sites(model: nn.Module) -> list[str]:
    """The SE sites of ``model`` in forward order: each gating block's module name, and in
    robustse's plain twins and static controls the module in the SE block's place, so that
    the three members of a family share their site names (``blocks.0.se``, ...). A forward
    hook there sees the SE block's input u (the premise's feature map, README "Metrics")."""
    names = [site_of(g) for g in _se_modules(model)] + list(_gateless_sites(model))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(dict.fromkeys(names), key=lambda n: order.get(n, -1))


def gate_channels(model: nn.Module, name: str) -> int | None:
    """How many channels the gate ``name`` scales (None when its block does not say)."""
    block = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    channels = getattr(block, "channels", None)
    if not isinstance(channels, int):
        fc2 = getattr(block, "fc2", None)
        channels = getattr(fc2, "out_channels", getattr(fc2, "out_features", None))
    return channels if isinstance(channels, int) else None


def find_gates(model: nn.Module) -> dict[str, nn.Module]:
    """All channel gates of ``model``, in forward order.

    Returns:
        ``{qualified gate module name: gate module}``, e.g. ``{"blocks.0.se.gate": Sigmoid()}``;
        empty for a plain model. A forward hook on each yields the excitation vector.

    Example:
        >>> from robustse.models import create_model
        >>> len(find_gates(create_model("se_resnet20"))), len(find_gates(create_model("resnet20")))
        (9, 0)
    """
    return {name: gate for name, (_se, gate) in _se_modules(model).items()}


# --------------------------------------------------------------------------- blocks and capture

# Residual/stage blocks of common torchvision and timm families, for models without robustse's Block marker.
_EXTERNAL_BLOCKS = (
    "BasicBlock",
    "Bottleneck",
    "InvertedResidual",
    "MBConv",
    "FusedMBConv",
    "ResBottleneckBlock",  # torchvision
    "SEResNetBlock",
    "SEBottleneck",
    "SEResNetBottleneck",
    "SEResNeXtBottleneck",  # timm's legacy SENet ports
    "DepthwiseSeparableConv",
    "EdgeResidual",
    "OsaBlock",
    "HighPerfGpuBlock",  # timm EfficientNet, VoVNet, HGNet
)


def find_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The blocks whose outputs h_l form the depth profile, in forward order.

    robustse models mark them with :class:`~robustse.models.Block` (VGG stages, residual blocks,
    output taken after the residual add); other models fall back to torchvision's residual block
    classes. Plain and SE twins have the same blocks.
    """
    from robustse.models.layers import Block

    blocks: dict[str, nn.Module] = {n: m for n, m in model.named_modules() if isinstance(m, Block)}
    if not blocks:
        blocks = {n: m for n, m in model.named_modules() if n and type(m).__name__ in _EXTERNAL_BLOCKS}
    return blocks
