"""The experiment's answer at the seed level (README "Statistics and the verdict"): SE vs its plain
twin and vs the static-gate control per measurement and eps, the primary endpoint and the
exploratory rest, the gates' causal effect (held − adaptive, white-box) and adaptive damping
under attack vs noise. Tables in, tables out (numpy and pandas; no torch).

Every comparison pairs models by seed (:func:`robustse.stats.compare_twins`): the trained model is
the unit of replication and the examples, shared by all models, add their own sampling variance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from . import stats as S
from ._types import intervention_label
from .attack_roles import attack_role

PRIMARY = "robust_accuracy"
# Equivalence margins per measurement (the same units as the measurement): ±1 pp of accuracy or
# flip rate, ±0.05 in log sensitivity ratio (about 5%), ±0.02 in mean log adaptive damping.
MARGINS: dict[str, float] = {
    "robust_accuracy": 0.01,
    "flip_rate": 0.01,
    "log_sensitivity_vs_noise": 0.05,
    "log_adaptive_damping": 0.02,
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

    The measurements of :func:`robustse.stats.comparison_table`. Rows of the ``primary``
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


def _effect_rows(g, what, pairs, worst, alpha, margin) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
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


# --------------------------------------------------------------------------- adaptive damping

ADAPTIVE_COLUMNS = [
    "arm", "family", "attack", "eps", "attack_damping", "noise_damping", "ratio", "ci_low", "ci_high", "p",
    "p_adjusted", "verdict", "n_pairs", "n_examples",
]  # fmt: skip


def adaptive_damping_table(
    site_examples: pd.DataFrame | None, models: pd.DataFrame, *, alpha: float = 0.05
) -> pd.DataFrame:
    """Adaptive damping ‖Δy‖/‖s⊙Δu‖ under each attack vs under the noise control at the same
    eps, per SE model the geometric mean over gates and examples; the attack/noise ratio with its
    CI over seeds (paired per model and example, on logs) and Holm across eps per attack. A ratio
    below 1 with verdict ``attack damped more``: the gates' reaction shrinks adversarial
    perturbations more than random ones."""
    log = _log_adaptive(site_examples)
    rows: list[dict[str, Any]] = []
    if log is None:
        return pd.DataFrame(rows, columns=ADAPTIVE_COLUMNS)
    for g in se_groups(models):
        rows += _adaptive_rows(g, log[log.model.isin(g["se"])], g["se"], alpha)
    return pd.DataFrame(rows, columns=ADAPTIVE_COLUMNS)


def _log_adaptive(site_examples: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per model, attack, eps and example: the mean over gates of log adaptive damping."""
    if site_examples is None or site_examples.empty:
        return None
    d = site_examples[(site_examples.metric == "adaptive_damping") & (site_examples.eps > 0)]
    d = d[d.value > 0]
    if d.empty:
        return None
    d = d.assign(value=np.log(d.value.to_numpy(dtype=float)))
    return d.groupby(["model", "attack", "norm", "eps", "idx"], as_index=False).value.mean()


def _adaptive_rows(g: dict[str, Any], log: pd.DataFrame, se: list[str], alpha: float) -> list[dict[str, Any]]:
    rows = []
    controls = {a for a in set(log.attack) if attack_role(a) == "control"}
    for attack in [a for a in dict.fromkeys(log.attack) if attack_role(a) == "attack"]:
        comps, eps_list = [], []
        for eps in sorted(set(log[log.attack == attack].eps)):
            at = log[(log.attack == attack) & (log.eps == eps)]
            noise = log[log.attack.isin(controls) & (log.eps == eps) & log.norm.isin(set(at.norm))]
            a = at.pivot_table(index="model", columns="idx", values="value").reindex(se)
            b = noise.pivot_table(index="model", columns="idx", values="value").reindex(index=se, columns=a.columns)
            if a.isna().all().all() or b.isna().all().all():
                continue
            comps.append(S.compare_paired_models(a.to_numpy(), b.to_numpy(), alpha=alpha,
                                                 margin=MARGINS["log_adaptive_damping"]))  # fmt: skip
            eps_list.append(float(eps))
        rows += [_adaptive_row(g, attack, eps, c) for eps, c in zip(eps_list, S.adjust_family(comps), strict=True)]
    return rows


