"""Statistics: confidence intervals, SE − baseline differences over seed pairs, paired tests and
the verdict (README "Statistics and the verdict").

The trained model is the unit of replication: :func:`compare_twins` (defined in
:mod:`~robustse.analysis.twins`, re-exported here) pairs models by seed and
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
from typing import Any, NamedTuple

import numpy as np

from robustse.analysis.twins import (  # noqa: F401  (the seed-level test, re-exported as part of stats)
    MIN_PAIRS,
    PAIRED_VERDICTS,
    TWIN_VERDICTS,
    TwinComparison,
    adjust_family,
    as_matrix,
    compare_paired_models,
    compare_twins,
    holm,
)
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
    a = as_matrix(values)
    r = resampler or Resampler(n_boot=n_boot, seed=seed)
    dist = r.replicate_means(a, r.seeds(a.shape[0]))
    lo, hi = np.nanquantile(dist, [alpha / 2, 1 - alpha / 2])
    return float(np.nanmean(a)), float(lo), float(hi)


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
