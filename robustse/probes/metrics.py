"""Measurements of README "Metrics" as pure tensor functions, one value per example.

For clean input x, perturbed x' = x + δ and logits f; for an SE block with input u, gate s and
output y = s ⊙ u (primes for the perturbed pass); for a block output h_l. All norms are L2 over
everything but the batch dimension. Where a ratio is 0/0 (no perturbation at all) the drift-like
measures are 0 and the ratios (channel gain, adaptive damping, amplification) are NaN: undefined,
not 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm over all but the first dimension, (B,); in place for any memory
    layout (a channels_last activation is not copied to be flattened)."""
    return torch.linalg.vector_norm(t, 2, dim=_after_batch(t))


def _after_batch(t: torch.Tensor) -> tuple[int, ...]:
    """Every dimension of ``t`` but the first (the batch)."""
    return tuple(range(1, t.dim()))


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


def channel_gain(u: torch.Tensor, u_prime: torch.Tensor, y: torch.Tensor, y_prime: torch.Tensor) -> torch.Tensor:
    """output_drift / input_drift per example for y = s ⊙ u: the gate's *static* channel weighting
    of the perturbation against the signal (exactly 1 for a gate that is uniform over channels and
    does not move; any convolution can weight channels too, so this is not the gate's reaction).

    NaN where the input did not move (the ratio is undefined, not 1).
    """
    return drift_ratio(relative_change(y, y_prime), relative_change(u, u_prime))


damping = channel_gain  # the name this measure had before it was called what it is


def _per_channel(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A gate (B, C) shaped to multiply a feature map ``like`` (B, C, ...)."""
    return s.reshape(s.shape[0], s.shape[1], *([1] * (like.dim() - 2)))


def gate_reaction(
    u: torch.Tensor, u_prime: torch.Tensor, s: torch.Tensor, s_prime: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the SE output change Δy = s′⊙u′ − s⊙u = s⊙Δu + Δs⊙u′ into its static term s⊙Δu (what
    a gate held at s(x) would pass on) and its adaptive term Δs⊙u′ (the gate's reaction).

    Args:
        u, u_prime: SE input, clean and perturbed (B, C, H, W).
        s, s_prime: gate, clean and perturbed (B, C).

    Returns:
        (static term, adaptive term), both like ``u``.
    """
    return _per_channel(s, u) * (u_prime - u), _per_channel(s_prime - s, u) * u_prime


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den per example; NaN where den = 0 (undefined, not 1)."""
    return torch.where(den == 0, torch.full_like(num, float("nan")), num / den)


def adaptive_damping(static: torch.Tensor, adaptive: torch.Tensor) -> torch.Tensor:
    """‖Δy‖ / ‖s⊙Δu‖ per example: < 1 when the gate's reaction shrinks the perturbation compared
    with a gate that stayed at s(x); exactly 1 for a gate that cannot move."""
    return reaction_measures(static, adaptive)[0]


def adaptive_share(static: torch.Tensor, adaptive: torch.Tensor) -> torch.Tensor:
    """‖Δs⊙u′‖ / ‖s⊙Δu‖ per example: the size of the gate's reaction against the static term."""
    return reaction_measures(static, adaptive)[1]


def adaptive_alignment(static: torch.Tensor, adaptive: torch.Tensor) -> torch.Tensor:
    """cos(Δs⊙u′, s⊙Δu) per example: < 0 when the reaction opposes the perturbation; NaN where
    either term is zero (a gate that did not move has no direction)."""
    return reaction_measures(static, adaptive)[2]


def reaction_measures(static: torch.Tensor, adaptive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(:func:`adaptive_damping`, :func:`adaptive_share`, :func:`adaptive_alignment`) from the
    terms of :func:`gate_reaction`, each norm taken once (a probe measures every gate of every
    perturbed pass)."""
    n_static, n_adaptive = _norm(static), _norm(adaptive)
    dot = (adaptive * static).sum(_after_batch(static))
    return (
        _ratio(_norm(static + adaptive), n_static),
        _ratio(n_adaptive, n_static),
        _ratio(dot, n_adaptive * n_static),
    )


def spatial_mean(u: torch.Tensor) -> torch.Tensor:
    """z = mean over every dimension after the channel one: (B, C, H, W) → (B, C), the squeezed
    global state an SE block sees (Hu et al. 2018, Eq. 2)."""
    return u.mean(tuple(range(2, u.dim()))) if u.dim() > 2 else u  # any layout, no copy


def squeeze_drift(u: torch.Tensor, u_prime: torch.Tensor) -> torch.Tensor:
    """‖z' − z‖ / ‖z‖ per example for z the spatial mean of u: how far the squeezed global state
    moves. 0 for a perturbation of u whose spatial mean is 0 in every channel."""
    return relative_change(spatial_mean(u), spatial_mean(u_prime))


def squeeze_attenuation(u: torch.Tensor, u_prime: torch.Tensor) -> torch.Tensor:
    """squeeze drift / feature-map drift ‖u' − u‖/‖u‖ per example: < 1 when the squeeze moves
    less than the feature map it summarizes (the premise "the global state hasn't changed
    much"); exactly 1 for u and a perturbation that are constant over space; NaN where u did not
    move."""
    return drift_ratio(squeeze_drift(u, u_prime), relative_change(u, u_prime))


def amplification(h: torch.Tensor, h_prime: torch.Tensor, x: torch.Tensor, x_prime: torch.Tensor) -> torch.Tensor:
    """(‖h' − h‖/‖h‖) / (‖δ‖/‖x‖) per example for one block output; NaN where δ = 0."""
    return drift_ratio(relative_change(h, h_prime), relative_change(x, x_prime))
