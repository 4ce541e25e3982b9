"""Ratio measurements at the seed level (README "Statistics and the verdict"): the premise
(squeeze attenuation), the gates' reaction end to end (output reaction) and per gate (adaptive
damping), each under an attack against the noise control at the same eps, and the premise of
the SE twin against its plain twin and static control. Tables in, tables out (no torch).

Every ratio is analysed on logs, one value per model and example (the mean over a model's sites
of the log ratio, i.e. a geometric mean over sites), so ``exp`` of a mean difference is a ratio
of geometric means. Attack vs noise pairs each model with itself (:func:`robustse.analysis.stats.compare_paired_models`:
the model is the unit); SE vs plain pairs models by seed (:func:`robustse.analysis.stats.compare_twins`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from robustse.analysis import stats as S
from robustse.analysis.inference import pair_groups
from robustse.core.roles import attack_role

# Equivalence margins on the log scale: ±0.02 ≈ ±2 % for the gates' reaction, ±0.05 ≈ ±5 % for
# squeeze attenuation (which varies over a far wider range between attacks and noise).
MARGINS: dict[str, float] = {
    "log_adaptive_damping": 0.02,
    "log_output_reaction": 0.02,
    "log_squeeze_attenuation": 0.05,
}
RATIO_COLUMNS = [
    "arm", "family", "measurement", "models", "comparison", "attack", "eps",
    "a_value", "a_ci_low", "a_ci_high", "b_value", "b_ci_low", "b_ci_high",
    "ratio", "ci_low", "ci_high", "p", "p_adjusted", "margin", "verdict", "n_models", "n_examples",
]  # fmt: skip
# Verdict words of attack / noise for each measurement (the ratio < 1 side first).
WORDS = {
    "adaptive_damping": ("attack damped more", "noise damped more"),
    "output_reaction": ("attack damped more", "noise damped more"),
    "squeeze_attenuation": ("attack attenuated more", "noise attenuated more"),
}
TWIN_WORDS = ("SE lower", "SE higher")  # SE / baseline: lower is the damping side of every ratio


@dataclass(frozen=True)
class LogValues:
    """Per model, attack, norm, eps and example: the log of one ratio measurement."""

    measurement: str
    table: pd.DataFrame  # columns model, attack, norm, eps, idx, value


def log_site_metric(site_examples: pd.DataFrame | None, metric: str, kind: str | None = None) -> LogValues:
    """The mean over a model's sites of ln(``metric``) per example (positive values only)."""
    empty = pd.DataFrame(columns=["model", "attack", "norm", "eps", "idx", "value"])
    if site_examples is None or site_examples.empty:
        return LogValues(metric, empty)
    d = site_examples[(site_examples.metric == metric) & (site_examples.eps > 0)]
    if kind is not None and "kind" in d:
        d = d[d.kind == kind]
    d = d[d.value > 0]
    if d.empty:
        return LogValues(metric, empty)
    d = d.assign(value=np.log(d.value.to_numpy(dtype=float)))
    return LogValues(metric, d.groupby(["model", "attack", "norm", "eps", "idx"], as_index=False).value.mean())


def log_output_reaction(examples: pd.DataFrame) -> LogValues:
    """ln(‖f(x′)−f(x)‖ adaptive / ‖f(x′)−f(x)‖ with every gate held at s(x)) per example: the
    logit sensitivity over the ``clean_gates`` sensitivity of the same x′ (‖δ‖ cancels)."""
    need = {"logit_sensitivity", "cg_sensitivity"}
    if not need <= set(examples.columns):
        return LogValues("output_reaction", pd.DataFrame(columns=["model", "attack", "norm", "eps", "idx", "value"]))
    d = examples[(examples.eps > 0) & (examples.logit_sensitivity > 0) & (examples.cg_sensitivity > 0)]
    value = np.log(d.logit_sensitivity.to_numpy(dtype=float) / d.cg_sensitivity.to_numpy(dtype=float))
    return LogValues("output_reaction", d.assign(value=value)[["model", "attack", "norm", "eps", "idx", "value"]])


