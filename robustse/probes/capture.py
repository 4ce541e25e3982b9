"""Probes on channel gates and blocks: discovery, and capture of excitations during forward passes.

A *gate* is the module whose output is the excitation vector ``s`` of a channel-gating block
(README "Models": "Channel gates found"): ``<block>.se.gate`` in robustse's own
:class:`~robustse.models.SEBlock`, ``scale_activation`` in ``torchvision.ops.SqueezeExcitation``
(RegNetY, EfficientNet, MobileNetV3), and, when timm is installed, the gate of timm's channel
gates listed in ``_TIMM_GATES`` (SE in its current and legacy naming, effective SE, ECA/CECA,
CBAM's channel attention, HGNet's ESE). A model with no gates is a valid plain model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from robustse.core.device import evaluating
from robustse.core.passes import rows_for_pass
from robustse.core.progress import track
from robustse.data.base import as_float_images, forward_rows
from robustse.models.eval_copy import any_layout
from robustse.models.gates import _gateless_sites, _se_modules, find_blocks, find_gates, site_of
from robustse.models.layers import SEBlock


class Recorder:
    """What one :func:`capture` saw in the latest forward pass (tensors detached).

    Attributes:
        gates: ``{gate name: s}``, the excitation vectors, (B, C).
        gate_inputs: ``{gate name: u}``, the SE block's input, (B, C, H, W).
        gate_outputs: ``{gate name: y}``, the SE block's output s ⊙ u, (B, C, H, W).
        site_inputs: ``{site name: u}``, the input of each SE site (:func:`find_sites`), for
            plain, static and SE models alike (for an SE model the same tensors as ``gate_inputs``).
        blocks: ``{block name: h}``, each block's output, for plain and SE models alike.
    """

    keeps_tensors = True  # what it records outlives the forward pass (copied or guarded)

    def __init__(self) -> None:
        self.gates: dict[str, torch.Tensor] = {}
        self.gate_inputs: dict[str, torch.Tensor] = {}
        self.gate_outputs: dict[str, torch.Tensor] = {}
        self.site_inputs: dict[str, torch.Tensor] = {}
        self.blocks: dict[str, torch.Tensor] = {}

    def gate(self, name: str, s: torch.Tensor) -> None:
        """A gate's output s, (B, C)."""
        self.gates[name] = s

    def se(self, name: str, u: torch.Tensor, y: torch.Tensor) -> None:
        """The input u and output y of the gating block whose gate is ``name`` (after :meth:`gate`)."""
        self.gate_inputs[name], self.gate_outputs[name] = u, y

    def site(self, name: str, u: torch.Tensor) -> None:
        """The input u of the SE site ``name`` (after :meth:`se` for a gating block)."""
        self.site_inputs[name] = u

    def block(self, name: str, h: torch.Tensor) -> None:
        """A block's output h."""
        self.blocks[name] = h


