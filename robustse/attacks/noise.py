"""The random-noise control: a perturbation of the same norm and size as the attack's, in a random
direction. Comparing an attack with it separates what the gradient direction does from what any
perturbation of that size does (README "Metrics")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from robustse.attacks.base import Attack, Rungs
from robustse.attacks.registry import register_attack


@register_attack("noise", role="control", description="random-noise control: same norm and eps, no gradient")
@dataclass
class Noise(Attack):
    """Random-noise control at the same norm and eps: ±eps per pixel (Linf) or a random
    direction of L2 length eps, then clipped to [0, 1]."""

    def tiles_draws(self) -> bool:
        return True

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, rungs: Rungs
    ) -> torch.Tensor:
        return rungs.draw(self.norm_ops.noise, x, eps)
