"""Measurements of README "Metrics" as pure tensor functions, one value per example.

For clean input x, perturbed x' = x + δ and logits f; for an SE block with input u, gate s and
output y = s ⊙ u (primes for the perturbed pass); for a block output h_l. All norms are L2 over
everything but the batch dimension. Where a ratio is 0/0 (no perturbation at all) the drift-like
measures are 0 and the ratio-of-ratios (damping, amplification) is NaN: undefined, not 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm over all but the first dimension, (B,)."""
    return t.flatten(1).norm(p=2, dim=1)


def relative_change(a: torch.Tensor, a_prime: torch.Tensor) -> torch.Tensor:
    """‖a' − a‖ / ‖a‖ per example; 0 where nothing changed (also when ‖a‖ = 0)."""
    num, den = _norm(a_prime - a), _norm(a)
    return torch.where(num == 0, torch.zeros_like(num), num / den)


def logit_sensitivity(f: torch.Tensor, f_prime: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """‖f(x') − f(x)‖₂ / ‖δ‖₂ per example; 0 where δ = 0."""
    num, den = _norm(f_prime - f), _norm(delta)
    return torch.where(den == 0, torch.zeros_like(num), num / den)


def logit_change(f: torch.Tensor, f_prime: torch.Tensor) -> torch.Tensor:
    """‖f(x') − f(x)‖₂ / ‖f(x)‖₂ per example."""
    return relative_change(f, f_prime)


def kl(f: torch.Tensor, f_prime: torch.Tensor) -> torch.Tensor:
    """KL(softmax f(x) ‖ softmax f(x')) per example, in nats."""
    logp, logq = F.log_softmax(f, dim=1), F.log_softmax(f_prime, dim=1)
    return (logp.exp() * (logp - logq)).sum(1)


def flip(f: torch.Tensor, f_prime: torch.Tensor) -> torch.Tensor:
    """argmax f(x') ≠ argmax f(x) per example (bool)."""
    return f_prime.argmax(1) != f.argmax(1)


def margin(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_y − max_{j≠y} f_j per example (> 0: correct, by that much)."""
    true = f.gather(1, y[:, None]).squeeze(1)
    other = f.scatter(1, y[:, None], float("-inf")).max(1).values
    return true - other


def gate_drift(s: torch.Tensor, s_prime: torch.Tensor) -> torch.Tensor:
    """‖s' − s‖₂ / ‖s‖₂ per example (s: (B, C) excitation vectors)."""
    return relative_change(s, s_prime)


def gate_cosine_distance(s: torch.Tensor, s_prime: torch.Tensor) -> torch.Tensor:
    """1 − cos(s, s') per example."""
    return 1 - F.cosine_similarity(s.flatten(1), s_prime.flatten(1), dim=1)


def drift_ratio(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """out / inp for two relative changes per example; NaN where the input did not move."""
    return torch.where(inp == 0, torch.full_like(inp, float("nan")), out / inp)


def damping(u: torch.Tensor, u_prime: torch.Tensor, y: torch.Tensor, y_prime: torch.Tensor) -> torch.Tensor:
    """output_drift / input_drift per example: < 1 means the gate damps the perturbation here.

    NaN where the input did not move (the ratio is undefined, not 1).
    """
    return drift_ratio(relative_change(y, y_prime), relative_change(u, u_prime))


def amplification(h: torch.Tensor, h_prime: torch.Tensor, x: torch.Tensor, x_prime: torch.Tensor) -> torch.Tensor:
    """(‖h' − h‖/‖h‖) / (‖δ‖/‖x‖) per example for one block output; NaN where δ = 0."""
    return drift_ratio(relative_change(h, h_prime), relative_change(x, x_prime))
