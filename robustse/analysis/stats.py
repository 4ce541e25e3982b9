"""Statistics: confidence intervals, SE − baseline differences over seed pairs, paired tests and
the verdict (README "Statistics and the verdict").

The trained model is the unit of replication: :func:`compare_twins` pairs models by seed and
gives a t interval whose variance adds the seed-pair term and the example-sampling term (the
examples are shared by every model), with Welch–Satterthwaite degrees of freedom;
:func:`compare_paired_models` does the same for one model measured two ways. Verdicts
(:data:`TWIN_VERDICTS`): a direction (``SE damps`` / ``SE amplifies``) for a Holm-adjusted p
below alpha whose estimate clears the measurement's equivalence margin, ``negligible`` for a
significant difference inside the margin, ``equivalent`` (two one-sided tests within the
margin), ``inconclusive``, and ``too few seeds`` below 5 pairs. The two-level bootstrap over
seeds and examples (:class:`Resampler`) draws only the descriptive bands of the figures and the
channel-gain table.

Only numpy, pandas and scipy here (no torch): tables in, tables out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from robustse.core.roles import attack_role, roles_of

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Better behaved than the normal approximation near 0 and 1, where robust accuracies live.

    Raises:
        ValueError: if ``n < 1`` or ``successes`` is outside ``[0, n]``.

    Example:
        >>> lo, hi = wilson_interval(92, 100)
        >>> round(lo, 3), round(hi, 3)
        (0.85, 0.959)
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1 (got {successes}/{n})")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# --------------------------------------------------------------------------- bootstrap


def _as_matrix(values: Any) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"expected a (seeds, examples) matrix, got shape {a.shape}")
    return a


class Resampler:
    """The random draws of one analysis: example weights and seed draws.

    A bootstrap replicate draws n examples with replacement; it is represented by its counts
    (a row of a (B, n) matrix), so a replicate's mean is one matrix product. Draws are made once
    per example count and reused by every comparison over the same examples (each interval is
    still a valid bootstrap interval; the tables are computed in seconds instead of minutes).
    """

    def __init__(self, *, n_boot: int = 2000, seed: int = 0) -> None:
        self.n_boot, self.seed = n_boot, seed
        self._weights: dict[int, np.ndarray] = {}
        self._seeds: dict[tuple[int, int], np.ndarray] = {}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def weights(self, n: int) -> np.ndarray:
        """(B, n) example counts, each row a draw of n examples with replacement."""
        if n not in self._weights:
            rng = self._rng(1, n)
            self._weights[n] = rng.multinomial(n, np.full(n, 1.0 / n), size=self.n_boot).astype(np.float64)
        return self._weights[n]

    def seeds(self, s: int, stream: int = 0) -> np.ndarray:
        """(B, s) seed indices drawn with replacement (``stream`` tells independent draws apart)."""
        if (s, stream) not in self._seeds:
            self._seeds[s, stream] = self._rng(2, s, stream).integers(0, s, size=(self.n_boot, s))
        return self._seeds[s, stream]

    def replicate_means(self, a: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """(B,) the mean over drawn seeds of the mean over drawn examples (NaN entries ignored)."""
        w = self.weights(a.shape[1])
        ok = ~np.isnan(a)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_seed = (w @ np.where(ok, a, 0.0).T) / (w @ ok.T)  # (B, S)
        picked = np.take_along_axis(per_seed, seeds, axis=1)
        with np.errstate(invalid="ignore"):
            return np.nanmean(picked, axis=1) if np.isnan(picked).any() else picked.mean(axis=1)


def bootstrap_mean(
    values: Any, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0, resampler: Resampler | None = None
) -> tuple[float, float, float]:
    """Mean of a (seeds, examples) matrix with a two-level bootstrap percentile CI.

    Returns:
        (mean, ci_low, ci_high); NaN entries are ignored.

    Example:
        >>> m, lo, hi = bootstrap_mean([[1.0, 0.0, 1.0, 1.0]] * 3, n_boot=500)
        >>> m, lo <= m <= hi
        (0.75, True)
    """
    a = _as_matrix(values)
    r = resampler or Resampler(n_boot=n_boot, seed=seed)
    dist = r.replicate_means(a, r.seeds(a.shape[0]))
    lo, hi = np.nanquantile(dist, [alpha / 2, 1 - alpha / 2])
    return float(np.nanmean(a)), float(lo), float(hi)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order as given).

    Example:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return [round(float(v), 12) for v in adjusted]


# --------------------------------------------------------------------------- experiment tables

# measurement → (column or rule, higher_is_damping, attacks it applies to)
OUTPUT_MEASURES = {
    "logit_sensitivity": "‖f(x') − f(x)‖ / ‖δ‖",
    "kl": "KL(softmax f(x) ‖ softmax f(x'))",
    "flip_rate": "argmax f(x') ≠ argmax f(x)",
    "logit_sensitivity_calibrated": "‖f(x')/T − f(x)/T‖ / ‖δ‖ (T fitted on held-out NLL)",
    "kl_calibrated": "KL(softmax f(x)/T ‖ softmax f(x')/T)",
}


def model_kinds(models: Any) -> Any:
    """plain / se / static per model: the ``kind`` column, or ``se`` for tables written before it."""
    import pandas as pd

    if "kind" in models:
        return models.kind.astype(str)
    return pd.Series(np.where(models.se.astype(bool), "se", "plain"), index=models.index)


def twin_groups(models: Any) -> list[dict[str, Any]]:
    """SE-vs-plain comparisons of an experiment: one per (arm, family).

    Args:
        models: DataFrame with ``label, family, se, arm, seed`` per model. An arm without plain
            models (an SE-only arm such as an r-ablation) is compared with the plain models of
            the first arm.

    Returns:
        ``[{"arm", "family", "se": [labels], "plain": [labels], "plain_arm"}]`` in table order.
    """
    groups = []
    models = models.assign(_kind=model_kinds(models))  # static controls are neither SE nor plain
    arms = list(dict.fromkeys(models.arm))
    for arm in arms:
        for family in dict.fromkeys(models[models.arm == arm].family):
            rows = models[(models.arm == arm) & (models.family == family)]
            se = list(rows[rows._kind == "se"].label)
            plain_arm = arm
            plain = list(rows[rows._kind == "plain"].label)
            if not plain:
                plain_arm = arms[0]
                base = models[(models.arm == plain_arm) & (models.family == family)]
                plain = list(base[base._kind == "plain"].label)
            if se and plain:
                groups.append({"arm": arm, "family": family, "se": se, "plain": plain, "plain_arm": plain_arm})
    return groups


def _matrix(ex: Any, labels: list[str], column: str) -> np.ndarray:
    """(len(labels), n) values of ``column`` for the given models, examples aligned by idx."""
    table = ex[ex.model.isin(labels)].pivot_table(index="model", columns="idx", values=column, aggfunc="first")
    return table.reindex(labels).to_numpy(dtype=np.float64)


def worst_case_examples(examples: Any) -> Any:
    """Per model, norm, eps and example: correct under every attack of that norm (the one
    definition of the worst case; controls and probes, which are not attacks on the label, are
    left out). Columns: model, norm (where the table has one), eps, idx, correct."""
    ex = examples[examples.attack.map(roles_of(examples.attack.unique())) == "attack"]
    keys = ["model", "norm", "eps", "idx"] if "norm" in ex else ["model", "eps", "idx"]  # no column: one norm
    return ex.groupby(keys, as_index=False).correct.min()


def with_noise_ratio(ex: Any) -> Any:
    """Add ``log_sensitivity_vs_noise`` = ln(sensitivity under the attack / under the noise
    control) for the same model, example and eps: how much more the output moves along the
    adversarial direction than along a random one of the same size. Unlike raw sensitivity it
    does not depend on the overall scale of a network's logits (NaN where it is undefined)."""
    is_control = (ex.attack.map(roles_of(ex.attack.unique())) == "control").to_numpy(dtype=bool)
    if "logit_sensitivity" not in ex or not is_control.any():
        return ex
    noise = ex[is_control][["model", "norm", "eps", "idx", "logit_sensitivity"]]
    noise = noise.rename(columns={"logit_sensitivity": "_noise_sens"})
    out = ex.merge(noise, on=["model", "norm", "eps", "idx"], how="left")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(out.logit_sensitivity.to_numpy(dtype=float) / out._noise_sens.to_numpy(dtype=float))
    controls = (out.attack.map(roles_of(out.attack.unique())) == "control").to_numpy(dtype=bool)
    ratio[~np.isfinite(ratio) | controls] = np.nan
    out["log_sensitivity_vs_noise"] = ratio
    return out.drop(columns="_noise_sens")


