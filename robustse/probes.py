"""Probes on channel gates and blocks: discovery, and capture of excitations during forward passes.

A *gate* is the module whose output is the excitation vector ``s`` of an SE-style block:
``<block>.se.gate`` in robustse's own :class:`~robustse.models.SEBlock`, and
``scale_activation`` in ``torchvision.ops.SqueezeExcitation`` (RegNetY, EfficientNet,
MobileNetV3). A model with no gates is a valid plain model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
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


# --------------------------------------------------------------------------- blocks and capture

# Residual/stage blocks of common torchvision families, for models without robustse's Block marker.
_EXTERNAL_BLOCKS = ("BasicBlock", "Bottleneck", "InvertedResidual", "MBConv", "FusedMBConv", "ResBottleneckBlock")


def find_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The blocks whose outputs h_l form the depth profile, in forward order.

    robustse models mark them with :class:`~robustse.models.Block` (VGG stages, residual blocks,
    output taken after the residual add); other models fall back to torchvision's residual block
    classes. Plain and SE twins have the same blocks.
    """
    from .models.layers import Block

    blocks: dict[str, nn.Module] = {n: m for n, m in model.named_modules() if isinstance(m, Block)}
    if not blocks:
        blocks = {n: m for n, m in model.named_modules() if n and type(m).__name__ in _EXTERNAL_BLOCKS}
    return blocks


class Recorder:
    """What one :func:`capture` saw in the latest forward pass (tensors detached).

    Attributes:
        gates: ``{gate name: s}``, the excitation vectors, (B, C).
        gate_inputs: ``{gate name: u}``, the SE block's input, (B, C, H, W).
        gate_outputs: ``{gate name: y}``, the SE block's output s ⊙ u, (B, C, H, W).
        blocks: ``{block name: h}``, each block's output, for plain and SE models alike.
    """

    def __init__(self) -> None:
        self.gates: dict[str, torch.Tensor] = {}
        self.gate_inputs: dict[str, torch.Tensor] = {}
        self.gate_outputs: dict[str, torch.Tensor] = {}
        self.blocks: dict[str, torch.Tensor] = {}


@contextlib.contextmanager
def capture(model: nn.Module, *, detach: bool = True) -> Iterator[Recorder]:
    """Record gates, SE inputs/outputs and block outputs of every forward pass inside the block.

    Hooks are removed on exit, also when the body raises. A later forward pass overwrites what an
    earlier one recorded.

    Example:
        >>> with capture(model) as rec:  # doctest: +SKIP
        ...     model(x)
        >>> rec.gates["blocks.0.se.gate"].shape  # doctest: +SKIP
        torch.Size([8, 16])
    """
    rec = Recorder()
    keep = (lambda t: t.detach()) if detach else (lambda t: t)
    handles = []
    try:
        for gate_name, gate in find_gates(model).items():
            se = model.get_submodule(gate_name.rsplit(".", 1)[0]) if "." in gate_name else model

            def on_gate(m, inp, out, name=gate_name):  # type: ignore[no-untyped-def]
                rec.gates[name] = keep(out).flatten(1)  # (B, C, 1, 1) in torchvision → (B, C)

            def on_se_in(m, inp, name=gate_name):  # type: ignore[no-untyped-def]
                rec.gate_inputs[name] = keep(inp[0])

            def on_se_out(m, inp, out, name=gate_name):  # type: ignore[no-untyped-def]
                rec.gate_outputs[name] = keep(out)

            handles += [
                gate.register_forward_hook(on_gate),
                se.register_forward_pre_hook(on_se_in),
                se.register_forward_hook(on_se_out),
            ]
        for block_name, block in find_blocks(model).items():

            def on_block(m, inp, out, name=block_name):  # type: ignore[no-untyped-def]
                rec.blocks[name] = keep(out)

            handles.append(block.register_forward_hook(on_block))
        yield rec
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- gate interventions


@contextlib.contextmanager
def fixed_gates(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, each listed gate outputs the given excitation instead of its own.

    Args:
        model: the model.
        values: ``{gate name: s}`` with s of shape (B, C) (one per example) or (C,) (the same for
            every example, e.g. a training-set mean).

    Raises:
        KeyError: a name that is not a gate of ``model`` (names are those of :func:`find_gates`).
    """
    gates = find_gates(model)
    unknown = sorted(set(values) - set(gates))
    if unknown:
        raise KeyError(f"not a gate of this model: {unknown[0]!r}")
    handles = []

    def override(m, inp, out, value):  # type: ignore[no-untyped-def]
        v = value if value.dim() > 1 else value.unsqueeze(0).expand(out.shape[0], -1)
        return v.reshape(out.shape).to(dtype=out.dtype, device=out.device)

    try:
        for name, value in values.items():
            handles.append(gates[name].register_forward_hook(lambda m, i, o, v=value: override(m, i, o, v)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def clean_gates_logits(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """The ``clean_gates`` intervention: logits of ``x_adv`` with every gate forced to s(x).

    The perturbation still flows through every layer, but the gates cannot adapt to it, which
    isolates what the *adaptive* gating contributes (DESIGN §6).
    """
    with capture(model) as rec:
        model(x)
    with fixed_gates(model, rec.gates):
        return model(x_adv)
