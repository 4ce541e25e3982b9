"""The ``drift`` command's measurement: for a set of examples, each gate's and block's drift under
an attack and under the noise control at one eps (README "Metrics"), averaged per site.

Batch by batch the attacks run with memory-budgeted gradient passes, then each clean pass is
recorded once and each perturbed pass is measured against it as it runs
(:func:`robustse.probes.cell.perturbed_pass`); only per-example values are kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustse.attacks import Attack, create_attack
from robustse.attacks.evaluator import grad_bytes_per_row
from robustse.core.passes import pass_memory, pass_rows, rows_within
from robustse.core.progress import track
from robustse.data.base import as_float_images
from robustse.probes import metrics as M
from robustse.probes.cell import perturbed_pass, snapshot

# Ratios are averaged as means of logs (geometric means): a halving and a doubling cancel.
RATIO_METRICS = ("channel_gain", "adaptive_damping", "adaptive_share", "squeeze_attenuation")


def _mean(t: torch.Tensor) -> float:
    """Mean over examples, ignoring NaN (undefined ratios)."""
    t = t[~t.isnan()]
    return float(t.mean()) if t.numel() else float("nan")


def _average(metric: str, t: torch.Tensor) -> float:
    """The mean of ``t`` over examples; for a ratio, the geometric mean (positive values only)."""
    if metric not in RATIO_METRICS:
        return _mean(t)
    t = t[~t.isnan() & (t > 0)]
    return float(t.log().mean().exp()) if t.numel() else float("nan")


def measure_drift(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: Attack,
    eps: float,
    noise: Attack | None = None,
    batch_size: int = 100,
    rows: int | None = None,
) -> list[dict[str, Any]]:
    """Per-gate and per-block drift rows for ``attack`` and the noise control at ``eps``.

    ``x`` may be uint8 images anywhere (each batch goes to the model's device and to float in
    [0, 1] on its own, so a large set is never converted whole) or float images in [0, 1].
    Batch by batch (``batch_size`` images, each batch its own random stream, so the draws are
    the same on every device): the attacks run with gradient passes of ``rows`` rows
    (:func:`robustse.attacks.pass_rows`; default :func:`drift_rows`, the pass budget's), then
    ``rows`` at a time each clean pass is recorded once and each perturbed pass is measured
    against it as it runs (:func:`perturbed_pass`); only per-example values are kept. Progress
    is counted per batch (:mod:`robustse.core.progress`).

    Returns:
        One dict per (perturbation, site): ``perturbation`` (attack name or ``noise``), ``kind``
        (``gate`` or ``block``), ``site``, and the means of the measurements over the examples.
    """
    noise = noise or create_attack("noise", norm=attack.norm, seed=attack.seed)
    perturbations = ((attack.name, attack), ("noise", noise))
    device = next(model.parameters()).device
    rows = rows or drift_rows(model, as_float_images(x[:1].to(device)), batch_size)
    columns: Columns = {}
    for b, i in enumerate(track(range(0, len(x), batch_size), "drift")):
        xb, yb = as_float_images(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)
        with pass_rows(rows):
            moved = [atk(model, xb, yb, epsilons=[eps], stream=b).adversarials[0] for _, atk in perturbations]
        for j in range(0, len(xb), rows):
            _measure_part(model, xb[j : j + rows], [x_p[j : j + rows] for x_p in moved], perturbations, columns)
    return _drift_rows(columns, [label for label, _ in perturbations], eps)


def _measure_part(model: nn.Module, xb: torch.Tensor, moved: list[torch.Tensor], perturbations, columns) -> None:
    """Record the clean pass of ``xb`` once; measure each perturbed pass against it into ``columns``."""
    clean = snapshot(model, xb)
    for (label, _), x_p in zip(perturbations, moved, strict=True):
        f_p, _, values = perturbed_pass(model, clean, xb, x_p)
        values[("out", "", "logit_sensitivity")] = M.logit_sensitivity(clean.logits, f_p, x_p - xb)
        values[("out", "", "flip_rate")] = M.flip(clean.logits, f_p).double()
        for key, v in values.items():
            columns.setdefault((label, key), []).append(v.double().cpu())


def drift_rows(model: nn.Module, x: torch.Tensor, batch_size: int) -> int:
    """Rows per gradient pass and per recorded clean pass of :func:`measure_drift`: the batch,
    fewer where an attack's gradient pass on it would not fit the device's pass budget
    (full-size images: :func:`robustse.attacks.pass_memory`), so drift's memory follows the
    budget, not the batch."""
    return min(batch_size, rows_within(pass_memory(x.device), grad_bytes_per_row(model, x)))


Columns = dict[tuple[str, Any], list[torch.Tensor]]  # (perturbation, key) → per-batch values


def _drift_rows(columns: Columns, labels: list[str], eps: float) -> list[dict[str, Any]]:
    """The rows of :func:`measure_drift` from its per-example columns."""
    rows: list[dict[str, Any]] = []
    for label in labels:
        whole = {key: torch.cat(parts) for (lab, key), parts in columns.items() if lab == label}
        base = {
            "perturbation": label,
            "eps": eps,
            "logit_sensitivity": _mean(whole.pop(("out", "", "logit_sensitivity"))),
            "flip_rate": float(whole.pop(("out", "", "flip_rate")).mean()),
        }
        by_site: dict[tuple[str, str], dict[str, Any]] = {}
        for (kind, site, metric), v in whole.items():
            by_site.setdefault((kind, site), {**base, "kind": kind, "site": site})[metric] = _average(metric, v)
        rows += list(by_site.values())
    return rows


def plot_drift(rows: list[dict[str, Any]], path: str) -> None:
    """Bar chart per gate: gate drift and adaptive damping, attack vs noise (PNG/SVG by extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = [r for r in rows if r["kind"] == "gate"]
    blocks = [r for r in rows if r["kind"] == "block"]
    labels = list(dict.fromkeys(r["perturbation"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, src, title in (
        (axes[0], "gate_drift", gates, "gate drift ‖s'−s‖/‖s‖"),
        (axes[1], "adaptive_damping", gates, "adaptive damping ‖Δy‖ / ‖s⊙Δu‖"),
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
        if key == "adaptive_damping":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=8)
    eps = rows[0]["eps"] if rows else ""
    fig.suptitle(f"excitation drift at eps = {eps}")
    fig.tight_layout()
    from pathlib import Path

    from robustse.core.errors import WriteError
    from robustse.core.files import replace_file

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        plt.close(fig)
        raise WriteError(f"{path}: unknown figure format .{fmt} (use .png, .svg or .pdf)")
    try:
        replace_file(Path(path), lambda fh: fig.savefig(fh, format=fmt, dpi=120))
    finally:
        plt.close(fig)