@contextlib.contextmanager
def capture(
    model: nn.Module, *, detach: bool = True, clone: bool | None = None, recorder: Recorder | None = None
) -> Iterator[Recorder]:
    """Record gates, SE inputs/outputs and block outputs of every forward pass inside the block.

    Hooks are removed on exit, also when the body raises. A later forward pass overwrites what an
    earlier one recorded.

    Args:
        model: any model (plain models record blocks only).
        detach: record detached tensors (False keeps the graph, e.g. to differentiate gate drift).
        clone: copy what is recorded. Needed where a later operation changes a recorded tensor in
            place (timm's SE-ResNets add the shortcut into the SE output with ``+=``). Default:
            no copies for robustse's own models, whose recorded tensors are never changed in
            place, copies for everything else. Uncopied tensors are checked at the end of the
            forward pass: a tensor changed in place raises instead of being silently wrong.
        recorder: receives each tensor as the hooks see it (default: a :class:`Recorder` that
            keeps them). One with ``keeps_tensors = False`` reduces each tensor inside the hook,
            before anything can change it, so nothing is copied or guarded. Its hooks are marked
            :func:`~robustse.models.eval_copy.any_layout`: what it receives may be in
            channels_last layout (a pass through the eval copy), so it must use ``reshape`` or
            ``flatten``, never ``view``.

    Raises:
        RuntimeError: an uncopied recorded tensor was changed in place during the forward pass.

    Example:
        >>> with capture(model) as rec:  # doctest: +SKIP
        ...     model(x)
        >>> rec.gates["blocks.0.se.gate"].shape  # doctest: +SKIP
        torch.Size([8, 16])
    """
    ses, blocks, bare = _se_modules(model), find_blocks(model), _gateless_sites(model)
    rec = recorder or Recorder()
    copies = _needs_clone(ses, blocks) if clone is None else clone
    # a recorder that reduces inside the hooks keeps nothing: nothing to copy, nothing to guard
    keep = _Keeper(detach=detach, clone=copies and rec.keeps_tensors, guard=rec.keeps_tensors)
    handles: list[RemovableHandle] = []
    try:
        _hook_gates(ses, rec, keep, handles)
        _hook_sites(bare, rec, keep, handles)
        _hook_blocks(blocks, rec, keep, handles)
        if keep.guard and handles:  # the in-place guard brackets every forward pass
            handles += [model.register_forward_pre_hook(keep.start), model.register_forward_hook(keep.end)]
        yield rec
    finally:
        for h in handles:
            h.remove()


def _needs_clone(ses: dict[str, tuple[nn.Module, nn.Module]], blocks: dict[str, nn.Module]) -> bool:
    """Whether :func:`capture` copies by default: not for robustse's own modules, which never
    change a recorded tensor in place; yes for everything else."""
    from robustse.models.layers import Block

    own_se = all(isinstance(se, SEBlock) for se, _ in ses.values())
    return not (own_se and all(isinstance(b, Block) for b in blocks.values()))


class _Keeper:
    """How :func:`capture` keeps a recorded tensor: detached or not, copied or guarded.

    An uncopied tensor's version counter is noted when it is recorded; :meth:`end` (a forward
    hook on the whole model) raises if any of them changed later in the same forward pass.
    """

    def __init__(self, *, detach: bool, clone: bool, guard: bool = True) -> None:
        self.detach, self.clone, self.guard = detach, clone, guard and not clone
        self.versions: list[tuple[str, torch.Tensor, int]] = []

    def __call__(self, t: torch.Tensor, where: str) -> torch.Tensor:
        t = t.detach() if self.detach else t
        if self.clone:
            return t.clone()
        if self.guard:  # held (with its version) until the end of the forward pass
            self.versions.append((where, t, t._version))
        return t

    def start(self, m, inp):
        self.versions.clear()

    def end(self, m, inp, out):
        for where, t, v in self.versions:
            if t._version != v:
                raise RuntimeError(
                    f"capture: the tensor recorded at {where} was changed in place later in the forward pass; "
                    "use capture(model, clone=True)"
                )
        self.versions.clear()


def _hook_gates(
    ses: dict[str, tuple[nn.Module, nn.Module]], rec: Recorder, keep: _Keeper, handles: list[RemovableHandle]
) -> None:
    """Record s from each gate, and u and y from its SE module (one hook sees both: less overhead)."""
    for gate_name, (se, gate) in ses.items():

        def on_gate(m, inp, out, name=gate_name):
            rec.gate(name, keep(out, name).flatten(1))  # (B, C, 1, 1) in torchvision → (B, C)

        def on_se(m, inp, out, name=gate_name):
            u = keep(inp[0], name)
            rec.se(name, u, keep(out, name))
            rec.site(site_of(name), u)

        handles += [gate.register_forward_hook(any_layout(on_gate)), se.register_forward_hook(any_layout(on_se))]


def _hook_sites(sites: dict[str, nn.Module], rec: Recorder, keep: _Keeper, handles: list[RemovableHandle]) -> None:
    """Record the input u of each gateless SE site (plain twin, static control)."""
    for site_name, module in sites.items():

        def on_site(m, inp, out, name=site_name):
            rec.site(name, keep(inp[0], name))

        handles.append(module.register_forward_hook(any_layout(on_site)))


