"""Figures of a run: DataFrames in, matplotlib Figures out (no torch here).

Every function takes the tables :mod:`robustse.analysis.report` assembles from the results store and
returns a :class:`matplotlib.figure.Figure`; the caller saves or embeds it. Colours: plain twins
blue, SE twins orange; attacks solid, the noise control dashed.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from robustse.core.roles import attack_role  # noqa: E402

PLAIN, SE, STATIC = "#1f77b4", "#ff7f0e", "#2ca02c"
KIND_COLOURS = {"plain": PLAIN, "se": SE, "static": STATIC}
GRID = {"alpha": 0.3, "lw": 0.5}


def _line_style(attack: str) -> str:
    """Dashed for a control (the noise control), solid for an attack."""
    return "--" if attack_role(attack) == "control" else "-"


def _grid(n: int, *, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list[Any]]:
    cols = min(3, max(1, n))
    rows = (max(1, n) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def _short(site: str) -> str:
    return site.replace(".se.gate", "").replace(".se.scale_activation", "").replace("blocks.", "b")


def _finish(fig: Figure, title: str) -> Figure:
    """Title a figure in a size that fits one panel, and lay it out."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _empty(message: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center")
    return fig


def robust_accuracy(curves: Any) -> Figure:
    """Robust accuracy vs eps for each family member (plain, SE, static control), mean over seeds
    with its bootstrap CI band.

    Args:
        curves: DataFrame ``arm, family, se, eps, mean, ci_low, ci_high`` and optionally ``kind``
            (plain / se / static; without it ``se`` decides).
    """
    panels = list(dict.fromkeys(zip(curves.arm, curves.family, strict=True)))
    if not panels:
        return _empty("no robust-accuracy cells")
    kinds = curves["kind"] if "kind" in curves else curves.se.map({True: "se", False: "plain"})
    fig, axes = _grid(len(panels))
    for ax, (arm, family) in zip(axes, panels, strict=False):
        for kind, color in KIND_COLOURS.items():
            c = curves[(curves.arm == arm) & (curves.family == family) & (kinds == kind)].sort_values("eps")
            if c.empty:
                continue
            label = family if kind == "plain" else f"{kind}_{family}"
            ax.plot(c.eps, c["mean"], "o-", color=color, label=label, ms=3)
            ax.fill_between(c.eps, c.ci_low, c.ci_high, color=color, alpha=0.2, lw=0)
        ax.set(title=f"{family} ({arm})", xlabel="eps (pixels)", ylabel="robust accuracy", ylim=(-0.02, 1.02))
        ax.grid(**GRID)
        ax.legend(fontsize=8)
    return _finish(fig, "Robust accuracy (worst case), 95% CI")


def sensitivity(curves: Any) -> Figure:
    """Output sensitivity ‖f(x')−f(x)‖/‖δ‖ vs eps: twins, each attack solid and noise dashed.

    Args:
        curves: DataFrame ``arm, family, se, attack, eps, mean, ci_low, ci_high``.
    """
    panels = list(dict.fromkeys(zip(curves.arm, curves.family, strict=True)))
    if not panels:
        return _empty("no sensitivity measurements (probes off?)")
    fig, axes = _grid(len(panels))
    for ax, (arm, family) in zip(axes, panels, strict=False):
        sub = curves[(curves.arm == arm) & (curves.family == family)]
        for (attack, se), c in sub.groupby(["attack", "se"], sort=True):
            c = c.sort_values("eps")
            color = SE if se else PLAIN
            style = _line_style(attack)
            ax.plot(c.eps, c["mean"], style, marker="o", ms=3, color=color, label=f"{'SE' if se else 'plain'} {attack}")
            ax.fill_between(c.eps, c.ci_low, c.ci_high, color=color, alpha=0.15, lw=0)
        ax.set(title=f"{family} ({arm})", xlabel="eps (pixels)", ylabel="logit sensitivity")
        ax.grid(**GRID)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Output sensitivity: attack vs noise")
    fig.tight_layout()
    return fig


