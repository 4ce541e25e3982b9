"""SE − plain inference with the trained model as the unit: simulations with a per-model random
effect check the false-positive rate, CI coverage and power of :func:`robustse.analysis.stats.compare_twins`.

Every simulation runs through ``stats._twin_arrays`` (the vectorised core that ``compare_twins``
calls), over (simulations, seed pairs, examples) arrays; examples are drawn anew per simulation
(the estimand is over the population of examples and of trained models). Fixed RNG seeds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats as st
from scipy.special import expit

from robustse.analysis import stats as S
from robustse.analysis import twins as T

SIMS = 2000
Sim = tuple[np.ndarray, np.ndarray, float]  # se, plain (sims, pairs, examples) and the true SE − plain


def continuous(rng, sims, pairs=6, n=500, *, effect=0.0, tau=0.3, ex=1.0, inter=0.0, noise=1.0, shared=0.3) -> Sim:
    """value = example effect (SD ``ex``, shared by all models) + seed effect shared by twins
    (``shared``) + model effect (SD ``tau`` per model) + noise (SD ``noise``); SE adds ``effect`` and
    an example × architecture interaction (SD ``inter``, mean 0 over the population)."""
    a = rng.normal(0, ex, (sims, 1, n))
    b = rng.normal(0, inter, (sims, 1, n))
    w = rng.normal(0, shared, (sims, pairs, 1))
    u = rng.normal(0, tau, (2, sims, pairs, 1))
    se = a + b + effect + w + u[0] + rng.normal(0, noise, (sims, pairs, n))
    plain = a + w + u[1] + rng.normal(0, noise, (sims, pairs, n))
    return se, plain, effect


def binary(rng, sims, pairs=6, n=500, *, delta=0.0, mu=1.5, ex=1.0, tau=0.3, shared=0.3) -> Sim:
    """correct ~ Bernoulli(expit(example + seed + model [+ delta for SE])) on the logit scale; the
    truth is the population difference of accuracies (Gauss–Hermite over the normal logit)."""
    a = rng.normal(mu, ex, (sims, 1, n))
    w = rng.normal(0, shared, (sims, pairs, 1))
    u = rng.normal(0, tau, (2, sims, pairs, 1))
    se = (rng.random((sims, pairs, n)) < expit(a + w + u[0] + delta)).astype(np.float64)
    plain = (rng.random((sims, pairs, n)) < expit(a + w + u[1])).astype(np.float64)
    x, wts = np.polynomial.hermite_e.hermegauss(200)
    z = mu + np.sqrt(ex**2 + tau**2 + shared**2) * x
    return se, plain, float((wts / wts.sum() * (expit(z + delta) - expit(z))).sum())


def run(make: Callable[[np.random.Generator, int], Sim], seed: int, sims: int = SIMS, **kw) -> dict[str, np.ndarray]:
    """``_twin_arrays`` over ``sims`` simulations (in chunks of 500, to keep memory small), with
    ``covered`` (the CI holds the truth) and ``rejected`` (p < 0.05) added."""
    rng = np.random.default_rng(seed)
    parts = []
    for size in [500] * (sims // 500) + ([sims % 500] if sims % 500 else []):
        se, plain, truth = make(rng, size)
        r = T._twin_arrays(se, plain, **kw)
        r["covered"] = (r["ci_low"] <= truth) & (truth <= r["ci_high"])
        r["rejected"] = r["p"] < 0.05
        parts.append(r)
    return {k: np.concatenate([np.atleast_1d(p[k]) for p in parts]) for k in parts[0]}


SETTINGS = {  # name → (null, with an effect): seed SD 0.1–0.5 of the per-example SD
    "continuous, seed SD 0.1": (
        lambda g, k: continuous(g, k, tau=0.1, shared=0.1),
        lambda g, k: continuous(g, k, effect=0.1, tau=0.1, shared=0.1),
    ),
    "continuous, seed SD 0.5, large example effects": (
        lambda g, k: continuous(g, k, tau=0.5, ex=5.0),
        lambda g, k: continuous(g, k, effect=0.3, tau=0.5, ex=5.0),
    ),
    "continuous, example x architecture interaction": (
        lambda g, k: continuous(g, k, tau=0.05, inter=1.0, shared=0.1),
        lambda g, k: continuous(g, k, effect=0.2, tau=0.05, inter=1.0, shared=0.1),
    ),
    "binary, logit seed SD 0.3": (
        lambda g, k: binary(g, k),
        lambda g, k: binary(g, k, delta=0.4),
    ),
    "binary, logit seed SD 0.8, large example effects": (
        lambda g, k: binary(g, k, mu=2.0, ex=3.0, tau=0.8),
        lambda g, k: binary(g, k, delta=0.5, mu=2.0, ex=3.0, tau=0.8),
    ),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_false_positive_rate_and_coverage(name):
    null, effect = SETTINGS[name]
    r0 = run(null, 10)
    r1 = run(effect, 11)
    assert r0["n_pairs"].min() == 6 and r0["rejected"].mean() <= 0.06, r0["rejected"].mean()
    assert r0["covered"].mean() >= 0.93 and r1["covered"].mean() >= 0.93, (r0["covered"].mean(), r1["covered"].mean())
    assert set(r0["verdict"]) <= set(S.TWIN_VERDICTS) - {"too few seeds", "equivalent"}  # no margin given


def test_the_example_term_is_needed_when_examples_interact_with_architecture():
    """Seed-only t interval (pair means alone) under-covers when the effect varies by example."""
    rng = np.random.default_rng(12)
    se, plain, truth = continuous(rng, 1000, effect=0.2, tau=0.02, inter=2.0, shared=0.1, n=200)
    d = (se - plain).mean(axis=-1)
    half = st.t.ppf(0.975, 5) * d.std(axis=-1, ddof=1) / np.sqrt(6)
    assert np.mean(np.abs(d.mean(axis=-1) - truth) <= half) < 0.7
    r = T._twin_arrays(se, plain)
    assert np.mean((r["ci_low"] <= truth) & (truth <= r["ci_high"])) >= 0.93
    assert np.median(r["var_example"] / (r["var_seed"] + r["var_example"])) > 0.8


def test_power_for_two_seed_sds():
    """Effect = 2 × the seed SD of a pair difference (model SD 0.3 → pair SD 0.3·√2), 6 pairs."""
    r = run(lambda g, k: continuous(g, k, effect=2 * 0.3 * np.sqrt(2), tau=0.3), 13)
    assert r["rejected"].mean() >= 0.8, r["rejected"].mean()
    assert (r["verdict"] == "SE amplifies").mean() >= 0.8  # higher sensitivity under SE


def test_nan_values_and_a_missing_model():
    rng = np.random.default_rng(14)
    se, plain, truth = continuous(rng, 1000, effect=0.2)
    se[rng.random(se.shape) < 0.1] = np.nan
    plain[rng.random(plain.shape) < 0.1] = np.nan
    plain[:, 2, :] = np.nan  # one plain twin missing: its pair drops out
    r = T._twin_arrays(se, plain)
    assert (r["n_pairs"] == 5).all() and (r["n_examples"] >= 495).all()  # a few examples lose every pair
    assert np.mean((r["ci_low"] <= truth) & (truth <= r["ci_high"])) >= 0.93


@pytest.mark.parametrize("pairs", [2, 3, 4])
def test_too_few_seeds_still_estimates(pairs):
    r = run(lambda g, k: continuous(g, k, pairs, effect=5.0, tau=0.1), 15, sims=200)
    assert (r["verdict"] == "too few seeds").all()
    for k in ("diff", "ci_low", "ci_high", "p", "se_of_diff", "df"):
        assert np.isfinite(r[k]).all(), k
    assert r["covered"].mean() >= 0.9


def test_five_pairs_are_enough():
    r = run(lambda g, k: continuous(g, k, 5, effect=5.0, tau=0.1), 16, sims=100)
    assert (r["verdict"] == "SE amplifies").all()


def test_equivalent_when_the_truth_is_zero_and_the_data_are_precise():
    """Accuracy, 10,000 examples, small seed SD, margin 0.01 (one percentage point)."""
    make = lambda g, k: binary(g, k, n=10_000, mu=2.0, ex=2.0, tau=0.01, shared=0.05)  # noqa: E731
    r = run(make, 17, sims=200, margin=0.01, higher_is_damping=True)
    assert (r["verdict"] == "equivalent").mean() >= 0.8, np.unique(r["verdict"], return_counts=True)


def test_equivalence_test_size_at_the_margin():
    """Truth exactly at the margin: TOST rejects at most ~alpha of the time."""
    r = run(lambda g, k: continuous(g, k, effect=0.1, tau=0.05, shared=0.05), 18, margin=0.1)
    assert (r["p_equivalence"] < 0.05).mean() <= 0.065
    assert (r["verdict"] == "equivalent").mean() <= 0.06


def example_sign_flip_p(se: np.ndarray, plain: np.ndarray, n_perm: int = 500, seed: int = 0) -> np.ndarray:
    """The retired test, kept here only to show why it was retired: sign flips of the per-example
    differences of the seed means, (sims,) p-values for (sims, pairs, examples) arrays."""
    d = se.mean(1) - plain.mean(1)  # (sims, examples)
    signs = np.random.default_rng(seed).integers(0, 2, size=(n_perm, d.shape[1])) * 2.0 - 1
    flipped = np.abs(d @ signs.T) / d.shape[1]  # (sims, n_perm)
    hits = (flipped >= np.abs(d.mean(1, keepdims=True)) - 1e-12).sum(1)
    return (hits + 1) / (n_perm + 1)


def test_old_pseudo_replicating_test_fails_the_false_positive_check():
    """Sign flips over examples ignore model-to-model variance: true nulls rejected far too often."""
    rng = np.random.default_rng(19)
    se, plain, _ = continuous(rng, 100, tau=0.3)
    p_old = example_sign_flip_p(se, plain)
    assert (p_old < 0.05).mean() > 0.3
    assert (T._twin_arrays(se, plain)["p"] < 0.05).mean() <= 0.12  # 100 simulations: nominal 0.05 ± 0.02


# --------------------------------------------------------------------------- by hand


def test_compare_twins_is_the_batched_path():
    rng = np.random.default_rng(20)
    se, plain, _ = continuous(rng, 4, effect=0.1, inter=0.5)
    r = T._twin_arrays(se, plain, margin=0.2)
    for j in range(4):
        c = S.compare_twins(se[j], plain[j], margin=0.2)
        assert c.verdict == r["verdict"][j] and isinstance(c.n_pairs, int) and isinstance(c.diff, float)
        for k in ("diff", "ci_low", "ci_high", "p", "p_equivalence", "df", "se_of_diff", "se_mean", "plain_mean"):
            assert getattr(c, k) == pytest.approx(float(r[k][j]), rel=1e-12), k
        assert c.p_adjusted == c.p and c.p_equivalence_adjusted == c.p_equivalence


def test_variance_components_by_hand():
    """Additive differences (pair effect + example effect, no residual): var = s_d²/S + s_c²/N."""
    rng = np.random.default_rng(21)
    d, c = rng.normal(0.2, 0.1, 6), rng.normal(0, 0.5, 50)
    plain = rng.normal(size=(6, 50))
    r = S.compare_twins(plain + d[:, None] + c[None, :], plain)
    v_seed, v_ex = d.var(ddof=1) / 6, c.var(ddof=1) / 50
    assert r.diff == pytest.approx(d.mean() + c.mean())
    assert r.se_of_diff == pytest.approx(np.sqrt(v_seed + v_ex))
    assert r.df == pytest.approx((v_seed + v_ex) ** 2 / (v_seed**2 / 5 + v_ex**2 / 49))


def test_seed_term_only_is_the_one_sample_t_test():
    rng = np.random.default_rng(22)
    d = rng.normal(0.1, 0.1, 7)
    plain = rng.normal(size=(7, 30))
    r = S.compare_twins(plain + d[:, None], plain, higher_is_damping=True)
    assert r.var_example == pytest.approx(0, abs=1e-20) and r.df == pytest.approx(6)
    assert r.p == pytest.approx(st.ttest_1samp(d, 0).pvalue)
    lo, hi = st.t.interval(0.95, 6, loc=d.mean(), scale=d.std(ddof=1) / np.sqrt(7))
    assert (r.ci_low, r.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    assert r.verdict == ("SE damps" if r.p < 0.05 else "inconclusive")


def test_identical_twins_and_exact_differences():
    a = np.tile([0.0, 1.0, 1.0, 0.0], (6, 1))
    same = S.compare_twins(a, a, margin=0.01)
    assert (same.diff, same.p, same.p_equivalence, same.verdict) == (0.0, 1.0, 0.0, "equivalent")
    shifted = S.compare_twins(a + 0.5, a, margin=0.01)
    assert (shifted.p, shifted.verdict) == (0.0, "SE amplifies")


def test_adjust_family_holm_and_verdicts():
    def twin(p, p_eq=float("nan"), diff=-0.1, n=6):
        margin = None if np.isnan(p_eq) else 0.5
        v = T._verdicts(diff, p, p_eq, n, alpha=0.05, higher_is_damping=False)
        return S.TwinComparison(
            diff, diff - 0.05, diff + 0.05, p, str(v), n, 100, 1.0, 1.1, p_eq, 5.0, 0.02, 0.0004, 0.0, p, p_eq,
            0.05, margin, False,
        )  # fmt: skip

    family = [twin(0.01), twin(0.04), twin(0.03), twin(float("nan"), n=1), twin(0.5, 0.02, diff=0.0)]
    assert [c.verdict for c in family] == ["SE damps", "SE damps", "SE damps", "too few seeds", "equivalent"]
    out = S.adjust_family(family)
    assert [c.p_adjusted for c in out[:3]] == pytest.approx([0.04, 0.09, 0.09])  # 4 finite p-values
    assert np.isnan(out[3].p_adjusted) and out[4].p_adjusted == pytest.approx(0.5)
    assert out[4].p_equivalence_adjusted == pytest.approx(0.02)  # the only TOST in the family
    assert [c.verdict for c in out] == ["SE damps", "inconclusive", "inconclusive", "too few seeds", "equivalent"]
    assert [c.p for c in out] == [c.p for c in family]  # raw p kept
    assert [c.verdict for c in S.adjust_family([twin(0.01), twin(0.01, diff=0.1)], alpha=0.01)] == ["inconclusive"] * 2


def test_paired_models_labels_and_checks():
    rng = np.random.default_rng(23)
    held = rng.normal(0.6, 0.05, (6, 200))
    c = S.compare_paired_models(held, held - 0.2, higher_is_damping=True)
    assert c.verdict == "a damps" and c.labels == ("a damps", "a amplifies") and c.verdict in S.PAIRED_VERDICTS
    assert S.adjust_family([c])[0].verdict == "a damps"
    with pytest.raises(ValueError, match="paired"):
        S.compare_twins(held, held[:5])
    with pytest.raises(ValueError, match="margin"):
        S.compare_twins(held, held, margin=0.0)