class _Job(NamedTuple):
    """One measurement of one attack to compare between twins: its table and value column."""

    measure: str
    attack: str
    table: Any
    column: str
    higher_is_damping: bool


def last_block_amplification(site_examples: Any) -> Any:
    """Per-example amplification at the last block (sites are stored in forward order), or None."""
    if site_examples is None or site_examples.empty:
        return None
    blocks = site_examples[(site_examples.metric == "amplification") & (site_examples.eps > 0)]
    if blocks.empty:
        return None
    return blocks[blocks.site == list(dict.fromkeys(blocks.site))[-1]]


def comparison_jobs(g: dict[str, Any], ex: Any, worst: Any, last_block: Any) -> list[_Job]:
    """What to compare for one twin group: the worst case, then each attack's output measures."""
    labels = g["se"] + g["plain"]
    jobs = [_Job("robust_accuracy", "worst case", worst, "correct", True)]
    mine = ex[ex.model.isin(labels)]
    for attack in dict.fromkeys(mine.attack):
        if attack_role(attack) == "probe":  # runs on SE models only: nothing to compare
            continue
        sub = mine[mine.attack == attack]
        for measure in (*OUTPUT_MEASURES, "log_sensitivity_vs_noise"):
            if measure in sub and sub[measure].notna().any():
                jobs.append(_Job(measure, attack, sub, measure, False))
        if last_block is not None:
            lb = last_block[(last_block.attack == attack) & last_block.model.isin(labels)]
            if not lb.empty:
                jobs.append(_Job("amplification_last_block", attack, lb, "value", False))
    return jobs