def _matrix(table: pd.DataFrame, labels: list[str], columns: Any = None) -> pd.DataFrame:
    wide = table.pivot_table(index="model", columns="idx", values="value", aggfunc="first")
    return wide.reindex(index=labels, columns=columns if columns is not None else wide.columns)


def _one_sample(m: np.ndarray, alpha: float) -> S.TwinComparison:
    """The mean of ``m`` (models, examples) against 0 with the paired-model interval."""
    return S.compare_paired_models(m, np.zeros_like(m), alpha=alpha)


def attack_vs_noise(logs: LogValues, labels: list[str], *, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Rows of attack / noise per attack on the label and eps for the models ``labels``, Holm across
    the eps of each attack; the ratio's verdict uses :data:`MARGINS` of the measurement."""
    log, out = logs.table[logs.table.model.isin(labels)], []
    margin = MARGINS[f"log_{logs.measurement}"]
    controls = {a for a in set(log.attack) if attack_role(a) == "control"}
    for attack in [a for a in dict.fromkeys(log.attack) if attack_role(a) == "attack"]:
        done = []
        for eps in sorted(set(log[log.attack == attack].eps)):
            at = log[(log.attack == attack) & (log.eps == eps)]
            noise = log[log.attack.isin(controls) & (log.eps == eps) & log.norm.isin(set(at.norm))]
            a = _matrix(at, labels)
            b = _matrix(noise, labels, a.columns)
            if a.isna().all().all() or b.isna().all().all():
                continue
            a_np, b_np = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
            c = S.compare_paired_models(a_np, b_np, alpha=alpha, margin=margin)
            done.append((eps, c, _one_sample(a_np, alpha), _one_sample(b_np, alpha)))
        adjusted = S.adjust_family([d[1] for d in done])
        out += [
            _ratio_row(logs.measurement, attack, eps, c, ca, cb)
            for (eps, _, ca, cb), c in zip(done, adjusted, strict=True)
        ]
    return out


def _ratio_row(
    measurement: str, attack: str, eps: float, c: Any, ca: Any, cb: Any, comparison: str = "attack / noise"
) -> dict[str, Any]:
    words = WORDS.get(measurement, ("a lower", "a higher")) if comparison == "attack / noise" else TWIN_WORDS
    verdict = dict(zip(c.labels, words, strict=True)).get(c.verdict, c.verdict)  # the direction in words
    e = np.exp
    return {
        "measurement": measurement, "comparison": comparison, "attack": attack, "eps": float(eps),
        "a_value": float(e(ca.diff)), "a_ci_low": float(e(ca.ci_low)), "a_ci_high": float(e(ca.ci_high)),
        "b_value": float(e(cb.diff)), "b_ci_low": float(e(cb.ci_low)), "b_ci_high": float(e(cb.ci_high)),
        "ratio": float(e(c.diff)), "ci_low": float(e(c.ci_low)), "ci_high": float(e(c.ci_high)), "p": c.p,
        "p_adjusted": c.p_adjusted, "margin": c.margin, "verdict": verdict, "n_models": c.n_pairs,
        "n_examples": c.n_examples,
    }  # fmt: skip


def twin_ratio(
    logs: LogValues, pairs: list[tuple[str, str]], attack: str, *, alpha: float = 0.05
) -> list[dict[str, Any]]:
    """SE / baseline of one measurement under ``attack`` per eps, over seed pairs (Holm across eps)."""
    log = logs.table[logs.table.attack == attack]
    margin = MARGINS[f"log_{logs.measurement}"]
    done = []
    for eps in sorted(set(log.eps)):
        at = log[log.eps == eps]
        a = _matrix(at, [p[0] for p in pairs])
        b = _matrix(at, [p[1] for p in pairs], a.columns)
        if a.isna().all().all() or b.isna().all().all():
            continue
        a_np, b_np = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
        c = S.compare_twins(a_np, b_np, alpha=alpha, margin=margin, higher_is_damping=False)
        done.append((eps, c, _one_sample(a_np, alpha), _one_sample(b_np, alpha)))
    adjusted = S.adjust_family([d[1] for d in done])
    rows = []
    for (eps, _, ca, cb), c in zip(done, adjusted, strict=True):
        rows.append(_ratio_row(logs.measurement, attack, eps, c, ca, cb, comparison="SE / baseline"))
    return rows


def ratio_table(
    examples: pd.DataFrame, site_examples: pd.DataFrame | None, models: pd.DataFrame, *, main: str | None,
    alpha: float = 0.05,
) -> pd.DataFrame:  # fmt: skip
    """Every ratio analysis of a run, one row per (arm, family, measurement, models, comparison,
    attack, eps): squeeze attenuation attack / noise for the SE, plain and static models and SE /
    plain and SE / static under the main attack (the premise); output reaction and adaptive
    damping attack / noise for the SE models (the mechanism)."""

    kinds = models.assign(_kind=S.model_kinds(models))
    squeeze = log_site_metric(site_examples, "squeeze_attenuation", kind="squeeze")
    per_model = {"squeeze": squeeze, "reaction": log_output_reaction(examples),
                 "adaptive": log_site_metric(site_examples, "adaptive_damping")}  # fmt: skip
    rows: list[dict[str, Any]] = []
    for (arm, family), group in kinds.groupby(["arm", "family"], sort=False):
        where = {"arm": arm, "family": family}
        for kind in ("se", "plain", "static"):
            labels = list(group[group._kind == kind].label)
            jobs = [per_model["squeeze"]] + ([per_model["reaction"], per_model["adaptive"]] if kind == "se" else [])
            rows += [r | where | {"models": kind} for logs in jobs for r in attack_vs_noise(logs, labels, alpha=alpha)]
    for g in pair_groups(models):
        if main is not None:
            twins = twin_ratio(squeeze, g["pairs"], main, alpha=alpha)
            rows += [r | {"arm": g["arm"], "family": g["family"], "models": f"se vs {g['baseline']}"} for r in twins]
    return pd.DataFrame(rows, columns=RATIO_COLUMNS)


ADAPTIVE_COLUMNS = [
    "arm", "family", "attack", "eps", "attack_damping", "noise_damping", "ratio", "ci_low", "ci_high", "p",
    "p_adjusted", "verdict", "n_pairs", "n_examples",
]  # fmt: skip


def adaptive_damping_table(
    site_examples: pd.DataFrame | None, models: pd.DataFrame, *, alpha: float = 0.05
) -> pd.DataFrame:
    """Adaptive damping ‖Δy‖/‖s⊙Δu‖ under each attack vs the noise control at the same eps, per
    SE model the geometric mean over gates and examples: the attack/noise ratio with its CI over
    models, Holm across eps per attack (``adaptive_damping.csv``). Below 1 beyond the margin:
    ``attack damped more`` (the gates' reaction shrinks adversarial perturbations more than random ones)."""
    logs = log_site_metric(site_examples, "adaptive_damping")
    kinds = models.assign(_kind=S.model_kinds(models))
    rows = []
    for (arm, family), group in kinds[kinds._kind == "se"].groupby(["arm", "family"], sort=False):
        for r in attack_vs_noise(logs, list(group.label), alpha=alpha):
            rows.append({
                "arm": arm, "family": family, "attack": r["attack"], "eps": r["eps"], "attack_damping": r["a_value"],
                "noise_damping": r["b_value"], "ratio": r["ratio"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                "p": r["p"], "p_adjusted": r["p_adjusted"], "verdict": r["verdict"], "n_pairs": r["n_models"],
                "n_examples": r["n_examples"],
            })  # fmt: skip
    return pd.DataFrame(rows, columns=ADAPTIVE_COLUMNS)
