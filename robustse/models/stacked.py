"""K models of one architecture as one network: member k's channels are the k-th block of every
layer's channels (grouped convolutions, block-diagonal linear layers, per-channel batch norm), so
each member computes exactly what it would alone — its own input, its own batch statistics — up to
float rounding, in one forward pass (README "Performance": seed batching).

    stacked = stack_models([m0, m1, m2])           # K = 3 members, built the same way
    logits = stacked(torch.cat([x0, x1, x2], 1))   # (B, K * classes): member k's are block k
    state_k = stacked.member_state(1)              # an ordinary state dict of member 1

Every tensor of the stacked network holds the members' tensors concatenated along one axis
(the channel axis), so the stacked parameters train with one optimizer exactly as K optimizers
with the same settings would (SGD's update is elementwise).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from robustse.core.errors import ModelError
from robustse.models.layers import Normalize

# Leaves that act on each channel (or position) alone: they work unchanged on stacked channels.
CHANNELWISE = (
    nn.ReLU,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
)  # fmt: skip  (not Dropout: its masks would be drawn once for all members)


class StackedLinear(nn.Module):
    """K linear layers side by side: input (B, K·in) → output (B, K·out), block k from block k.

    ``weight`` is (K·out, in) and ``bias`` (K·out,): the members' tensors concatenated.
    """

    def __init__(self, members: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.k, self.out_features, self.in_features = len(members), members[0].out_features, members[0].in_features
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in members]))
        self.bias = nn.Parameter(torch.cat([m.bias.detach() for m in members])) if members[0].bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.k, self.out_features, self.in_features)
        y = torch.einsum("bki,koi->bko", x.reshape(x.shape[0], self.k, self.in_features), w)  # (B, K, out)
        if self.bias is not None:
            y = y + self.bias.view(self.k, self.out_features)
        return y.reshape(x.shape[0], self.k * self.out_features)


def _stacked_conv(members: Sequence[nn.Conv2d]) -> nn.Conv2d:
    c, k = members[0], len(members)
    out = nn.Conv2d(
        k * c.in_channels, k * c.out_channels, c.kernel_size, stride=c.stride, padding=c.padding,  # type: ignore[arg-type]
        dilation=c.dilation, groups=k * c.groups, bias=c.bias is not None, padding_mode=c.padding_mode,  # type: ignore[arg-type]
    )  # fmt: skip
    _copy_cat(out, members)
    return out


def _stacked_bn(members: Sequence[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    b = members[0]
    out = nn.BatchNorm2d(len(members) * b.num_features, b.eps, b.momentum, b.affine, b.track_running_stats)
    _copy_cat(out, members)
    return out


def _stacked_normalize(members: Sequence[Normalize]) -> Normalize:
    mean = torch.cat([m.mean.flatten() for m in members]).tolist()
    std = torch.cat([m.std.flatten() for m in members]).tolist()
    return Normalize(mean, std)


def _copy_cat(out: nn.Module, members: Sequence[nn.Module]) -> None:
    """``out``'s own tensors := the members' concatenated along dim 0 (0-dim ones: member 0's)."""
    with torch.no_grad():
        for name, t in [*out.named_parameters(recurse=False), *out.named_buffers(recurse=False)]:
            parts = [getattr(m, name) for m in members]
            t.copy_(torch.cat(parts) if t.dim() else parts[0])


def _stack_leaf(members: Sequence[nn.Module]) -> nn.Module:
    """The stacked version of one module position (members of one type)."""
    first = members[0]
    if isinstance(first, nn.Conv2d):
        return _stacked_conv(members)  # type: ignore[arg-type]
    if isinstance(first, nn.BatchNorm2d):
        return _stacked_bn(members)  # type: ignore[arg-type]
    if isinstance(first, nn.Linear):
        return StackedLinear(members)  # type: ignore[arg-type]
    if isinstance(first, Normalize):
        return _stacked_normalize(members)  # type: ignore[arg-type]
    if isinstance(first, CHANNELWISE):
        return copy.deepcopy(first)
    raise ModelError(f"cannot stack {type(first).__name__} modules (seed batching supports robustse's own models)")


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def _stack_into(target: nn.Module, members: Sequence[nn.Module]) -> None:
    """Replace ``target``'s children by their stacked versions (recursively); ``target``'s own
    per-channel tensors (e.g. a static gate's logits) become the members' concatenated."""
    for name, child in list(target.named_children()):
        parts = [getattr(m, name) for m in members]
        leaf_like = isinstance(child, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, Normalize, *CHANNELWISE))
        if leaf_like:
            setattr(target, name, _stack_leaf(parts))
        else:
            _stack_into(child, parts)
    for name, t in _own_tensors(target):
        if t.dim() != 1:
            raise ModelError(f"cannot stack {type(target).__name__}.{name} of shape {tuple(t.shape)}")
        stacked = torch.cat([getattr(m, name).detach() for m in members])
        if isinstance(t, nn.Parameter):
            setattr(target, name, nn.Parameter(stacked))
        else:
            target.register_buffer(name, stacked)


class StackedModel(nn.Module):
    """K members of one architecture as one network (:func:`stack_models`).

    Input: the members' inputs concatenated along channels, (B, K·C, H, W). Output: (B, K·classes).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.k = len(members)
        self.channels_last = False
        self.net = copy.deepcopy(members[0])
        _stack_into(self.net, members)
        self._member_keys = {k: v.shape for k, v in members[0].state_dict().items()}
        normalize = {f"{n}." for n, m in members[0].named_modules() if isinstance(m, Normalize)}
        self._axis = {key: int(any(key.startswith(p) for p in normalize)) for key in self._member_keys}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, classes) from the members' inputs (K, B, C, H, W)."""
        k, b = x.shape[0], x.shape[1]
        inputs = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.net(inputs).view(b, self.k, -1)

    def to_channels_last(self) -> StackedModel:
        """Weights and inputs in channels_last layout (grouped convolutions run faster so on CPU)."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member ``k``'s state dict (copies), with the keys and shapes of a model built alone."""
        return {name: self.member_tensor(name, t, k) for name, t in self.net.state_dict().items()}

    def member_tensor(self, name: str, t: torch.Tensor, k: int) -> torch.Tensor:
        """Member ``k``'s part of the stacked tensor ``name`` (or of a tensor shaped like it)."""
        shape = self._member_keys[name]
        if t.dim() == 0:
            return t.clone()
        axis = self._axis[name]  # 1: Normalize's (1, C, 1, 1) buffers; 0: everything else
        return t.narrow(axis, k * shape[axis], shape[axis]).clone()


def stack_models(members: Sequence[nn.Module]) -> StackedModel:
    """One network computing every member (models of one architecture built alike).

    Raises:
        ModelError: fewer than one member, or a module type that cannot be stacked.
    """
    if not members:
        raise ModelError("no models to stack")
    return StackedModel(members)


class MemberRows(nn.Module):
    """A stacked model seen as one model over K·B rows: rows k·B … (k+1)·B − 1 go to member k
    (their logits come back in the same rows). With ``members=K``, the attack engine attacks
    every member at once (:meth:`robustse.attacks.Attack.__call__`)."""

    def __init__(self, stacked: StackedModel) -> None:
        super().__init__()
        self.stacked = stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.stacked.k
        logits = self.stacked.member_logits(x.view(k, x.shape[0] // k, *x.shape[1:]))  # (B, K, classes)
        return logits.transpose(0, 1).reshape(x.shape[0], -1)


def member_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """K copies of the batch ``x``, member by member: the input of :class:`MemberRows`."""
    return x.repeat(k, *([1] * (x.dim() - 1)))
