"""Statistics: confidence intervals, SE − plain differences, paired tests and the verdict
(README "Statistics and the verdict").

Seeds are the unit of replication and examples are shared by every model, so every interval is a
two-level bootstrap: resample the seeds (with replacement), then the examples (the same examples
for both twins: they saw the same images), and take the percentile interval of the statistic.
The paired test is a sign-flip permutation test on the per-example differences of the seed
means, Holm-corrected across the epsilons of one measurement. The verdict of a measurement at
one eps is computed from those numbers, never written by hand:

* ``SE damps``: the CI of SE − plain lies entirely on the side where SE is less affected (lower
  sensitivity, KL, flip rate, amplification; higher robust accuracy) and the Holm-corrected p is
  below alpha;
* ``SE amplifies``: the same on the other side;
* ``no evidence``: anything else.

Only numpy and pandas here (no torch): tables in, tables out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .attack_roles import ROLES, attack_role, is_attack

Z95 = 1.959963984540054
VERDICTS = ("SE damps", "no evidence", "SE amplifies")


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
    """The random draws of one analysis: example weights, seed draws and sign flips.

    A bootstrap replicate draws n examples with replacement; it is represented by its counts
    (a row of a (B, n) matrix), so a replicate's mean is one matrix product. Draws are made once
    per example count and reused by every comparison over the same examples (each interval is
    still a valid bootstrap interval; the tables are computed in seconds instead of minutes).
    """

    def __init__(self, *, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0) -> None:
        self.n_boot, self.n_perm, self.seed = n_boot, n_perm, seed
        self._weights: dict[int, np.ndarray] = {}
        self._signs: dict[int, np.ndarray] = {}
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

    def signs(self, n: int) -> np.ndarray:
        """(P, n) random signs for the sign-flip test."""
        if n not in self._signs:
            self._signs[n] = self._rng(3, n).integers(0, 2, size=(self.n_perm, n)).astype(np.float64) * 2 - 1
        return self._signs[n]

    def replicate_means(self, a: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """(B,) the mean over drawn seeds of the mean over drawn examples (NaN entries ignored)."""
        w = self.weights(a.shape[1])
        ok = ~np.isnan(a)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_seed = (w @ np.where(ok, a, 0.0).T) / (w @ ok.T)  # (B, S)
        picked = np.take_along_axis(per_seed, seeds, axis=1)
        with np.errstate(invalid="ignore"):
            return np.nanmean(picked, axis=1) if np.isnan(picked).any() else picked.mean(axis=1)

    def sign_flip_p(self, d: np.ndarray) -> float:
        """Two-sided p-value that the per-example differences ``d`` have mean 0; 1.0 if all are 0."""
        d = np.asarray(d, dtype=np.float64)
        if d.size == 0 or not np.any(d):
            return 1.0
        flipped = np.abs(self.signs(d.size) @ d) / d.size
        hits = int((flipped >= abs(d.mean()) - 1e-12).sum())
        return (hits + 1) / (self.n_perm + 1)


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


def sign_flip_test(d: Any, *, n_perm: int = 2000, seed: int = 0) -> float:
    """Two-sided p-value that the per-example differences ``d`` have mean 0 (random sign flips)."""
    return Resampler(n_perm=n_perm, seed=seed).sign_flip_p(np.asarray(d, dtype=np.float64))


@dataclass(frozen=True)
class Difference:
    """``a − b`` of two (seeds, examples) matrices with its CI and paired test."""

    a_mean: float
    b_mean: float
    diff: float
    ci_low: float
    ci_high: float
    p: float
    n_examples: int


def compare(
    a: Any,
    b: Any,
    *,
    paired_seeds: bool = False,
    n_boot: int = 2000,
    n_perm: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    resampler: Resampler | None = None,
) -> Difference:
    """Difference of means ``a − b`` with a two-level bootstrap CI and a paired permutation test.

    Args:
        a, b: (seeds, examples) matrices over the same examples (columns aligned).
        paired_seeds: the rows are the same models measured two ways (an intervention), so a
            replicate draws the same seeds for both; twins are separate models (default: drawn
            independently).
        n_boot, n_perm: bootstrap replicates and random sign flips.
        alpha: 1 − CI level.
        seed: seeds the draws (results are reproducible).
        resampler: shared draws of a whole analysis (overrides ``n_boot``, ``n_perm``, ``seed``).

    Returns:
        :class:`Difference`; ``p`` is two-sided, from sign flips of the per-example differences of
        the seed means.

    Raises:
        ValueError: the matrices have different numbers of examples.
    """
    a, b = _as_matrix(a), _as_matrix(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b cover different examples ({a.shape[1]} vs {b.shape[1]})")
    if paired_seeds and a.shape[0] != b.shape[0]:
        raise ValueError("paired_seeds needs the same number of seeds on both sides")
    r = resampler or Resampler(n_boot=n_boot, n_perm=n_perm, seed=seed)
    sa = r.seeds(a.shape[0], 0)
    sb = sa if paired_seeds else r.seeds(b.shape[0], 1)
    dist = r.replicate_means(a, sa) - r.replicate_means(b, sb)  # the same example draws on both sides
    lo, hi = np.nanquantile(dist, [alpha / 2, 1 - alpha / 2])
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (undefined ratios)
        d = np.nanmean(a, axis=0) - np.nanmean(b, axis=0)
    d = d[~np.isnan(d)]
    return Difference(
        float(np.nanmean(a)),
        float(np.nanmean(b)),
        float(np.nanmean(a) - np.nanmean(b)),
        float(lo),
        float(hi),
        r.sign_flip_p(d),
        int(a.shape[1]),
    )


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


def verdict(
    ci_low: float, ci_high: float, p_holm: float, *, alpha: float = 0.05, higher_is_damping: bool = False
) -> str:
    """``SE damps`` / ``no evidence`` / ``SE amplifies`` for an SE − plain difference.

    Args:
        ci_low, ci_high: the CI of SE − plain.
        p_holm: the Holm-corrected p-value.
        alpha: significance level.
        higher_is_damping: True for measurements where more is better for SE (robust accuracy);
            False where less means damped (sensitivity, KL, flip rate, amplification).
    """
    if not p_holm < alpha or any(math.isnan(v) for v in (ci_low, ci_high)):
        return "no evidence"
    below, above = ci_high < 0, ci_low > 0
    if below or above:
        damps = above if higher_is_damping else below
        return "SE damps" if damps else "SE amplifies"
    return "no evidence"


# --------------------------------------------------------------------------- experiment tables

# measurement → (column or rule, higher_is_damping, attacks it applies to)
OUTPUT_MEASURES = {
    "logit_sensitivity": "‖f(x') − f(x)‖ / ‖δ‖",
    "kl": "KL(softmax f(x) ‖ softmax f(x'))",
    "flip_rate": "argmax f(x') ≠ argmax f(x)",
}
# Measured perturbations that are not attacks on the label (never in robust accuracy): the noise
# control and the gate attack (roles in :mod:`robustse.attack_roles`).
CONTROLS = tuple(name for name in ROLES if not is_attack(name))


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
    arms = list(dict.fromkeys(models.arm))
    for arm in arms:
        for family in dict.fromkeys(models[models.arm == arm].family):
            rows = models[(models.arm == arm) & (models.family == family)]
            se = list(rows[rows.se.astype(bool)].label)
            plain_arm = arm
            plain = list(rows[~rows.se.astype(bool)].label)
            if not plain:
                plain_arm = arms[0]
                base = models[(models.arm == plain_arm) & (models.family == family)]
                plain = list(base[~base.se.astype(bool)].label)
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
    ex = examples[examples.attack.map(is_attack).astype(bool)]
    keys = ["model", "norm", "eps", "idx"] if "norm" in ex else ["model", "eps", "idx"]  # no column: one norm
    return ex.groupby(keys, as_index=False).correct.min()


def _with_noise_ratio(ex: Any) -> Any:
    """Add ``log_sensitivity_vs_noise`` = ln(sensitivity under the attack / under the noise
    control) for the same model, example and eps: how much more the output moves along the
    adversarial direction than along a random one of the same size. Unlike raw sensitivity it
    does not depend on the overall scale of a network's logits (NaN where it is undefined)."""
    is_control = (ex.attack.map(attack_role) == "control").to_numpy(dtype=bool)
    if "logit_sensitivity" not in ex or not is_control.any():
        return ex
    noise = ex[is_control][["model", "norm", "eps", "idx", "logit_sensitivity"]]
    noise = noise.rename(columns={"logit_sensitivity": "_noise_sens"})
    out = ex.merge(noise, on=["model", "norm", "eps", "idx"], how="left")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(out.logit_sensitivity.to_numpy(dtype=float) / out._noise_sens.to_numpy(dtype=float))
    ratio[~np.isfinite(ratio) | (out.attack.map(attack_role) == "control").to_numpy(dtype=bool)] = np.nan
    out["log_sensitivity_vs_noise"] = ratio
    return out.drop(columns="_noise_sens")