def group_curve(values: Any, models: list[str], column: str, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0):
    """Mean of ``column`` per eps over the given models (seeds) with a two-level bootstrap CI.

    Args:
        values: DataFrame with ``model, eps, idx`` and ``column``.

    Returns:
        DataFrame: eps, mean, ci_low, ci_high, seeds.
    """
    import pandas as pd

    r = Resampler(n_boot=n_boot, seed=seed)
    out = []
    for eps in sorted(set(values.eps)):
        m = _matrix(values[values.eps == eps], models, column)
        m = m[~np.isnan(m).all(axis=1)]
        if m.size == 0:
            continue
        mean, lo, hi = bootstrap_mean(m, alpha=alpha, resampler=r)
        out.append({"eps": float(eps), "mean": mean, "ci_low": lo, "ci_high": hi, "seeds": m.shape[0]})
    return pd.DataFrame(out, columns=["eps", "mean", "ci_low", "ci_high", "seeds"])


def damping_table(site_examples: Any, models: Any, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0):
    """Channel gain per gate with a bootstrap CI, per (arm, SE family, attack, eps > 0).

    ``verdict`` is ``damps`` (CI below 1), ``amplifies`` (CI above 1) or ``neither``.

    Returns:
        DataFrame: arm, family, attack, eps, site, mean, ci_low, ci_high, verdict.
    """
    import pandas as pd

    r = Resampler(n_boot=n_boot, seed=seed)
    rows = []
    d = site_examples[(site_examples.metric == "channel_gain") & (site_examples.eps > 0)]
    for g in twin_groups(models):
        sub = d[d.model.isin(g["se"])]
        for (attack, eps), t in sub.groupby(["attack", "eps"], sort=True):
            for site in dict.fromkeys(t.site):
                m = _matrix(t[t.site == site], g["se"], "value")
                if np.isnan(m).all():
                    continue
                mean, lo, hi = bootstrap_mean(m, alpha=alpha, resampler=r)
                v = "damps" if hi < 1 else "amplifies" if lo > 1 else "neither"
                rows.append(
                    {"arm": g["arm"], "family": g["family"], "attack": attack, "eps": float(eps), "site": site,
                     "mean": mean, "ci_low": lo, "ci_high": hi, "verdict": v}
                )  # fmt: skip
    return pd.DataFrame(
        rows, columns=["arm", "family", "attack", "eps", "site", "mean", "ci_low", "ci_high", "verdict"]
    )