def gate_drift(sites: Any) -> Figure:
    """Gate drift ‖s'−s‖/‖s‖ per gate vs eps for the SE models (mean over seeds), per attack.

    Args:
        sites: DataFrame ``attack, eps, site, mean`` of the ``gate_drift`` metric.
    """
    attacks = list(dict.fromkeys(sites.attack))
    if not attacks:
        return _empty("no gates (plain models only, or probes off)")
    fig, axes = _grid(len(attacks))
    for ax, attack in zip(axes, attacks, strict=False):
        sub = sites[sites.attack == attack]
        names = list(dict.fromkeys(sub.site))
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(names)))
        for name, color in zip(names, colors, strict=True):
            c = sub[sub.site == name].groupby("eps")["mean"].mean()
            ax.plot(c.index, c.values, "o-", ms=3, color=color, label=_short(name))
        ax.set(title=attack, xlabel="eps (pixels)", ylabel="gate drift")
        ax.grid(**GRID)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Excitation drift per gate (early → late: dark → light)")
    fig.tight_layout()
    return fig


def damping(table: Any, eps: float) -> Figure:
    """Damping (output drift / input drift) per gate at ``eps`` with bootstrap CIs; 1 = neutral.

    Args:
        table: :func:`robustse.analysis.stats.damping_table` output.
    """
    t = table[np.isclose(table.eps, eps)]
    if t.empty:
        return _empty("no damping measurements (no SE models, or probes off)")
    panels = list(dict.fromkeys(zip(t.arm, t.family, strict=True)))
    fig, axes = _grid(len(panels), width=6)
    for ax, (arm, family) in zip(axes, panels, strict=False):
        sub = t[(t.arm == arm) & (t.family == family)]
        attacks = list(dict.fromkeys(sub.attack))
        width = 0.8 / max(1, len(attacks))
        for i, attack in enumerate(attacks):
            a = sub[sub.attack == attack]
            x = np.arange(len(a)) + i * width
            err = np.vstack([a["mean"] - a.ci_low, a.ci_high - a["mean"]])
            ax.bar(x, a["mean"] - 1, width, bottom=1, yerr=err, capsize=2, label=attack)
        names = list(dict.fromkeys(sub.site))
        ax.set_xticks(np.arange(len(names)) + width * (len(attacks) - 1) / 2)
        ax.set_xticklabels([_short(n) for n in names], rotation=60, fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(title=f"se_{family} ({arm}), eps = {eps:g}", ylabel="damping (< 1: damps)")
        ax.grid(axis="y", **GRID)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def amplification(profile: Any, eps: float) -> Figure:
    """Amplification (‖h'−h‖/‖h‖)/(‖δ‖/‖x‖) over depth at ``eps``: plain vs SE, attack vs noise.

    Args:
        profile: DataFrame ``arm, family, se, attack, eps, site, mean`` of the amplification metric.
    """
    t = profile[np.isclose(profile.eps, eps)]
    if t.empty:
        return _empty("no block measurements (probes off?)")
    panels = list(dict.fromkeys(zip(t.arm, t.family, strict=True)))
    fig, axes = _grid(len(panels))
    for ax, (arm, family) in zip(axes, panels, strict=False):
        sub = t[(t.arm == arm) & (t.family == family)]
        for (attack, se), c in sub.groupby(["attack", "se"], sort=True):
            order = list(dict.fromkeys(c.site))
            means = c.groupby("site", sort=False)["mean"].mean().reindex(order)
            ax.plot(
                range(len(order)), means.values, _line_style(attack), marker="o", ms=3,
                color=SE if se else PLAIN, label=f"{'SE' if se else 'plain'} {attack}",
            )  # fmt: skip
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels([_short(o) for o in order], rotation=60, fontsize=7)
        ax.set(title=f"{family} ({arm}), eps = {eps:g}", xlabel="block (input → output)", ylabel="amplification")
        ax.grid(**GRID)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Amplification over depth")
    fig.tight_layout()
    return fig


def excitation_heatmaps(maps: list[tuple[str, Any, Any]], classes: list[str], eps: float) -> Figure:
    """Per-class mean excitations, clean vs adversarial, one row per gate (e.g. early and late).

    Args:
        maps: ``[(gate name, clean (K, C) array, adversarial (K, C) array)]``.
        classes: class names (K).
    """
    if not maps:
        return _empty("no gates to show")
    fig, axes = plt.subplots(len(maps), 3, figsize=(15, 3.2 * len(maps)), squeeze=False)
    for row, (name, clean, adv) in zip(axes, maps, strict=True):
        vmax = float(max(np.nanmax(clean), np.nanmax(adv)))
        for ax, data, title in ((row[0], clean, "clean"), (row[1], adv, f"adversarial, eps = {eps:g}")):
            im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set(title=f"{_short(name)}: {title}", xlabel="channel")
            _class_axis(ax, classes)
            fig.colorbar(im, ax=ax, fraction=0.03)
        diff = adv - clean
        lim = float(np.nanmax(np.abs(diff))) or 1.0
        im = row[2].imshow(diff, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        row[2].set(title=f"{_short(name)}: adversarial − clean", xlabel="channel")
        row[2].set_yticks([])
        fig.colorbar(im, ax=row[2], fraction=0.03)
    fig.suptitle("Mean excitation per class (SE models, mean over seeds)")
    fig.tight_layout()
    return fig


MAX_CLASS_LABELS = 40  # more class names than fit a heatmap row's height: label by index instead


def _class_axis(ax: Any, classes: list[str]) -> None:
    """One named tick per class where the names fit (10 for Fashion-MNIST); an index axis for many
    classes (ImageNet's 1,000 names would be unreadable and take matplotlib tens of seconds to lay out)."""
    if len(classes) <= MAX_CLASS_LABELS:
        ax.set_yticks(range(len(classes)))
        ax.set_yticklabels(classes, fontsize=6)
    else:
        ax.set_ylabel(f"class index (of {len(classes)})")


def gallery(items: list[dict[str, Any]], *, magnify: float) -> Figure:
    """Adversarial examples: clean image, magnified perturbation, adversarial image, predictions.

    Args:
        items: ``[{"model", "clean" (H, W[, 3]), "adv", "label", "clean_pred", "adv_pred"}]``.
        magnify: perturbation display gain (0.5 + magnify · δ).
    """
    if not items:
        return _empty("no stored adversarial images")
    fig, axes = plt.subplots(len(items), 3, figsize=(7, 2.3 * len(items)), squeeze=False)
    for row, it in zip(axes, items, strict=True):
        delta = np.clip(0.5 + magnify * (it["adv"] - it["clean"]), 0, 1)
        for ax, img, title in (
            (row[0], it["clean"], f"clean: {it['label']} → {it['clean_pred']}"),
            (row[1], delta, f"δ × {magnify:g}"),
            (row[2], it["adv"], f"{it['model']}: → {it['adv_pred']}"),
        ):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7, color="red" if ax is row[2] and it["adv_pred"] != it["label"] else "black")
            ax.axis("off")
    fig.tight_layout()
    return fig


def interventions(table: Any) -> Figure:
    """Robust accuracy of the SE models as trained vs with gates held at their clean values
    (``clean_gates``) or their training-set means (``frozen_mean``), per attack.

    Args:
        table: :func:`robustse.analysis.stats.intervention_table` output.
    """
    t = table[table.measurement == "accuracy"]
    if t.empty:
        return _empty("no interventions (no SE models, or probes off)")
    panels = list(dict.fromkeys(zip(t.arm, t.family, t.attack, strict=True)))
    fig, axes = _grid(len(panels))
    for ax, (arm, family, attack) in zip(axes, panels, strict=False):
        sub = t[(t.arm == arm) & (t.family == family) & (t.attack == attack)]
        base = sub[sub.intervention == sub.intervention.iloc[0]].sort_values("eps")
        ax.plot(base.eps, base.normal, "o-", color=SE, ms=3, label="as trained")
        for name, style in (("clean_gates", "s--"), ("frozen_mean", "^:")):
            c = sub[sub.intervention == name].sort_values("eps")
            if c.empty:
                continue
            ax.plot(c.eps, c.intervened, style, ms=3, label=name)
            lo, hi = c.normal + c.ci_low, c.normal + c.ci_high  # effect CI around the intervened mean
            ax.fill_between(c.eps, lo, hi, alpha=0.15, lw=0)
        ax.set(title=f"se_{family} ({arm}), {attack}", xlabel="eps (pixels)", ylabel="accuracy", ylim=(-0.02, 1.02))
        ax.grid(**GRID)
        ax.legend(fontsize=7)
    fig.suptitle("Gate interventions on the same perturbations")
    fig.tight_layout()
    return fig


def gate_effects(table: Any, margin: float = 0.01) -> Figure:
    """The gates' white-box effect: robust accuracy of each intervention minus the intact SE
    model's, in pp vs eps, with its 95% CI over models and the ±margin band (equivalence).

    Args:
        table: :func:`robustse.analysis.inference.gate_effect_table` output.
    """
    if table is None or table.empty:
        return _empty("no gate interventions attacked (list them in [sweep] interventions)")
    panels = list(dict.fromkeys(zip(table.arm, table.family, strict=True)))
    fig, axes = _grid(len(panels))
    for ax, (arm, family) in zip(axes, panels, strict=False):
        sub = table[(table.arm == arm) & (table.family == family)]
        for (name, c), marker in zip(sub.groupby("intervention", sort=False), "os^", strict=False):
            c = c.sort_values("eps")
            err = [100 * (c["diff"] - c.ci_low), 100 * (c.ci_high - c["diff"])]
            ax.errorbar(c.eps, 100 * c["diff"], yerr=err, fmt=f"{marker}-", ms=4, capsize=3, label=f"{name} − adaptive")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axhspan(-100 * margin, 100 * margin, color="grey", alpha=0.12, lw=0, label="equivalence margin")
        ax.set(title=f"se_{family} ({arm})", xlabel="eps (pixels)", ylabel="Δ robust accuracy (pp)")
        ax.grid(**GRID)
        ax.legend(fontsize=7)
    return _finish(fig, "Cause: held − adaptive gates, 95% CI")


def reaction_ratios(ratios: Any) -> Figure:
    """The gates' reaction under each attack (solid) and under the noise control (dashed): output
    reaction at the logits and adaptive damping per SE block, geometric means with 95% CIs over
    models; 1 = the reaction changes nothing, > 1 it enlarges the change.

    Args:
        ratios: :func:`robustse.analysis.ratios.ratio_table` output.
    """
    names = {"output_reaction": "output reaction (logits)", "adaptive_damping": "adaptive damping (per SE block)"}
    t = ratios[ratios.measurement.isin(list(names)) & (ratios.models == "se")] if ratios is not None else None
    if t is None or t.empty:
        return _empty("no gate reaction measured (no SE model probed)")
    panels = list(dict.fromkeys(zip(t.arm, t.family, t.measurement, strict=True)))
    fig, axes = _grid(len(panels))
    for ax, (arm, family, m) in zip(axes, panels, strict=False):
        sub = t[(t.arm == arm) & (t.family == family) & (t.measurement == m)]
        for attack, c in sub.groupby("attack", sort=False):
            c = c.sort_values("eps")
            line = ax.plot(c.eps, c.a_value, "o-", ms=3, label=str(attack))[0]
            ax.fill_between(c.eps, c.a_ci_low, c.a_ci_high, color=line.get_color(), alpha=0.2, lw=0)
        noise = sub[sub.attack == sub.attack.iloc[0]].sort_values("eps")
        ax.plot(noise.eps, noise.b_value, "s--", color="grey", ms=3, label="random noise")
        ax.fill_between(noise.eps, noise.b_ci_low, noise.b_ci_high, color="grey", alpha=0.15, lw=0)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set(title=f"se_{family} ({arm}): {names[m]}", xlabel="eps (pixels)", ylabel="adaptive / held gates")
        ax.grid(**GRID)
        ax.legend(fontsize=7)
    return _finish(fig, "Mechanism: the gates' reaction (> 1 enlarges), 95% CI")


def squeeze_attenuation(per_site: Any, eps: float) -> Figure:
    """The premise per SE site: squeeze drift / feature-map drift under the attack and under noise,
    for the SE models and the same sites of the plain twins and static controls (log scale).

    Args:
        per_site: DataFrame ``arm, family, kind, site, perturbation, value`` (geometric means).
    """
    if per_site is None or per_site.empty:
        return _empty("squeeze attenuation not measured (probes off, or a store written before it)")
    panels = list(dict.fromkeys(zip(per_site.arm, per_site.family, strict=True)))
    fig, axes = _grid(len(panels), width=5.5)
    for ax, (arm, family) in zip(axes, panels, strict=False):
        sub = per_site[(per_site.arm == arm) & (per_site.family == family)]
        sites = list(dict.fromkeys(sub.site))
        for kind, c in sub.groupby("kind", sort=False):
            for pert, d in c.groupby("perturbation", sort=False):
                x = [sites.index(s) for s in d.site]
                style = "--" if pert == "noise" else "-"
                ax.plot(x, d.value, f"o{style}", color=KIND_COLOURS.get(str(kind), "black"), ms=4,
                        label=f"{kind}, {pert}")  # fmt: skip
        ax.set_xticks(range(len(sites)))
        ax.set_xticklabels([_short(s) for s in sites], fontsize=7)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set(title=f"{family} ({arm}), eps = {eps:g}", xlabel="SE site", ylabel="‖Δz‖/‖z‖ ÷ ‖Δu‖/‖u‖")
        ax.grid(**GRID)
        ax.legend(fontsize=7)
    return _finish(fig, "Premise: squeeze drift / feature-map drift")
