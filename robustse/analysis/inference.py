"""The experiment's answer at the seed level (README "Statistics and the verdict"): SE vs its plain
twin and vs the static-gate control per measurement and eps, the primary endpoint and the
exploratory rest, and the gates' causal effect (held − adaptive, white-box); the ratio
measurements are in :mod:`robustse.analysis.ratios`, the Answer in :mod:`robustse.analysis.answer`. Tables in,
tables out (numpy and pandas; no torch).

Every comparison pairs models by seed (:func:`robustse.analysis.stats.compare_twins`): the trained model is
the unit of replication and the examples, shared by all models, add their own sampling variance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from robustse.analysis import stats as S
from robustse.core.types import intervention_label

PRIMARY = "robust_accuracy"
PERCENT_MEASURES = ("robust_accuracy", "flip_rate")  # fractions, shown in percentage points
# Equivalence margins per measurement (the same units as the measurement): ±1 pp of accuracy or
# flip rate, ±0.05 in log sensitivity ratio (about 5%); the ratio measurements' margins are in
# robustse.analysis.ratios.MARGINS.
MARGINS: dict[str, float] = {
    "robust_accuracy": 0.01,
    "flip_rate": 0.01,
    "log_sensitivity_vs_noise": 0.05,
}
VERDICT_COLUMNS = [
    "arm", "family", "baseline", "endpoint", "measurement", "attack", "eps", "se_mean", "base_mean", "diff",
    "ci_low", "ci_high", "p", "p_adjusted", "p_equivalence", "margin", "verdict", "n_pairs", "n_examples",
    "higher_is_damping",
]  # fmt: skip


# --------------------------------------------------------------------------- seed pairs


def pair_groups(models: pd.DataFrame) -> list[dict[str, Any]]:
    """Seed pairs to compare: per (arm, family) the SE models against their plain twins and, where
    trained, against the static controls with the same seed (an arm without its own baselines
    uses the first arm's).

    Returns:
        ``[{"arm", "family", "baseline": "plain" | "static", "pairs": [(se label, base label)]}]``.
    """
    models = models.assign(_kind=S.model_kinds(models))
    arms = list(dict.fromkeys(models.arm))
    groups = []
    for arm in arms:
        for family in dict.fromkeys(models[models.arm == arm].family):
            se = models[(models.arm == arm) & (models.family == family) & (models._kind == "se")]
            for baseline in ("plain", "static"):
                pairs = _pairs_by_seed(se, _baselines(models, arms, arm, family, baseline))
                if pairs:
                    groups.append({"arm": arm, "family": family, "baseline": baseline, "pairs": pairs})
    return groups


def se_groups(models: pd.DataFrame) -> list[dict[str, Any]]:
    """The SE models per (arm, family), baseline or not: ``[{"arm", "family", "se": [labels]}]``
    (what the gates' own effect and adaptive damping are measured over)."""
    models = models.assign(_kind=S.model_kinds(models))
    se = models[models._kind == "se"]
    return [
        {"arm": arm, "family": family, "se": list(rows.label)}
        for (arm, family), rows in se.groupby(["arm", "family"], sort=False)
    ]


def _baselines(models: pd.DataFrame, arms: list[str], arm: str, family: str, kind: str) -> pd.DataFrame:
    rows = models[(models.family == family) & (models._kind == kind)]
    own = rows[rows.arm == arm]
    return own if not own.empty else rows[rows.arm == arms[0]]


def _pairs_by_seed(se: pd.DataFrame, base: pd.DataFrame) -> list[tuple[str, str]]:
    by_seed = dict(zip(base.seed, base.label, strict=True))
    return [(s, by_seed[k]) for s, k in zip(se.label, se.seed, strict=True) if k in by_seed]


def paired_matrices(table: pd.DataFrame, pairs: list[tuple[str, str]], column: str) -> tuple[np.ndarray, np.ndarray]:
    """(pairs, examples) matrices of ``column`` for the two sides of each pair, examples by idx."""
    wide = table.pivot_table(index="model", columns="idx", values=column, aggfunc="first")
    a = wide.reindex([p[0] for p in pairs]).to_numpy(dtype=np.float64)
    b = wide.reindex([p[1] for p in pairs]).to_numpy(dtype=np.float64)
    return a, b


# --------------------------------------------------------------------------- SE vs baselines


def verdict_table(
    examples: pd.DataFrame,
    models: pd.DataFrame,
    *,
    site_examples: pd.DataFrame | None = None,
    alpha: float = 0.05,
    primary: str = PRIMARY,
    margins: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """SE − baseline per (arm, family, baseline, measurement, attack, eps > 0), by seed pairs.

    The measurements of :func:`robustse.analysis.stats.comparison_jobs`. Rows of the ``primary``
    measurement are the primary endpoint, Holm-corrected across their eps (and attacks); every
    other row is secondary (exploratory), Holm-corrected across the whole secondary family of its
    (arm, family, baseline). ``equivalent`` uses the margin of the measurement (:data:`MARGINS`,
    updated by ``margins``); measurements without one never get it.
    """
    margins = {**MARGINS, **(margins or {})}
    ex = examples[examples.eps > 0].copy()
    ex["flip_rate"] = (ex.adv_pred != ex.clean_pred).astype(float)
    ex = S.with_noise_ratio(ex)
    worst = S.worst_case_examples(ex)
    last = S.last_block_amplification(site_examples)
    rows: list[dict[str, Any]] = []
    for g in pair_groups(models):
        labels = {"se": [p[0] for p in g["pairs"]], "plain": [p[1] for p in g["pairs"]]}
        for job in S.comparison_jobs(labels, ex, worst, last):
            rows += _compare_job(g, job, alpha, margins.get(job.measure))
    table = pd.DataFrame(rows, columns=[c for c in VERDICT_COLUMNS if c not in ("endpoint", "p_adjusted")] + ["_c"])
    return _adjust(table, primary)


def _compare_job(g: dict[str, Any], job: Any, alpha: float, margin: float | None) -> list[dict[str, Any]]:
    out = []
    for eps in sorted(set(job.table.eps)):
        a, b = paired_matrices(job.table[job.table.eps == eps], g["pairs"], job.column)
        if np.isnan(a).all() or np.isnan(b).all():
            continue
        c = S.compare_twins(a, b, alpha=alpha, margin=margin, higher_is_damping=job.higher_is_damping)
        out.append(
            {
                "arm": g["arm"], "family": g["family"], "baseline": g["baseline"], "measurement": job.measure,
                "attack": job.attack, "eps": float(eps), "se_mean": c.se_mean, "base_mean": c.plain_mean,
                "diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "p": c.p,
                "p_equivalence": c.p_equivalence, "margin": margin, "verdict": c.verdict, "n_pairs": c.n_pairs,
                "n_examples": c.n_examples, "higher_is_damping": job.higher_is_damping, "_c": c,
            }
        )  # fmt: skip
    return out


def _adjust(table: pd.DataFrame, primary: str) -> pd.DataFrame:
    """Endpoint labels and Holm within each family: (arm, family, baseline, endpoint)."""
    table["endpoint"] = np.where(table.measurement == primary, "primary", "secondary")
    table["p_adjusted"] = np.nan
    for _, idx in table.groupby(["arm", "family", "baseline", "endpoint"], sort=False).groups.items():
        adjusted = S.adjust_family(list(table.loc[idx, "_c"]))
        table.loc[idx, "p_adjusted"] = [c.p_adjusted for c in adjusted]
        table.loc[idx, "verdict"] = [c.verdict for c in adjusted]
    return table.drop(columns="_c")[VERDICT_COLUMNS]


# --------------------------------------------------------------------------- the gates' effect

GATE_EFFECT_COLUMNS = [
    "arm", "family", "intervention", "eps", "intervention_mean", "adaptive_mean", "diff", "ci_low", "ci_high",
    "p", "p_adjusted", "verdict", "n_pairs", "n_examples", "intervention_clean", "adaptive_clean",
]  # fmt: skip
# held − adaptive robust accuracy: > 0 means the gates' reaction to the perturbation hurts
REACTION = {"a damps": "reaction hurts", "a amplifies": "reaction helps"}


def gate_effect_table(
    examples: pd.DataFrame, models: pd.DataFrame, *, alpha: float = 0.05, margin: float | None = 0.01
) -> pd.DataFrame:
    """Worst-case robust accuracy of each gate intervention (attacked white-box) minus the intact
    SE model's, paired per model and example, per (arm, family, intervention, eps > 0); Holm
    across the eps of each intervention. Verdicts: ``reaction hurts`` (the intervention is more
    robust), ``reaction helps``, ``equivalent``, ``inconclusive``, ``too few seeds``."""
    worst = S.worst_case_examples(examples[examples.eps > 0])
    clean = examples[examples.eps == 0].groupby("model").correct.mean()  # its own clean accuracy
    present = set(worst.model)
    rows: list[dict[str, Any]] = []
    for g in se_groups(models):
        se = g["se"]
        for what in ("held_gates", "frozen_mean"):
            pairs = [(intervention_label(s, what), s) for s in se if intervention_label(s, what) in present]
            if pairs:
                extra = {"intervention_clean": _mean_of(clean, [p[0] for p in pairs]),
                         "adaptive_clean": _mean_of(clean, [p[1] for p in pairs])}  # fmt: skip
                rows += [r | extra for r in _effect_rows(g, what, pairs, worst, alpha, margin)]
    return pd.DataFrame(rows, columns=GATE_EFFECT_COLUMNS)


def _mean_of(values: pd.Series, labels: list[str]) -> float:
    """The mean of ``values`` over the models ``labels`` that have one (NaN if none)."""
    present = values.reindex(labels).dropna()
    return float(present.mean()) if len(present) else float("nan")


def _effect_rows(g, what, pairs, worst, alpha, margin) -> list[dict[str, Any]]:
    comps, eps_list = [], []
    for eps in sorted(set(worst.eps)):
        a, b = paired_matrices(worst[worst.eps == eps], pairs, "correct")
        if np.isnan(a).all() or np.isnan(b).all():
            continue
        comps.append(S.compare_paired_models(a, b, alpha=alpha, margin=margin, higher_is_damping=True))
        eps_list.append(float(eps))
    return [
        {
            "arm": g["arm"], "family": g["family"], "intervention": what, "eps": eps, "intervention_mean": c.se_mean,
            "adaptive_mean": c.plain_mean, "diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "p": c.p,
            "p_adjusted": c.p_adjusted, "verdict": REACTION.get(c.verdict, c.verdict), "n_pairs": c.n_pairs,
            "n_examples": c.n_examples,
        }
        for eps, c in zip(eps_list, S.adjust_family(comps), strict=True)
    ]  # fmt: skip
