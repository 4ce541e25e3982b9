"""The test of the Answer: SE − baseline over seed pairs, the trained model as the unit of
replication (README "Statistics and the verdict").

:func:`compare_twins` pairs models by seed and gives a t interval whose variance adds the seed-pair
term and the example-sampling term (the examples are shared by every model), with
Welch–Satterthwaite degrees of freedom; :func:`compare_paired_models` does the same for one model
measured two ways; :func:`adjust_family` Holm-adjusts a family and redoes the verdicts
(:data:`TWIN_VERDICTS`). Only numpy and scipy (no torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np


def as_matrix(values: Any) -> np.ndarray:
    """``values`` as a float (rows, examples) matrix; a vector is one row."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"expected a (seeds, examples) matrix, got shape {a.shape}")
    return a


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
    a, b = as_matrix(a), as_matrix(b)
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
        se: (seeds, examples) matrix of the SE models; row k comes from seed k, the columns are
            the examples (NaN marks an undefined value).
        plain: the baselines' matrix, rows and columns aligned with ``se``.
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