def _hook_blocks(blocks: dict[str, nn.Module], rec: Recorder, keep: _Keeper, handles: list[RemovableHandle]) -> None:
    """Record each block's output h."""
    for block_name, block in blocks.items():

        def on_block(m, inp, out, name=block_name):
            rec.block(name, keep(out, name))

        handles.append(block.register_forward_hook(any_layout(on_block)))


# --------------------------------------------------------------------------- gate interventions


class _GateRecorder(Recorder):
    """A recorder of the gates alone: gating-block inputs and outputs and block outputs are
    ignored, so nothing but what :meth:`gate` keeps outlives the forward pass."""

    keeps_tensors = False

    def se(self, name: str, u: torch.Tensor, y: torch.Tensor) -> None:
        pass

    def site(self, name: str, u: torch.Tensor) -> None:
        pass

    def block(self, name: str, h: torch.Tensor) -> None:
        pass


class _GatesOnly(_GateRecorder):
    """Keeps each gate's excitations (copied: small, (B, C))."""

    def gate(self, name: str, s: torch.Tensor) -> None:
        with torch.inference_mode(False):  # a normal tensor even under inference_mode: attacks may save it
            self.gates[name] = s.clone()


def clean_gate_values(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every gate's excitation s(x), (B, C), from one forward pass that keeps nothing else."""
    with torch.no_grad(), capture(model, recorder=_GatesOnly()) as rec:
        model(x)
    return dict(rec.gates)


class _GateSums(_GateRecorder):
    """Sums each gate's excitations over the examples as the hooks see them (no activation is
    copied or held, whatever the image size)."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, torch.Tensor] = {}

    def gate(self, name: str, s: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0) + s.double().sum(0)


@torch.no_grad()
def gate_means(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Mean excitation of every gate over the images ``x``: what ``frozen_mean`` fixes the gates to.

    Args:
        model: the model (evaluated in eval mode, restored afterwards).
        x: images, uint8 (N, C, H, W) as datasets hold them, or floats in [0, 1]; pass the
            training set (or a seeded subset of it).
        batch_size: the most images per forward pass (fewer for large images: :func:`forward_rows`).

    Returns:
        ``{gate name: s̄}`` with s̄ of shape (C,); empty for a plain model.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows = forward_rows(x, batch_size)
    with evaluating(model), capture(model, recorder=_GateSums()) as rec:
        for i in track(range(0, len(x), rows), "gate means", leave=False):
            model(as_float_images(x[i : i + rows].to(device)))
    # on the CPU: small, stored in metadata, and sent between torchrun ranks inside probes
    assert isinstance(rec, _GateSums)
    return {name: (v / len(x)).float().cpu() for name, v in rec.sums.items()}


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

    def override(m, inp, out, value):
        v = rows_for_pass(value, out.shape[0]) if value.dim() > 1 else value.unsqueeze(0).expand(out.shape[0], -1)
        return v.reshape(out.shape).to(dtype=out.dtype, device=out.device)

    try:
        for name, value in values.items():
            # a gate's output is (B, C) in any layout: the attacks' eval copy may still use channels_last
            hook = any_layout(lambda m, i, o, v=value: override(m, i, o, v))
            handles.append(gates[name].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def clean_gates_logits(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """The ``clean_gates`` intervention: logits of ``x_adv`` with every gate forced to s(x).

    The perturbation still flows through every layer, but the gates cannot adapt to it, which
    isolates what the *adaptive* gating contributes (README "Metrics").
    """
    with fixed_gates(model, clean_gate_values(model, x)):
        return model(x_adv)


@contextlib.contextmanager
def held_gates(model: nn.Module, x: torch.Tensor) -> Iterator[None]:
    """Inside the block, every gate of ``model`` outputs its value for the clean batch ``x``,
    whatever input the model is given: the gates cannot react to a perturbation of ``x``.

    Every forward pass inside must be of a batch of ``len(x)`` examples, row for row, or of the
    rows that :func:`robustse.attacks.rows_of_pass` names.
    """
    with fixed_gates(model, clean_gate_values(model, x)):  # nothing but the gates is held meanwhile
        yield