def intervention_table(examples: Any, models: Any, *, alpha: float = 0.05) -> Any:
    """Transfer: the SE models scored with gates held at their clean values (``clean_gates``) or
    training-set means (``frozen_mean``) on the intact model's adversarials, minus the intact model,
    per (arm, family, attack, eps > 0). Paired per model (the model is the unit,
    :func:`compare_paired_models`): a t interval over the models' effects, no multiplicity
    adjustment (a secondary, descriptive table).

    A positive accuracy effect of ``clean_gates`` means the adaptive gates hurt under attack.

    Returns:
        DataFrame: arm, family, attack, eps, intervention, measurement, normal, intervened,
        effect, ci_low, ci_high, p, n_pairs.
    """
    import pandas as pd

    rows = []
    roles = examples.attack.map(roles_of(examples.attack.unique()))
    probe = (roles == "probe").to_numpy(dtype=bool)  # the gate attack: no plain side
    ex = examples[(examples.eps > 0) & ~probe]
    for g in twin_groups(models):
        sub = ex[ex.model.isin(g["se"])]
        for (attack, eps), t in sub.groupby(["attack", "eps"], sort=True):
            for name, measure, col, normal_col in _TRANSFER:
                if col not in t or t[col].isna().all():
                    continue
                c = compare_paired_models(_matrix(t, g["se"], col), _matrix(t, g["se"], normal_col), alpha=alpha)
                rows.append(
                    {"arm": g["arm"], "family": g["family"], "attack": attack, "eps": float(eps),
                     "intervention": name, "measurement": measure, "normal": c.plain_mean, "intervened": c.se_mean,
                     "effect": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "p": c.p, "n_pairs": c.n_pairs}
                )  # fmt: skip
    return pd.DataFrame(rows, columns=TRANSFER_COLUMNS)


# (intervention, measurement, its column, the intact model's column)
_TRANSFER = [
    ("clean_gates", "accuracy", "cg_correct", "correct"),
    ("clean_gates", "logit_sensitivity", "cg_sensitivity", "logit_sensitivity"),
    ("frozen_mean", "accuracy", "fm_correct", "correct"),
    ("frozen_mean", "logit_sensitivity", "fm_sensitivity", "logit_sensitivity"),
]
TRANSFER_COLUMNS = [
    "arm", "family", "attack", "eps", "intervention", "measurement", "normal", "intervened", "effect",
    "ci_low", "ci_high", "p", "n_pairs",
]  # fmt: skip


# --------------------------------------------------------------------------- twins: the model is the unit

TWIN_VERDICTS = ("SE damps", "SE amplifies", "negligible", "equivalent", "inconclusive", "too few seeds")
PAIRED_VERDICTS = ("a damps", "a amplifies", "negligible", "equivalent", "inconclusive", "too few seeds")
MIN_PAIRS = 5


@dataclass(frozen=True)
class TwinComparison:
    """SE − plain over seed pairs (:func:`compare_twins`) or a − b over the same models
    (:func:`compare_paired_models`).

    ``diff`` is the mean over pairs of the difference of the two models' means over the examples;
    ``se_of_diff`` its standard error (``var_seed + var_example``, seeds and examples both random),
    ``df`` the Welch–Satterthwaite degrees of freedom of the t interval ``ci_low, ci_high``; ``p``
    is two-sided (H0: diff = 0), ``p_equivalence`` the TOST p (H0: |diff| ≥ margin; NaN without a
    margin). ``p_adjusted``/``p_equivalence_adjusted`` are the Holm-adjusted values after
    :func:`adjust_family` (equal to the raw ones before), and ``verdict`` follows the adjusted ones.
    """

    diff: float
    ci_low: float
    ci_high: float
    p: float
    verdict: str
    n_pairs: int
    n_examples: int
    se_mean: float
    plain_mean: float
    p_equivalence: float
    df: float
    se_of_diff: float
    var_seed: float
    var_example: float
    p_adjusted: float
    p_equivalence_adjusted: float
    alpha: float
    margin: float | None
    higher_is_damping: bool
    labels: tuple[str, str] = ("SE damps", "SE amplifies")
    min_pairs: int = MIN_PAIRS


