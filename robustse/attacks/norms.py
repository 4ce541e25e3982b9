"""The threat model's norm as three hooks an attack calls: where to start, which way to step, how to
project back into the eps-ball (Madry et al., ICLR 2018), plus the random-noise control's draw.

Every hook takes per-row budgets ``eps`` shaped (N, 1, 1, 1), so rows of one stacked batch may carry
different epsilons, and keeps results in the pixel range [0, 1]. Foolbox 3 splits its
gradient-descent attacks the same way (random start, normalize, project).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

DIV_EPS = 1e-10  # guards divisions by a zero gradient or perturbation norm (as torchattacks)


def flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped (N, 1, 1, 1) for broadcasting."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


class Norm(ABC):
    """The hooks of one norm. ``gen`` is the attack's random stream (a CPU generator)."""

    name: str

    @abstractmethod
    def random_start(self, x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A random point of the eps-ball around ``x``, inside [0, 1]."""

    @abstractmethod
    def step(self, adv: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """``adv`` moved by ``alpha`` along the norm's steepest-ascent direction of ``grad``."""

    @abstractmethod
    def project(self, x: torch.Tensor, adv: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``adv`` brought back into the eps-ball around ``x`` and into [0, 1]."""

    @abstractmethod
    def noise(self, x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``x`` plus random noise of size ``eps`` (the noise control), inside [0, 1]."""

    @abstractmethod
    def within(self, x: torch.Tensor, adv: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Bool mask like ``adv`` (Linf: per value) or (N, 1, 1, 1) (L2: per row): inside the ball,
        up to float rounding."""


class Linf(Norm):
    """Linf ball: uniform start, signed-gradient step, coordinate-wise clipping."""

    name = "linf"

    def random_start(self, x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        u = torch.rand(x.shape, generator=gen, device=gen.device).to(x.device)
        return (x + (2 * u - 1) * eps).clamp(0, 1)

    def step(self, adv: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return adv + alpha * grad.sign()

    def project(self, x: torch.Tensor, adv: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        delta = torch.maximum(torch.minimum(adv - x, eps), -eps)
        return (x + delta).clamp(0, 1)

    def noise(self, x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        signs = torch.randint(0, 2, x.shape, generator=gen, device=gen.device).to(x.device) * 2 - 1
        return (x + eps * signs).clamp(0, 1)

    def within(self, x: torch.Tensor, adv: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (adv - x).abs() <= eps * (1 + 1e-5) + 1e-7


class L2(Norm):
    """L2 ball: random direction and radius start, normalized-gradient step, radial projection."""

    name = "l2"

    def random_start(self, x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Radius uniform in [0, eps] along a random direction (as torchattacks; not uniform in volume).
        d = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
        r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=gen, device=gen.device).to(x.device)
        return (x + d / (flat_norm(d) + DIV_EPS) * r * eps).clamp(0, 1)

    def step(self, adv: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return adv + alpha * (grad / (flat_norm(grad) + DIV_EPS))  # this order of rounding, as torchattacks

    def project(self, x: torch.Tensor, adv: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        delta = adv - x
        factor = torch.minimum(eps / flat_norm(delta), torch.ones_like(eps))
        factor = torch.nan_to_num(factor, nan=1.0)  # delta = 0 and eps = 0
        return (x + delta * factor).clamp(0, 1)

    def noise(self, x: torch.Tensor, eps: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        d = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device)
        return (x + d / (flat_norm(d) + DIV_EPS) * eps).clamp(0, 1)

    def within(self, x: torch.Tensor, adv: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return flat_norm(adv - x) <= eps * (1 + 1e-5) + 1e-7


NORMS: dict[str, Norm] = {n.name: n for n in (Linf(), L2())}