def _adaptive_row(g: dict[str, Any], attack: str, eps: float, c: Any) -> dict[str, Any]:
    verdict = {"a damps": "attack damped more", "a amplifies": "noise damped more"}.get(c.verdict, c.verdict)
    return {
        "arm": g["arm"], "family": g["family"], "attack": attack, "eps": eps,
        "attack_damping": float(np.exp(c.se_mean)), "noise_damping": float(np.exp(c.plain_mean)),
        "ratio": float(np.exp(c.diff)), "ci_low": float(np.exp(c.ci_low)), "ci_high": float(np.exp(c.ci_high)),
        "p": c.p, "p_adjusted": c.p_adjusted, "verdict": verdict, "n_pairs": c.n_pairs, "n_examples": c.n_examples,
    }  # fmt: skip


# --------------------------------------------------------------------------- the Answer

PERCENT_MEASURES = ("robust_accuracy", "flip_rate")


def _closest(table: pd.DataFrame, eps: float) -> pd.DataFrame:
    """The rows of ``table`` at the eps closest to ``eps``."""
    if table.empty:
        return table
    at = table.eps.iloc[(table.eps - eps).abs().to_numpy().argmin()]
    return table[table.eps == at]


def _effect(diff: float, lo: float, hi: float, percent: bool) -> str:
    if percent:
        return f"{100 * diff:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"{diff:+.3g} [{lo:+.3g}, {hi:+.3g}]"


def _outcome(verdicts: pd.DataFrame, eps: float, primary: str) -> str:
    rows = _closest(verdicts[verdicts.endpoint == "primary"], eps)
    if rows.empty:
        return (
            "Outcome: no SE model has a plain twin or static control with the same seed here, so there is no verdict."
        )
    percent = primary in PERCENT_MEASURES
    parts = [
        f"SE − {r.baseline} = {_effect(r.diff, r.ci_low, r.ci_high, percent)} over {r.n_pairs} seed pairs "
        f"(Holm p = {r.p_adjusted:.2g}): {r.verdict}"
        for r in rows.itertuples()
    ]
    name = primary.replace("_", " ") + (" (worst case over the attacks)" if primary == PRIMARY else "")
    return f"Outcome — primary endpoint {name} at eps = {rows.eps.iloc[0]:g}: " + "; ".join(parts) + "."


def _cause(effects: pd.DataFrame, eps: float) -> str:
    rows = _closest(effects[effects.intervention == "held_gates"], eps)
    if rows.empty:
        return ("Cause: not measured — the sweep attacked no held-gates intervention "
                "(list it in [sweep] interventions).")  # fmt: skip
    r = rows.iloc[0]
    return (
        f"Cause — with every gate held at its clean value (same weights, attacked white-box) robust accuracy "
        f"at eps = {r.eps:g} changes by {_effect(r['diff'], r.ci_low, r.ci_high, True)} over {r.n_pairs} models "
        f"(Holm p = {r.p_adjusted:.2g}): {r.verdict}."
    )


def _mechanism(adaptive: pd.DataFrame, eps: float, main: str | None) -> str:
    rows = _closest(adaptive[adaptive.attack == main] if main in set(adaptive.attack) else adaptive, eps)
    if rows.empty:
        return "Mechanism: not measured — no SE model was probed (probes off, or no SE model)."
    r = rows.iloc[0]
    return (
        f"Mechanism — at eps = {r.eps:g} the gates' reaction scales the SE output change by "
        f"{r.attack_damping:.3f} under {r.attack} and {r.noise_damping:.3f} under random noise (geometric means of "
        f"‖Δy‖/‖s⊙Δu‖); attack/noise = {r.ratio:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] over {r.n_pairs} models "
        f"(Holm p = {r.p_adjusted:.2g}): {r.verdict}."
    )


def answer(
    verdicts: pd.DataFrame,
    gate_effects: pd.DataFrame,
    adaptive: pd.DataFrame,
    *,
    eps: float,
    primary: str = PRIMARY,
    main: str | None = None,
) -> list[str]:
    """The report's Answer, three sentences generated from the tables at (the eps closest to)
    ``eps``: outcome (primary endpoint, SE vs plain and vs static), cause (held − adaptive gates)
    and mechanism (adaptive damping, attack vs noise), each with effect, CI, pairs and verdict."""
    return [_outcome(verdicts, eps, primary), _cause(gate_effects, eps), _mechanism(adaptive, eps, main)]
