"""Gradient attacks: PGD (Madry et al., ICLR 2018) and FGSM / FGM (Goodfellow et al., ICLR 2015).

One PGD loop serves both: the norm's hooks (:mod:`robustse.attacks.norms`) give the random start,
the step and the projection; FGSM is PGD with one step of size eps and no random start. Without a
random start the first gradient does not depend on eps, so it is computed once and shared by every
epsilon: FGSM's whole ladder costs one backward pass. Restarts keep the per-example worst case
(misclassified first, then highest loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from robustse.attacks.base import Attack, Rungs, input_grad
from robustse.attacks.checks import MAX_PIXEL_UNITS, MAX_RESTARTS, MAX_STEPS, is_int, is_real
from robustse.attacks.registry import register_attack
from robustse.core.errors import AttackError


@register_attack("pgd", role="attack", description="PGD (Linf, L2): random start, steps, restarts keep the worst case")
@dataclass
class PGD(Attack):
    """Projected gradient descent on the cross-entropy loss (Madry et al., ICLR 2018).

    Args:
        norm: ``linf`` or ``l2``.
        steps: gradient steps (>= 1).
        rel_stepsize: step size as a multiple of eps (default 2.5 / steps).
        abs_stepsize: absolute step size in pixels (overrides ``rel_stepsize``).
        random_start: start uniformly inside the ball.
        restarts: independent runs; each example keeps its worst case.
        seed: seeds random starts.
    """

    steps: int = 10
    rel_stepsize: float | None = None
    abs_stepsize: float | None = None
    random_start: bool = True
    restarts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise AttackError(f"steps must be an integer in [1, {MAX_STEPS:,}] (got {self.steps!r})")
        if not is_int(self.restarts) or not 1 <= self.restarts <= MAX_RESTARTS:
            raise AttackError(f"restarts must be an integer in [1, {MAX_RESTARTS}] (got {self.restarts!r})")
        if not isinstance(self.random_start, bool):
            raise AttackError(f"random_start must be true or false (got {self.random_start!r})")
        for key in ("rel_stepsize", "abs_stepsize"):
            value = getattr(self, key)
            if value is not None and (not is_real(value) or not 0 < value <= MAX_PIXEL_UNITS):
                raise AttackError(f"{key} must be a number in (0, {MAX_PIXEL_UNITS:g}] (got {value!r})")
        if self.restarts > 1 and not self.random_start:
            raise AttackError("restarts > 1 need random_start = true (otherwise every restart is the same)")
        if self.rel_stepsize is None:
            self.rel_stepsize = 2.5 / self.steps

    def shares_first_gradient(self) -> bool:
        return not self.random_start

    def tiles_draws(self) -> bool:
        return True

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, rungs: Rungs
    ) -> torch.Tensor:
        best, best_score = x, None
        for _ in range(self.restarts):
            adv = self._run(model, x, y, eps, rungs)
            if self.restarts == 1:
                return adv
            with torch.no_grad():
                logits = model(adv)
                score = F.cross_entropy(logits, y, reduction="none") + 1e6 * (logits.argmax(1) != y)
            if best_score is None:
                best, best_score = adv, score
            else:
                better = score > best_score
                best = torch.where(better.view(-1, 1, 1, 1), adv, best)
                best_score = torch.maximum(score, best_score)
        return best

    def step_size(self, eps: torch.Tensor) -> torch.Tensor:
        """Per-row step sizes: ``abs_stepsize``, or ``rel_stepsize`` × eps."""
        if self.abs_stepsize is not None:
            return torch.full_like(eps, self.abs_stepsize)
        return eps * (self.rel_stepsize or 2.5 / self.steps)

    def gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient the attack ascends, and the logits (PGD: the cross-entropy's)."""
        return input_grad(model, x, y, batch)

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, rungs: Rungs) -> torch.Tensor:
        """One run of the loop: the start, then the steps."""
        ops, alpha, b = self.norm_ops, self.step_size(eps), rungs.batch
        if self.random_start:
            adv, first = rungs.draw(ops.random_start, x, eps), 0
        else:
            grad0 = rungs.grad0 if rungs.grad0 is not None else self.gradient(model, x, y, b)[0]
            adv, first = ops.project(x, ops.step(x, grad0, alpha), eps), 1
        if rungs.early_stop:
            return self._iterate_until_fooled(model, x, y, eps, alpha=alpha, start=(adv, first), batch=b)
        for _step in range(first, self.steps):
            grad, _ = self.gradient(model, adv, y, b)
            adv = ops.project(x, ops.step(adv, grad, alpha), eps)
        return adv

    def _iterate_until_fooled(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, *,
        alpha: torch.Tensor, start: tuple[torch.Tensor, int], batch: int,
    ) -> torch.Tensor:  # fmt: skip
        """The PGD iterations from ``start`` = (iterate, its step number), dropping each row from
        the batch once an iterate fools the model (``batch``: the loss's batch size).

        Every iterate lies in the eps-ball, so a fooling iterate is a valid adversarial; robust
        accuracy can only be lower (stronger) than with the last iterate alone, and later steps
        cost nothing for the rows already fooled.
        """
        ops = self.norm_ops
        adv, first = start[0].clone(), start[1]
        active = torch.arange(x.shape[0], device=x.device)
        for _step in range(first, self.steps):
            grad, logits = input_grad(model, adv[active], y[active], batch)
            still = logits.argmax(1) == y[active]  # the iterate before this step did not fool yet
            if not bool(still.all()):
                active, grad = active[still], grad[still]
                if active.numel() == 0:
                    break
            a = active
            adv[a] = ops.project(x[a], ops.step(adv[a], grad, alpha[a]), eps[a])
        return adv


@register_attack("fgsm", role="attack", description="FGSM (Linf) / FGM (L2): one gradient, reused for every eps")
@dataclass
class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al., ICLR 2015); FGM for ``norm="l2"``.

    PGD with one step of size eps and no random start: one gradient serves every epsilon.
    """

    steps: int = field(default=1, init=False)
    rel_stepsize: float | None = field(default=1.0, init=False)
    abs_stepsize: float | None = field(default=None, init=False)
    random_start: bool = field(default=False, init=False)
    restarts: int = field(default=1, init=False)
