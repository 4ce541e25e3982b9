"""Gate drift of one perturbation, against the random-noise control at the same eps.

For a batch x and its perturbation x' (an attack's, and the noise control's), every gate gets
the DESIGN §6 measurements averaged over examples: gate drift (relative L2 and cosine distance),
input and output drift of its SE block, and damping; every block gets its amplification.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import metrics as M
from .attacks import Attack, create_attack
from .probes import capture


def _mean(t: torch.Tensor) -> float:
    """Mean over examples, ignoring NaN (undefined ratios)."""
    t = t[~t.isnan()]
    return float(t.mean()) if t.numel() else float("nan")


@torch.no_grad()
def _record(model: nn.Module, x: torch.Tensor):  # type: ignore[no-untyped-def]
    with capture(model) as rec:
        logits = model(x)
    return logits, rec


def measure_drift(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: Attack,
    eps: float,
    noise: Attack | None = None,
) -> list[dict[str, Any]]:
    """Per-gate and per-block drift rows for ``attack`` and the noise control at ``eps``.

    Returns:
        One dict per (perturbation, site): ``perturbation`` (attack name or ``noise``), ``kind``
        (``gate`` or ``block``), ``site``, and the means of the measurements over the batch.
    """
    noise = noise or create_attack("noise", norm=attack.norm, seed=attack.seed)
    f, clean = _record(model, x)
    rows: list[dict[str, Any]] = []
    for label, atk in ((attack.name, attack), ("noise", noise)):
        x_p = atk(model, x, y, epsilons=[eps]).adversarials[0]
        f_p, pert = _record(model, x_p)
        base = {
            "perturbation": label,
            "eps": eps,
            "logit_sensitivity": _mean(M.logit_sensitivity(f, f_p, x_p - x)),
            "flip_rate": float(M.flip(f, f_p).float().mean()),
        }
        for name, s in clean.gates.items():
            u, y_out = clean.gate_inputs[name], clean.gate_outputs[name]
            u_p, y_p = pert.gate_inputs[name], pert.gate_outputs[name]
            rows.append(
                {
                    **base,
                    "kind": "gate",
                    "site": name,
                    "gate_drift": _mean(M.gate_drift(s, pert.gates[name])),
                    "gate_cosine": _mean(M.gate_cosine_distance(s, pert.gates[name])),
                    "input_drift": _mean(M.relative_change(u, u_p)),
                    "output_drift": _mean(M.relative_change(y_out, y_p)),
                    "damping": _mean(M.damping(u, u_p, y_out, y_p)),
                }
            )
        for name, h in clean.blocks.items():
            rows.append(
                {
                    **base,
                    "kind": "block",
                    "site": name,
                    "amplification": _mean(M.amplification(h, pert.blocks[name], x, x_p)),
                }
            )
    return rows


def plot_drift(rows: list[dict[str, Any]], path: str) -> None:
    """Bar chart per gate: gate drift and damping, attack vs noise (PNG/SVG by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = [r for r in rows if r["kind"] == "gate"]
    blocks = [r for r in rows if r["kind"] == "block"]
    labels = list(dict.fromkeys(r["perturbation"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, src, title in (
        (axes[0], "gate_drift", gates, "gate drift ‖s'−s‖/‖s‖"),
        (axes[1], "damping", gates, "damping (output / input drift)"),
        (axes[2], "amplification", blocks, "amplification over depth"),
    ):
        sites = list(dict.fromkeys(r["site"] for r in src))
        width = 0.8 / max(1, len(labels))
        for i, label in enumerate(labels):
            vals = [next(r[key] for r in src if r["site"] == s and r["perturbation"] == label) for s in sites]
            ax.bar([j + i * width for j in range(len(sites))], vals, width, label=label)
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(sites))])
        ax.set_xticklabels(
            [s.replace(".se.gate", "").replace(".se.scale_activation", "") for s in sites], rotation=60, fontsize=7
        )
        ax.set_title(title + ("" if sites else " (none)"))
        if key == "damping":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=8)
    eps = rows[0]["eps"] if rows else ""
    fig.suptitle(f"excitation drift at eps = {eps}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
