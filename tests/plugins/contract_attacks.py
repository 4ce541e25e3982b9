"""A plugin as a user writes it, for the contract tests: registered from outside the package.

``rand_fgsm`` is R+FGSM (Tramèr et al., ICLR 2018): a random sign step of size eps/2, then one
signed-gradient step of eps/2. It draws through ``rungs.draw`` and uses the norm's hooks, so the
contract tests check the base class's streams, stacking and budget for a user's attack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import robustse as rs
from robustse.attacks.base import Rungs


@rs.register_attack("test_rand_fgsm", role="attack")
@dataclass
class RandFGSM(rs.Attack):
    """R+FGSM: a random half step, then a gradient half step (Tramèr et al., ICLR 2018)."""

    def tiles_draws(self) -> bool:
        return True

    def perturb(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                rungs: Rungs) -> torch.Tensor:  # fmt: skip
        ops = self.norm_ops
        start = rungs.draw(ops.noise, x, eps / 2)
        start.requires_grad_(True)
        loss = F.cross_entropy(model(start), y, reduction="sum") / rungs.batch
        (grad,) = torch.autograd.grad(loss, start)
        return ops.project(x, ops.step(start.detach(), grad, eps / 2), eps)
