"""Stage 2 of the report: the statistics tables (:mod:`~robustse.analysis.inference`,
:mod:`~robustse.analysis.ratios`, :mod:`~robustse.analysis.answer`) and the curves the figures draw,
as one :class:`Analysis`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from robustse.analysis import answer as A
from robustse.analysis import inference as I
from robustse.analysis import ratios as R
from robustse.analysis import stats as S
from robustse.analysis.rundata import ReportOptions, RunData
from robustse.core.roles import names_with_role


@dataclass
class Analysis:
    """Stage 2 (:func:`analyse`): the statistics tables and the curves behind the figures."""

    comparison: pd.DataFrame  # the seed-level verdict table (robustse.analysis.inference.verdict_table)
    damping: pd.DataFrame | None
    interventions: pd.DataFrame
    groups: list[dict[str, Any]]
    main: str | None
    eps: list[float]
    gallery_eps: float
    gate_effects: pd.DataFrame
    adaptive: pd.DataFrame
    answer: list[str]
    answers: list[A.Answer]
    ratios: pd.DataFrame
    acc_curves: pd.DataFrame
    sens_curves: pd.DataFrame
    drift_sites: pd.DataFrame
    profile: pd.DataFrame
    warnings: list[str] = field(default_factory=list)  # fallbacks the caller should hear about


# --------------------------------------------------------------------------- stage 2: analyse


def analyse(data: RunData, opts: ReportOptions, log: Callable[[str], None] | None = None) -> Analysis:
    """The statistics (:mod:`robustse.analysis.stats`) and the curves the figures draw."""
    ex, models, site_ex = data.examples, data.models, data.site_examples
    kw = _resampling(opts)
    comparison = I.verdict_table(
        ex, models, site_examples=site_ex, alpha=opts.alpha, primary=opts.primary, margins=opts.margins
    )
    damp = S.damping_table(site_ex, models, **kw) if not site_ex.empty else None
    inter = S.intervention_table(ex, models, alpha=opts.alpha)
    groups = S.twin_groups(models)
    if log:
        log(f"statistics: {len(comparison)} seed-pair comparisons, {len(groups)} twin group(s)")
    eps_all = sorted(e for e in set(ex.eps) if e > 0)
    main = _main_attack(list(dict.fromkeys(ex.attack)))
    g_eps = _gallery_eps(eps_all, opts.gallery_eps)
    effects = I.gate_effect_table(ex, models, alpha=opts.alpha)
    adaptive = R.adaptive_damping_table(site_ex, models, alpha=opts.alpha)
    ratios = R.ratio_table(ex, site_ex, models, main=main, alpha=opts.alpha)
    answers = A.answers(A.Tables(comparison, effects, ratios, g_eps, opts.primary, main), models)
    return Analysis(
        comparison=comparison, damping=damp, interventions=inter, groups=groups, main=main, eps=eps_all,
        gallery_eps=g_eps, gate_effects=effects, adaptive=adaptive,
        warnings=_gallery_warning(eps_all, opts.gallery_eps, g_eps),
        answer=[s for a in answers for s in a.sentences()], answers=answers, ratios=ratios,
        acc_curves=_accuracy_curves(ex, models, groups, opts),
        sens_curves=_sensitivity_curves(ex, groups, main, opts), drift_sites=_drift_sites(data.sites, models, groups),
        profile=_profile(data.sites, models, main),
    )  # fmt: skip


def _resampling(opts: ReportOptions) -> dict[str, Any]:
    return {"n_boot": opts.n_boot, "alpha": opts.alpha, "seed": opts.seed}


def _gallery_eps(eps_all: list[float], wanted: float | None) -> float:
    """``wanted`` if the ladder has it, else the middle of the ladder (0 without one)."""
    if wanted is not None and wanted in eps_all:
        return wanted
    return eps_all[len(eps_all) // 2] if eps_all else 0.0


def _gallery_warning(eps_all: list[float], wanted: float | None, used: float) -> list[str]:
    """A line saying the wanted gallery eps fell back to another rung (none when it did not)."""
    if wanted is None or used == wanted:
        return []
    ladder = ", ".join(f"{e:g}" for e in eps_all)
    return [f"gallery eps {wanted:g} is not on the ladder ({ladder}); the Answer, the gallery and the heatmaps "
            f"use eps = {used:g}"]  # fmt: skip


def _main_attack(attacks: list[str]) -> str | None:
    """The attack the headline figures use: PGD if present, else the first attack on the label."""
    real = names_with_role(attacks, "attack")
    if "pgd" in real:
        return "pgd"
    return real[0] if real else None


def _compared(main: str | None, names: Iterable[str]) -> list[str | None]:
    """The main attack, then the controls among ``names`` (the noise control: same norm and eps)."""
    return [main, *names_with_role(names, "control")]


def _twins(group: dict[str, Any]) -> tuple[tuple[bool, list[str]], ...]:
    return (False, group["plain"]), (True, group["se"])


def _concat(rows: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["arm", "family", "se"])


def _accuracy_curves(
    examples: pd.DataFrame, models: pd.DataFrame, groups: list[dict[str, Any]], opts: ReportOptions
) -> pd.DataFrame:
    """Worst-case robust accuracy vs eps per family member (plain, SE and, where trained, the static
    control), mean over seeds with its bootstrap CI; ``kind`` names the member."""
    worst = S.worst_case_examples(examples)
    rows = []
    for g in groups:
        members = {"plain": g["plain"], "se": g["se"], "static": _statics(models, g)}
        for kind, labels in members.items():
            if labels:
                curve = S.group_curve(worst, labels, "correct", **_resampling(opts))
                rows.append(curve.assign(arm=g["arm"], family=g["family"], se=kind == "se", kind=kind))
    return _concat(rows)


def _statics(models: pd.DataFrame, g: dict[str, Any]) -> list[str]:
    """The static controls of a twin group: its arm's, else those of the arm its plain twins came from."""
    kinds = S.model_kinds(models)
    for arm in (g["arm"], g["plain_arm"]):
        rows = models[(kinds == "static") & (models.arm == arm) & (models.family == g["family"])]
        if not rows.empty:
            return list(rows.label)
    return []