def comparison_table(
    examples: Any,
    models: Any,
    *,
    site_examples: Any = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Any:
    """The SE − plain statistics of an experiment, one row per (arm, family, measurement, attack, eps).

    Measurements: ``robust_accuracy`` (worst case over the attacks; higher = SE damps) and, for
    every attack and the noise control, ``logit_sensitivity``, ``kl``, ``flip_rate`` and, where
    probes stored them, the last block's ``amplification``; for every attack
    ``log_sensitivity_vs_noise`` (lower = SE damps, for all of these). eps = 0 rows are
    left out (nothing is perturbed). p-values are Holm-corrected across the eps of each
    (arm, family, measurement, attack).

    Returns:
        DataFrame: arm, family, measurement, attack, eps, se_mean, plain_mean, diff, ci_low,
        ci_high, p, p_holm, verdict, n_examples, se_seeds, plain_seeds.
    """
    import pandas as pd

    r = Resampler(n_boot=n_boot, n_perm=n_boot, seed=seed)
    ex = examples[examples.eps > 0].copy()
    ex["flip_rate"] = (ex.adv_pred != ex.clean_pred).astype(float)
    ex = _with_noise_ratio(ex)
    worst = worst_case_examples(ex)
    last_block = _last_block(site_examples)
    rows: list[dict[str, Any]] = []
    for g in twin_groups(models):
        for job in _comparison_jobs(g, ex, worst, last_block):
            rows += _compare_over_eps(g, job, r, alpha)
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


COMPARISON_COLUMNS = [
    "arm", "family", "measurement", "attack", "eps", "se_mean", "plain_mean", "diff", "ci_low", "ci_high",
    "p", "p_holm", "verdict", "n_examples", "se_seeds", "plain_seeds", "higher_is_damping",
]  # fmt: skip


class _Job(NamedTuple):
    """One measurement of one attack to compare between twins: its table and value column."""

    measure: str
    attack: str
    table: Any
    column: str
    higher_is_damping: bool


def _last_block(site_examples: Any) -> Any:
    """Per-example amplification at the last block (sites are stored in forward order), or None."""
    if site_examples is None or site_examples.empty:
        return None
    blocks = site_examples[(site_examples.metric == "amplification") & (site_examples.eps > 0)]
    if blocks.empty:
        return None
    return blocks[blocks.site == list(dict.fromkeys(blocks.site))[-1]]


def _comparison_jobs(g: dict[str, Any], ex: Any, worst: Any, last_block: Any) -> list[_Job]:
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


def _compare_over_eps(g: dict[str, Any], job: _Job, r: Resampler, alpha: float) -> list[dict[str, Any]]:
    """One row per eps of ``job`` for twin group ``g``; p-values Holm-corrected across the eps."""
    block: list[dict[str, Any]] = []
    for eps in sorted(set(job.table.eps)):
        t = job.table[job.table.eps == eps]
        a, b = _matrix(t, g["se"], job.column), _matrix(t, g["plain"], job.column)
        if np.isnan(a).all() or np.isnan(b).all() or a.shape[1] != b.shape[1]:
            continue
        d = compare(a, b, alpha=alpha, resampler=r)
        block.append(
            {
                "arm": g["arm"], "family": g["family"], "measurement": job.measure, "attack": job.attack,
                "eps": float(eps), "se_mean": d.a_mean, "plain_mean": d.b_mean, "diff": d.diff,
                "ci_low": d.ci_low, "ci_high": d.ci_high, "p": d.p, "n_examples": d.n_examples,
                "se_seeds": len(g["se"]), "plain_seeds": len(g["plain"]), "higher_is_damping": job.higher_is_damping,
            }
        )  # fmt: skip
    for row, p_adj in zip(block, holm([r["p"] for r in block]), strict=True):
        row["p_holm"] = p_adj
        row["verdict"] = verdict(
            row["ci_low"], row["ci_high"], p_adj, alpha=alpha, higher_is_damping=row["higher_is_damping"]
        )
    return block


def group_curve(values: Any, models: list[str], column: str, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0):  # type: ignore[no-untyped-def]
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


def damping_table(site_examples: Any, models: Any, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0):  # type: ignore[no-untyped-def]
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


def intervention_table(examples: Any, models: Any, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0):  # type: ignore[no-untyped-def]
    """Gate interventions on the SE models: accuracy and sensitivity with gates held at their
    clean values (``clean_gates``) or training-set means (``frozen_mean``) minus the normal model,
    per (arm, family, attack, eps > 0), with paired-seed bootstrap CIs.

    A positive accuracy effect of ``clean_gates`` means the adaptive gates hurt under attack.

    Returns:
        DataFrame: arm, family, attack, eps, intervention, measurement, normal, intervened,
        effect, ci_low, ci_high, p.
    """
    import pandas as pd

    r = Resampler(n_boot=n_boot, n_perm=n_boot, seed=seed)
    rows = []
    probe = (examples.attack.map(attack_role) == "probe").to_numpy(dtype=bool)  # the gate attack: no plain side
    ex = examples[(examples.eps > 0) & ~probe]
    for g in twin_groups(models):
        sub = ex[ex.model.isin(g["se"])]
        for (attack, eps), t in sub.groupby(["attack", "eps"], sort=True):
            for prefix, name in (("cg", "clean_gates"), ("fm", "frozen_mean")):
                for measure, normal_col in (("accuracy", "correct"), ("logit_sensitivity", "logit_sensitivity")):
                    col = f"{prefix}_{'correct' if measure == 'accuracy' else 'sensitivity'}"
                    if col not in t or t[col].isna().all():
                        continue
                    a, b = _matrix(t, g["se"], col), _matrix(t, g["se"], normal_col)
                    d = compare(a, b, paired_seeds=True, alpha=alpha, resampler=r)
                    rows.append(
                        {"arm": g["arm"], "family": g["family"], "attack": attack, "eps": float(eps),
                         "intervention": name, "measurement": measure, "normal": d.b_mean, "intervened": d.a_mean,
                         "effect": d.diff, "ci_low": d.ci_low, "ci_high": d.ci_high, "p": d.p}
                    )  # fmt: skip
    columns = [
        "arm", "family", "attack", "eps", "intervention", "measurement", "normal", "intervened", "effect",
        "ci_low", "ci_high", "p",
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