def _mean_count(a: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """NaN-ignoring mean along ``axis`` and the number of values it used (NaN where none)."""
    ok = ~np.isnan(a)
    n = ok.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, a, 0.0).sum(axis=axis) / n, n


def _var(a: np.ndarray, axis: int, mean: np.ndarray, n: np.ndarray) -> np.ndarray:
    """NaN-ignoring sample variance (ddof = 1) along ``axis``; NaN with fewer than 2 values."""
    dev = np.where(np.isnan(a), 0.0, a - np.expand_dims(mean, axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 1, (dev * dev).sum(axis=axis) / (n - 1), np.nan)


def _twin_components(se: np.ndarray, plain: np.ndarray) -> dict[str, np.ndarray]:
    """Point estimate and variance components of SE − plain over (..., pairs, examples) arrays.

    A two-way (pair × example) random-effects decomposition of the per-cell differences
    x[k, i] = se[k, i] − plain[k, i]: the seed term is the variance of the pair means d_k over
    S pairs; the example term is the variance of the seed-averaged per-example differences less
    the share of the residual (pair × example) noise that the seed term already holds, floored at 0.
    """
    se_row, plain_row = _mean_count(se, -1)[0], _mean_count(plain, -1)[0]
    d = se_row - plain_row  # (..., S): NaN where a side has no value
    pair_ok = ~np.isnan(d)
    x = np.where(pair_ok[..., None], se - plain, np.nan)
    diff, s = _mean_count(d, -1)
    col, n_col = _mean_count(x, -2)  # (..., N) seed-averaged per-example differences
    col_mean, n = _mean_count(col, -1)
    resid = x - col[..., None, :] - (_mean_count(x, -1)[0] - col_mean[..., None])[..., None]
    cells = (~np.isnan(x)).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        var_resid = np.nansum(resid * resid, axis=(-2, -1)) / (cells - s - n + 1)
        noise_share = var_resid * _mean_count(np.where(n_col > 0, 1.0 / n_col, np.nan), -1)[0]
        var_col = _var(col, -1, col_mean, n)
        return {
            "diff": diff, "n_pairs": s, "n_examples": n, "var_seed": _var(d, -1, diff, s) / s,
            "var_col": var_col, "noise_share": noise_share, "var_example": np.fmax(var_col - noise_share, 0.0) / n,
            "se_mean": _mean_count(np.where(pair_ok, se_row, np.nan), -1)[0],
            "plain_mean": _mean_count(np.where(pair_ok, plain_row, np.nan), -1)[0],
        }  # fmt: skip


def _satterthwaite(c: dict[str, np.ndarray]) -> np.ndarray:
    """Welch–Satterthwaite df of ``var_seed + var_example`` (each mean square with its own df),
    never below S − 1 (the seed term's df, all there is when the example term is 0)."""
    s, n = c["n_pairs"].astype(np.float64), c["n_examples"].astype(np.float64)
    total = c["var_seed"] + c["var_example"]
    with np.errstate(invalid="ignore", divide="ignore"):
        den = (
            c["var_seed"] ** 2 / (s - 1)
            + (c["var_col"] / n) ** 2 / (n - 1)
            + (c["noise_share"] / n) ** 2 / ((s - 1) * (n - 1))
        )
        df = np.where(c["var_example"] > 0, total**2 / den, s - 1)
    return np.fmax(df, s - 1)


def _t_tests(
    diff: np.ndarray, sed: np.ndarray, df: np.ndarray, *, alpha: float, margin: float | None
) -> dict[str, np.ndarray]:
    """t interval, two-sided p (H0: 0) and TOST p (H0: |diff| ≥ margin); exact when ``sed`` is 0."""
    from scipy import stats as st

    half = st.t.ppf(1 - alpha / 2, df) * sed
    exact = sed == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(exact, np.where(diff == 0, 1.0, 0.0), 2 * st.t.sf(np.abs(diff / sed), df))
        if margin is None:
            p_eq = np.full_like(p, np.nan)
        else:
            tost = np.fmax(st.t.sf((diff + margin) / sed, df), st.t.cdf((diff - margin) / sed, df))
            p_eq = np.where(exact, np.where(np.abs(diff) < margin, 0.0, 1.0), tost)
    p = np.where(np.isnan(sed), np.nan, p)
    return {"ci_low": diff - half, "ci_high": diff + half, "p": p, "p_equivalence": p_eq}


def _verdicts(
    diff: Any, p: Any, p_eq: Any, n_pairs: Any, *, alpha: float, higher_is_damping: bool,
    labels: tuple[str, str] = ("SE damps", "SE amplifies"), min_pairs: int = MIN_PAIRS,
    margin: float | None = None,
) -> np.ndarray:  # fmt: skip
    """Verdicts from (possibly adjusted) p-values. A direction is claimed only for a significant
    difference whose estimate clears the equivalence ``margin``; a significant difference inside
    the margin is ``negligible`` (real, but smaller than what the margin calls relevant);
    ``equivalent``: two one-sided tests within the margin; ``inconclusive``: none of these."""
    diff, p, p_eq, n_pairs = (np.asarray(v) for v in (diff, p, p_eq, n_pairs))
    sig = p < alpha
    inside = np.abs(diff) < margin if margin is not None else np.zeros_like(sig)
    damping_side = diff > 0 if higher_is_damping else diff < 0
    conditions = [n_pairs < min_pairs, sig & inside, sig & damping_side, sig & (diff != 0), p_eq < alpha]
    choices = ["too few seeds", "negligible", labels[0], labels[1], "equivalent"]
    return np.select(conditions, choices, "inconclusive")


def _twin_arrays(
    se: Any, plain: Any, *, alpha: float = 0.05, margin: float | None = None, higher_is_damping: bool = False,
    labels: tuple[str, str] = ("SE damps", "SE amplifies"), min_pairs: int = MIN_PAIRS,
) -> dict[str, np.ndarray]:  # fmt: skip
    """:func:`compare_twins` over (..., pairs, examples) arrays: every field as an array over the
    leading dimensions (the simulations of the tests run through this, as does every comparison)."""
    se, plain = np.asarray(se, dtype=np.float64), np.asarray(plain, dtype=np.float64)
    c = _twin_components(se, plain)
    out = {k: c[k] for k in ("diff", "n_pairs", "n_examples", "se_mean", "plain_mean", "var_seed", "var_example")}
    out["se_of_diff"] = np.sqrt(c["var_seed"] + c["var_example"])
    out["df"] = _satterthwaite(c)
    out |= _t_tests(out["diff"], out["se_of_diff"], out["df"], alpha=alpha, margin=margin)
    out["verdict"] = _verdicts(
        out["diff"], out["p"], out["p_equivalence"], out["n_pairs"],
        alpha=alpha, higher_is_damping=higher_is_damping, labels=labels, min_pairs=min_pairs, margin=margin,
    )  # fmt: skip
    return out


def _check_pairs(a: Any, b: Any, margin: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Two (pairs, examples) matrices, rows paired, columns aligned; a positive margin if any."""
    a, b = _as_matrix(a), _as_matrix(b)
    if a.shape != b.shape:
        raise ValueError(f"rows must be paired by seed and columns aligned (shapes {a.shape} vs {b.shape})")
    if margin is not None and not margin > 0:
        raise ValueError(f"margin must be positive (got {margin})")
    return a, b


def compare_twins(
    se: Any, plain: Any, *, alpha: float = 0.05, margin: float | None = None, higher_is_damping: bool = False,
    min_pairs: int = MIN_PAIRS,
) -> TwinComparison:  # fmt: skip
    """SE − plain with the trained model as the unit of replication (seeds and examples random).

    For pair k, d_k is SE's mean over the examples minus its plain twin's (NaN ignored); the
    estimate is the mean of the d_k over the S pairs. Its variance has two parts: between pairs,
    s_d²/S (different seeds train different models; this term also holds the per-example noise
    of each model), and from which examples were drawn, (s_ex² − s_res²/S)/N, floored at 0: s_ex²
    is the variance over the N examples of the seed-averaged per-example differences (common to
    every pair, so invisible to s_d²) and s_res²/S the residual pair × example noise already
    counted in s_d² (a two-way random-effects decomposition). The interval is a t interval with
    Welch–Satterthwaite degrees of freedom (at least S − 1); p is the matching two-sided t test.

    Args:
        se, plain: (seeds, examples) matrices; row k of both comes from seed k, columns are the
            same examples. NaN marks an undefined value.
        alpha: significance level (CI level 1 − alpha).
        margin: equivalence margin (same units as the values): two one-sided tests at alpha.
        higher_is_damping: True where more is better for SE (robust accuracy); False where less
            means damped (sensitivity, KL, flip rate, amplification).
        min_pairs: fewer seed pairs give ``too few seeds`` (estimates and CI still returned).

    Returns:
        :class:`TwinComparison`; verdict one of :data:`TWIN_VERDICTS`.

    Raises:
        ValueError: shapes differ, or the margin is not positive.
    """
    a, b = _check_pairs(se, plain, margin)
    labels = ("SE damps", "SE amplifies")
    r = _twin_arrays(a, b, alpha=alpha, margin=margin, higher_is_damping=higher_is_damping, min_pairs=min_pairs)
    fields = {k: np.asarray(v).item() for k, v in r.items()}  # plain Python scalars
    return TwinComparison(
        **fields, p_adjusted=fields["p"], p_equivalence_adjusted=fields["p_equivalence"], alpha=alpha,
        margin=margin, higher_is_damping=higher_is_damping, labels=labels, min_pairs=min_pairs,
    )  # fmt: skip


def compare_paired_models(
    a: Any, b: Any, *, alpha: float = 0.05, margin: float | None = None, higher_is_damping: bool = False,
    min_pairs: int = MIN_PAIRS,
) -> TwinComparison:  # fmt: skip
    """a − b where row k of both is the SAME model measured two ways (e.g. gates held vs adaptive).

    The method of :func:`compare_twins` (pairs are models here, the between-pair term is how much
    the effect varies from model to model); ``se_mean``/``plain_mean`` hold a's and b's means and
    the verdict is one of :data:`PAIRED_VERDICTS` (``a damps``: a is on the damping side of b).
    """
    c = compare_twins(a, b, alpha=alpha, margin=margin, higher_is_damping=higher_is_damping, min_pairs=min_pairs)
    labels = ("a damps", "a amplifies")
    v = _verdicts(c.diff, c.p, c.p_equivalence, c.n_pairs, alpha=alpha, higher_is_damping=higher_is_damping,
                  labels=labels, min_pairs=min_pairs, margin=margin)  # fmt: skip
    return replace(c, labels=labels, verdict=str(v))


def _holm_finite(p: Sequence[float]) -> list[float]:
    """Holm over the finite p-values of a family; NaN stays NaN and does not count."""
    arr = np.asarray(p, dtype=np.float64)
    ok = np.isfinite(arr)
    out = np.full(arr.shape, np.nan)
    if ok.any():
        out[ok] = holm(list(arr[ok]))
    return [float(v) for v in out]


def adjust_family(comparisons: Sequence[TwinComparison], alpha: float | None = None) -> list[TwinComparison]:
    """Holm-adjust a family's p-values (and, separately, its TOST p-values) and redo the verdicts.

    Use one family per question: e.g. the primary endpoint across its eps, the secondary family
    across measures × attacks × eps. The CIs stay at their nominal level; a direction needs the
    adjusted p below ``alpha`` (each comparison's own alpha when None), ``equivalent`` the adjusted
    TOST p.
    """
    p_adj = _holm_finite([c.p for c in comparisons])
    p_eq_adj = _holm_finite([c.p_equivalence for c in comparisons])
    out = []
    for c, p, q in zip(comparisons, p_adj, p_eq_adj, strict=True):
        a = c.alpha if alpha is None else alpha
        v = _verdicts(c.diff, p, q, c.n_pairs, alpha=a, higher_is_damping=c.higher_is_damping,
                      labels=c.labels, min_pairs=c.min_pairs, margin=c.margin)  # fmt: skip
        out.append(replace(c, p_adjusted=p, p_equivalence_adjusted=q, verdict=str(v), alpha=a))
    return out
