"""Probes on channel gates: discovery of the excitation gates inside a model.

A *gate* is the module whose output is the excitation vector ``s`` of an SE-style block:
``<block>.se.gate`` in robustse's own :class:`~robustse.models.SEBlock`, and
``scale_activation`` in ``torchvision.ops.SqueezeExcitation`` (RegNetY, EfficientNet,
MobileNetV3). A model with no gates is a valid plain model.
"""

from __future__ import annotations

from torch import nn

from .models.layers import SEBlock


def _gate_of(module: nn.Module) -> tuple[str, nn.Module] | None:
    """(attribute name, gate module) if ``module`` is a known SE-style block, else None."""
    if isinstance(module, SEBlock):
        return "gate", module.gate
    try:
        from torchvision.ops import SqueezeExcitation
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    if isinstance(module, SqueezeExcitation):
        return "scale_activation", module.scale_activation
    return None


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
    gates: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        found = _gate_of(module)
        if found is not None:
            attr, gate = found
            gates[f"{name}.{attr}" if name else attr] = gate
    return gates