def _sensitivity_curves(
    examples: pd.DataFrame, groups: list[dict[str, Any]], main: str | None, opts: ReportOptions
) -> pd.DataFrame:
    """Logit sensitivity vs eps per twin under the main attack and under the controls."""
    subs = {}
    for attack in _compared(main, examples.attack):
        sub = examples[(examples.attack == attack) & (examples.eps > 0)]
        if not (sub.empty or sub.logit_sensitivity.isna().all()):
            subs[attack] = sub
    rows = [
        S.group_curve(sub, labels, "logit_sensitivity", **_resampling(opts)).assign(
            arm=g["arm"], family=g["family"], se=se, attack=attack
        )
        for g in groups
        for se, labels in _twins(g)
        for attack, sub in subs.items()
    ]
    return _concat(rows)


def _drift_sites(sites: pd.DataFrame, models: pd.DataFrame, groups: list[dict[str, Any]]) -> pd.DataFrame:
    """Gate drift of the SE models under every perturbation but the controls."""
    se_labels = [lab for g in groups for lab in g["se"]] or list(models[models.se].label)
    controls = names_with_role(sites.attack, "control")
    return sites[(sites.metric == "gate_drift") & sites.model.isin(se_labels) & ~sites.attack.isin(controls)]


def _profile(sites: pd.DataFrame, models: pd.DataFrame, main: str | None) -> pd.DataFrame:
    """Amplification per block under the main attack and the controls, with each model's twin columns."""
    amp = sites[(sites.metric == "amplification") & sites.attack.isin(_compared(main, sites.attack))]
    return amp.merge(models[["label", "arm", "family", "se"]].rename(columns={"label": "model"}), on="model")
