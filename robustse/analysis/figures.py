"""Stage 3 of the report: every figure (drawn by :mod:`~robustse.analysis.plots`, saved under
``figures/``) and every CSV table of the report."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustse.analysis import plots
from robustse.analysis import stats as S
from robustse.analysis.analyse import Analysis
from robustse.analysis.rundata import RunData
from robustse.core.files import own_dir, write_bytes, write_text
from robustse.core.progress import Progress
from robustse.core.roles import attack_role


@dataclass(frozen=True)
class ReportFigure:
    """Stage 3 (:func:`draw_figures`): one figure, saved under ``figures/``."""

    title: str
    path: Path
    png: bytes


# --------------------------------------------------------------------------- stage 3: figures and tables


def draw_figures(data: RunData, a: Analysis) -> dict[str, ReportFigure]:
    """Draw every figure and save it as ``figures/<key>.png``."""
    fig_dir = own_dir(data.target / "figures")
    out = {}
    todo = _figures(data, a)
    with Progress(len(todo), "report figures", unit="figure") as bar:
        for key, (title, draw) in todo.items():
            path = fig_dir / f"{key}.png"
            out[key] = ReportFigure(title, path, _png(draw(), path))
            bar.update()
    return out


def _figures(data: RunData, a: Analysis) -> dict[str, tuple[str, Callable[[], Any]]]:
    """key → (caption, a function drawing the matplotlib Figure), in report order: each figure is
    drawn, saved and closed before the next (one open at a time)."""
    eps = a.gallery_eps
    damping = a.damping if a.damping is not None else pd.DataFrame(columns=["eps"])
    return {
        "robust_accuracy": (
            "Outcome: robust accuracy (worst case over the attacks) vs eps for SE, plain and static, "
            "mean over seeds with 95% CI",
            lambda: plots.robust_accuracy(a.acc_curves),
        ),
        "squeeze": (
            f"Premise: how much of the feature-map change reaches the squeezed state per SE site at eps = "
            f"{eps:g} (1 = all of it), attack solid and noise dashed, SE and the same sites of the baselines",
            lambda: plots.squeeze_attenuation(_squeeze_sites(data, a), eps),
        ),
        "gate_effects": (
            "Cause: robust accuracy with the gates held (or frozen) minus adaptive, attacked white-box, "
            "in pp with 95% CI (> 0: the gates' reaction hurts)",
            lambda: plots.gate_effects(a.gate_effects),
        ),
        "reaction": (
            "Mechanism: the gates' reaction (adaptive / held gates for the same x′) under each attack and "
            "under noise, 95% CI (> 1: the reaction enlarges the change)",
            lambda: plots.reaction_ratios(a.ratios),
        ),
        "sensitivity": ("Output sensitivity vs eps: attack vs noise", lambda: plots.sensitivity(a.sens_curves)),
        "gate_drift": ("Gate drift per gate vs eps", lambda: plots.gate_drift(a.drift_sites)),
        "damping": (f"Damping per gate at eps = {eps:g}", lambda: plots.damping(damping, eps)),
        "amplification": (f"Amplification over depth at eps = {eps:g}", lambda: plots.amplification(a.profile, eps)),
        "excitations": ("Per-class mean excitations, clean vs adversarial", lambda: _excitations_figure(data, a)),
        "gallery": (f"Adversarial examples ({a.main}, eps = {eps:g})", lambda: _gallery_figure(data, a)),
        "interventions": ("Gate interventions", lambda: plots.interventions(a.interventions)),
    }


def _squeeze_sites(data: RunData, a: Analysis) -> pd.DataFrame:
    """Squeeze attenuation per (arm, family, member kind, site) under the main attack and the noise
    control at the gallery eps: the geometric mean over examples, then over the models."""
    se = data.site_examples
    if se.empty or a.main is None:
        return pd.DataFrame()
    d = se[(se.metric == "squeeze_attenuation") & np.isclose(se.eps, a.gallery_eps) & (se.value > 0)]
    d = d[(d.attack == a.main) | d.attack.map(lambda n: attack_role(n) == "control")]
    if d.empty:
        return pd.DataFrame()
    info = data.models.assign(kind=S.model_kinds(data.models))[["label", "arm", "family", "kind"]]
    d = d.assign(value=np.log(d.value.astype(float)), perturbation=np.where(d.attack == a.main, a.main, "noise"))
    per_model = d.groupby(["model", "site", "perturbation"], as_index=False, sort=False).value.mean()
    per_model = per_model.merge(info.rename(columns={"label": "model"}), on="model")
    keys = ["arm", "family", "kind", "site", "perturbation"]
    out = per_model.groupby(keys, as_index=False, sort=False).value.mean()
    return out.assign(value=np.exp(out.value))


def _excitations_figure(data: RunData, a: Analysis) -> Any:
    maps = _heatmaps(data.excitations, a.groups, a.main, a.gallery_eps, data.classes)
    return plots.excitation_heatmaps(maps, _class_names(data.classes), a.gallery_eps)


def _gallery_figure(data: RunData, a: Analysis) -> Any:
    items = _gallery(data.gallery, data.examples, a.groups, a.main, a.gallery_eps, data.classes)
    return plots.gallery(items, magnify=0.5 / max(a.gallery_eps, 1e-6))


def _png(fig: Any, path: Path) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    data = buf.getvalue()
    write_bytes(path, data)
    return data


def _image(blob: bytes, shape: str) -> np.ndarray:
    img = np.frombuffer(blob, dtype=np.float32).reshape(json.loads(shape))
    return img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))


def _class_names(classes: list[str]) -> list[str]:
    return [str(c) for c in classes] if classes else [str(i) for i in range(10)]


def _heatmaps(exc: Any, groups: list[dict[str, Any]], attack: str | None, eps: float, classes: list[str]):
    """(gate, clean (K, C), adversarial (K, C)) for the first and last gate of the first SE group."""
    if exc.empty or not groups or attack is None:
        return []
    sub = exc[exc.model.isin(groups[0]["se"]) & (exc.attack == attack)]
    gates = list(dict.fromkeys(sub.site))
    k = len(classes) if classes else int(sub.label.max()) + 1
    out = []
    for gate in dict.fromkeys([gates[0], gates[-1]] if gates else []):
        clean, adv = (_class_means(sub[(sub.site == gate) & np.isclose(sub.eps, e)], k) for e in (0.0, eps))
        out.append((gate, clean, adv))
    return out


def _class_means(t: Any, k: int) -> np.ndarray:
    """(k, channels) mean excitation per class over the models (NaN where a class has none)."""
    vecs: dict[int, list[np.ndarray]] = {}
    for _, r in t.iterrows():
        vecs.setdefault(int(r.label), []).append(np.asarray(json.loads(r["mean"])))
    width = len(next(iter(vecs.values()))[0]) if vecs else 1
    m = np.full((k, width), np.nan)
    for c, vs in vecs.items():
        if c < k:
            m[c] = np.mean(vs, axis=0)
    return m


def _gallery(gal: Any, ex: Any, groups: list[dict[str, Any]], attack: str | None, eps: float, classes: list[str]):
    """Gallery items for the first SE model and its first plain twin: up to 3 examples each."""
    if gal.empty or not groups or attack is None:
        return []
    names = _class_names(classes)
    items = []
    for model in (groups[0]["se"][0], groups[0]["plain"][0]):
        g = gal[(gal.model == model) & (gal.attack == attack)]
        clean = g[g.eps == 0].set_index("idx")
        adv = g[np.isclose(g.eps, eps)].set_index("idx")
        e = ex[(ex.model == model) & (ex.attack == attack) & np.isclose(ex.eps, eps)].set_index("idx")
        items += [_gallery_item(model, clean, adv, e, idx, names) for idx in list(adv.index)[:3]
                  if idx in clean.index and idx in e.index]  # fmt: skip
    return items


def _gallery_item(model: str, clean: Any, adv: Any, e: Any, idx: Any, names: list[str]) -> dict[str, Any]:
    def name(i: int) -> str:
        return names[i] if 0 <= i < len(names) else str(i)

    return {
        "model": model,
        "clean": _image(clean.loc[idx, "image"], clean.loc[idx, "shape"]),
        "adv": _image(adv.loc[idx, "image"], adv.loc[idx, "shape"]),
        "label": name(int(e.loc[idx, "label"])),
        "clean_pred": name(int(e.loc[idx, "clean_pred"])),
        "adv_pred": name(int(e.loc[idx, "adv_pred"])),
    }


def write_tables(data: RunData, a: Analysis) -> dict[str, Path]:
    """Write ``stats.csv`` (the seed-level verdicts), ``gate_effects.csv``, ``adaptive_damping.csv``,
    ``damping.csv`` (channel gain), ``interventions.csv`` (transfer), ``blocks.csv`` (every probed
    site's summary per cell), ``squeeze.csv`` (its SE-site rows: the premise) and ``ratios.csv``
    (premise and mechanism ratios at the seed level)."""
    run = data.target
    csv = {
        "stats": run / "stats.csv",
        "gate_effects": run / "gate_effects.csv",
        "adaptive_damping": run / "adaptive_damping.csv",
        "damping": run / "damping.csv",
        "interventions": run / "interventions.csv",
        "blocks": run / "blocks.csv",
        "squeeze": run / "squeeze.csv",
        "ratios": run / "ratios.csv",
    }
    sites = data.sites.drop(columns=["cell_id"], errors="ignore")
    tables = {
        "stats": a.comparison, "gate_effects": a.gate_effects, "adaptive_damping": a.adaptive,
        "damping": a.damping if a.damping is not None else pd.DataFrame(), "interventions": a.interventions,
        "blocks": sites, "squeeze": sites[sites.kind == "squeeze"] if "kind" in sites else sites.iloc[:0],
        "ratios": a.ratios,
    }  # fmt: skip
    for key, table in tables.items():
        write_text(csv[key], table.to_csv(index=False))
    return csv
