"""The gate attack: how far can a perturbation of size eps move the SE gates? PGD that ascends the
excitation drift instead of the loss (README "Metrics"); a probe, not an attack on the label."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from robustse.attacks.base import Rungs
from robustse.attacks.gradient import PGD
from robustse.attacks.registry import register_attack
from robustse.core.errors import AttackError


@register_attack(
    "gate", role="probe", description="PGD maximizing total gate drift instead of the loss (SE models only)"
)
@dataclass
class GateAttack(PGD):
    """PGD that maximizes the excitation drift instead of the loss: how far can δ move the gates?

    Ascends the total gate drift Σ_gates ‖s(x+δ) − s(x)‖₂ / ‖s(x)‖₂ (per example) inside the
    eps-ball, from a random start (at δ = 0 the drift has no gradient). Labels are not used. It
    needs a model with gates; a sweep skips it for plain models, and it never counts toward robust
    accuracy. Options as :class:`~robustse.attacks.gradient.PGD` (one run: restarts would need a
    drift score).
    """

    random_start: bool = field(default=True, init=False)
    restarts: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._clean: dict[str, torch.Tensor] = {}

    def tiles_draws(self) -> bool:
        return False  # its drift norm would mix the members' gates

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, rungs: Rungs
    ) -> torch.Tensor:
        from robustse.models.gates import find_gates
        from robustse.probes.capture import capture

        if not find_gates(model):
            raise AttackError("the gate attack needs a model with SE gates (this one has none)")
        with torch.no_grad(), capture(model) as rec:
            model(x)
        self._clean = dict(rec.gates)
        try:  # every row runs every step: misclassification is not this attack's goal
            return super().perturb(model, x, y, eps, Rungs(rungs.generators, rungs.batch, members=rungs.members))
        finally:
            self._clean = {}

    def gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from robustse.probes.capture import capture

        x = x.detach().requires_grad_(True)
        with capture(model, detach=False) as rec:
            logits = model(x)
        drift = torch.stack(
            [
                ((s - self._clean[n]).pow(2).sum(1) + 1e-12).sqrt() / self._clean[n].norm(dim=1).clamp_min(1e-12)
                for n, s in rec.gates.items()
            ]
        ).sum(0)  # (N,): each example's total drift over the gates
        (grad,) = torch.autograd.grad(drift.sum() / batch, x)
        return grad, logits.detach()
