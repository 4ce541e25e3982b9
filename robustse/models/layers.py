"""Building blocks shared by every model family: Normalize, SEBlock, StaticGate, ConvBNReLU, Block."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from robustse.core.errors import ModelError
from robustse.models.eval_copy import has_hooks

Squeeze = Literal["avg", "max"]
Gate = Literal["sigmoid", "hardsigmoid"]


class Normalize(nn.Module):
    """First layer of every model: (x - mean) / std per channel, so attacks work in pixel units.

    mean/std are buffers: they travel with the state dict and therefore with every checkpoint.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ModelError(f"normalization mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ModelError(f"normalization std must be > 0 (got {list(std)})")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = [round(v, 4) for v in self.mean.flatten().tolist()]
        std = [round(v, 4) for v in self.std.flatten().tolist()]
        return f"mean={mean}, std={std}"


def se_hidden(channels: int, reduction: int, min_hidden: int = 4) -> int:
    """Hidden width of the excitation MLP: ``max(channels // reduction, min_hidden)``.

    The floor keeps narrow stages (16 channels at r = 16) from collapsing to a single unit.
    """
    return max(channels // reduction, min_hidden)


def side_seed(*salt: int) -> int:
    """A 63-bit seed derived from the global CPU RNG state and ``salt``, without advancing it.

    The same global state (same ``torch.manual_seed`` and the same draws so far) gives the same
    seed; a different position in the stream, or different salt, gives an unrelated one.
    """
    h = hashlib.sha256(torch.random.get_rng_state().numpy().tobytes())
    h.update(repr(salt).encode())
    return int.from_bytes(h.digest()[:8], "little") >> 1


@contextlib.contextmanager
def side_stream(*salt: int) -> Iterator[None]:
    """Run the body on a private CPU RNG stream seeded by :func:`side_seed`; restore the global one.

    Parameters created inside (e.g. ``nn.Linear``'s default init) draw from their own stream, so
    a model with extra modules leaves every later draw of the global RNG where its twin without
    them leaves it. Only the CPU generator is forked; CUDA generators are never touched.
    """
    seed = side_seed(*salt)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class SEBlock(nn.Module):
    """Squeeze-and-Excitation block (Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018).

    For u of shape (B, C, H, W)::

        z = squeeze(u)                       # (B, C): spatial mean (or max)
        s = gate(fc2(relu(fc1(z))))          # (B, C): the excitation vector
        y = s[:, :, None, None] * u          # (B, C, H, W)

    ``gate`` is its own submodule so a forward hook on ``<block>.se.gate`` yields ``s``,
    a forward pre-hook on the SEBlock yields ``u`` and its output is ``y``.

    fc1/fc2 take nn.Linear's default init from a private stream seeded by the global RNG state
    at construction (:func:`side_stream`) and leave the global RNG untouched, so an SE model and
    its plain twin built after the same ``torch.manual_seed`` share every other initial value.

    Args:
        channels: C.
        reduction: r; hidden width is ``max(C // r, min_hidden)``.
        squeeze: ``avg`` (paper) or ``max`` pooling over H, W.
        gate: ``sigmoid`` (paper) or ``hardsigmoid``.
        min_hidden: floor of the hidden width.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        squeeze: Squeeze = "avg",
        gate: Gate = "sigmoid",
        min_hidden: int = 4,
    ) -> None:
        super().__init__()
        if not isinstance(reduction, int) or isinstance(reduction, bool) or reduction < 1:
            raise ModelError(f"SE reduction must be an integer >= 1 (got {reduction!r})")
        if squeeze not in ("avg", "max"):
            raise ModelError(f"unknown SE squeeze {squeeze!r} (valid: avg, max)")
        if gate not in ("sigmoid", "hardsigmoid"):
            raise ModelError(f"unknown SE gate {gate!r} (valid: sigmoid, hardsigmoid)")
        hidden = se_hidden(channels, reduction, min_hidden)
        self.channels, self.reduction, self.hidden = channels, reduction, hidden
        self.squeeze = nn.AdaptiveAvgPool2d(1) if squeeze == "avg" else nn.AdaptiveMaxPool2d(1)
        with side_stream(channels, hidden):  # SE-only weights: the global RNG does not move
            self.fc1 = nn.Linear(channels, hidden)
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(hidden, channels)
        self.gate = nn.Sigmoid() if gate == "sigmoid" else nn.Hardsigmoid()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z = self._squeezed(u)  # (B, C)
        s = self.gate(self.fc2(self.act(self.fc1(z))))  # (B, C)
        return u * s[:, :, None, None]  # (B, C, H, W)

    def _squeezed(self, u: torch.Tensor) -> torch.Tensor:
        """z = squeeze(u) as (B, C); the spatial mean through :class:`_SpatialMean` where it is
        the same function (an unhooked average pool of an image batch, not under the compiler)."""
        pool = self.squeeze
        plain_mean = type(pool) is nn.AdaptiveAvgPool2d and u.dim() == 4 and not has_hooks(pool)
        if plain_mean and not torch.compiler.is_compiling():  # the compiler fuses the pool's backward itself
            return _SpatialMean.apply(u)
        return pool(u).flatten(1)


class _SpatialMean(torch.autograd.Function):
    """The mean of (B, C, H, W) over H and W, as ``AdaptiveAvgPool2d(1)`` then ``flatten(1)``,
    whose backward hands autograd the gradient broadcast over H and W as a view instead of a
    full tensor: autograd adds it into the SE block's other input gradient (from ``s * u``) in
    one pass. The values are those of PyTorch's own backward (dz / (H W) at every position, added
    in the same order). Measured by hand on the project's 2-core CPU: an SE block's forward and
    backward pass 1.1-1.6x faster (batch 128 and 1,000; 16 and 32 channels; both layouts), a
    channels_last ``se_small_cnn`` training step 1.11x (4,200 -> 4,653 img/s)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:
        ctx.shape = u.shape
        return u.mean((2, 3))

    @staticmethod
    def backward(ctx, dz: torch.Tensor) -> torch.Tensor:
        h, w = ctx.shape[2], ctx.shape[3]
        return (dz / (h * w))[:, :, None, None].expand(ctx.shape)


class StaticGate(nn.Module):
    """Static-gate control: a learned per-channel scale with no input dependence.

    ``y = u * act(logit)[None, :, None, None]`` where ``logit`` is a learnable (C,) parameter and
    ``act`` is the SE block's gate function (sigmoid by default). ``logit`` starts at 0, so every
    channel starts scaled by 0.5, as an SE gate does at init (its pre-activation is near 0). It
    holds the SE block's place in ``static_<family>`` models: same sites, same gate function, but
    one scale per channel shared by every input. Not an :class:`SEBlock` and has no ``gate``
    submodule, so :func:`robustse.probes.find_gates` does not report it.

    Args:
        channels: C.
        gate: ``sigmoid`` or ``hardsigmoid`` (both give 0.5 at logit 0).
    """

    def __init__(self, channels: int, *, gate: Gate = "sigmoid") -> None:
        super().__init__()
        if gate not in ("sigmoid", "hardsigmoid"):
            raise ModelError(f"unknown static gate {gate!r} (valid: sigmoid, hardsigmoid)")
        self.channels = channels
        self.logit = nn.Parameter(torch.zeros(channels))
        self.squash = nn.Sigmoid() if gate == "sigmoid" else nn.Hardsigmoid()

    def scale(self) -> torch.Tensor:
        """The current per-channel scale ``act(logit)``, shape (C,)."""
        return self.squash(self.logit)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.scale()[None, :, None, None]  # (B, C, H, W)


class EmptySite(nn.Identity):
    """The plain twin's SE site: the identity, marked so that probes find the same site in all
    three family members (README "Metrics": the premise is measured at the SE block's input u
    in the SE twin, the plain twin and the static control alike). No parameters, so checkpoints
    are those of ``nn.Identity``."""


def make_site(channels: int, se: dict[str, Any] | None) -> nn.Module:
    """The module at an SE site: :class:`EmptySite` (``se=None``, plain twin), a :class:`StaticGate`
    (``se={"kind": "static", ...}``) or an :class:`SEBlock` (any other options dict)."""
    if se is None:
        return EmptySite()
    opts = dict(se)
    if opts.pop("kind", "se") == "static":
        return StaticGate(channels, **opts)
    return SEBlock(channels, **opts)


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Max pooling whose forward runs PyTorch's channels_last kernel and whose backward is the
    ordinary one. Both kernels pick the same maximum in every window (same values, same indices;
    tested, ties included), so outputs and gradients are identical to ``nn.MaxPool2d``'s."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        args = (kernel, stride, padding, dilation, ceil_mode)
        y, idx = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=torch.channels_last), *args)
        y, idx = y.contiguous(), idx.contiguous()
        ctx.save_for_backward(x, idx)
        ctx.args = args
        ctx.mark_non_differentiable(idx)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, idx = ctx.saved_tensors
        g = torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), x, *ctx.args, idx)
        return g, None, None, None, None, None


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that runs its forward pass in channels_last memory layout on CPU.

    Measured on the project's 2-core CPU, (256, 16, 28, 28) inputs: PyTorch's contiguous (NCHW)
    max-pool kernel takes 9.5 ms, the channels_last one 2.2 ms without and 5.1 ms with the
    indices a backward pass needs (layout changes included). Values, indices and therefore
    gradients are identical to ``nn.MaxPool2d``'s; the output keeps the input's layout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dim() != 4
            or x.is_cuda
            or self.return_indices
            or x.is_contiguous(memory_format=torch.channels_last)
            or torch.compiler.is_compiling()  # the compiler picks its own kernels and layouts
        ):
            return super().forward(x)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
        stride = self.stride if self.stride is not None else self.kernel_size
        return _ChannelsLastMaxPool.apply(
            x, _pair(self.kernel_size), _pair(stride), _pair(self.padding), _pair(self.dilation), self.ceil_mode
        )


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (no bias), batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Block(nn.Module):
    """Marker base class: a block whose output h_l is a depth step of the amplification profile."""


class Classifier(nn.Module):
    """Normalize → stem → blocks → average pool to pool_size² cells → linear head. Outputs logits.

    ``pool_size=1`` is global average pooling; a larger grid keeps coarse spatial layout, which
    lets a shallow network converge in a couple of epochs.
    """

    def __init__(
        self,
        normalize: Normalize,
        stem: nn.Module,
        blocks: nn.Sequential,
        width: int,
        num_classes: int,
        *,
        pool_size: int = 1,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.stem = stem
        self.blocks = blocks
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.head = nn.Linear(width * pool_size * pool_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(self.normalize(x)))
        return self.head(self.pool(h).flatten(1))  # (B, num_classes)


def make_normalize(in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> Normalize:
    """Normalize layer with identity defaults (mean 0, std 1); training sets the data's stats."""
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    if len(mean) != in_channels:
        raise ModelError(f"normalization has {len(mean)} channels but the model takes {in_channels}")
    return Normalize(mean, std)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions, unit/zero batch norm, default linear init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
