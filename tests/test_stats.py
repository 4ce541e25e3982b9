"""Statistics on synthetic data with known answers: CIs cover the truth, verdicts follow the data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from robustse.analysis import stats as S
from robustse.analysis import twins as T


def _examples(effect: float, *, seeds: int = 3, n: int = 400, eps=(0.0, 0.01, 0.02, 0.05), rng_seed: int = 0):
    """A fake store: SE sensitivity = plain − effect·eps/0.05 (+ seed and example noise)."""
    rng = np.random.default_rng(rng_seed)
    hardness = rng.gamma(2.0, 1.0, size=n)  # per example, shared by all models
    rows, models = [], []
    for s in range(seeds):
        for se in (False, True):
            label = f"{'se_' if se else ''}net_s{s}"
            models.append({"label": label, "family": "net", "se": se, "arm": "main", "seed": s})
            offset = rng.normal(0, 0.02)
            for e in eps:
                sens = hardness * (1 + e * 10) + offset + rng.normal(0, 0.3, size=n)
                if se:
                    sens = sens - effect * e / 0.05
                correct = (rng.random(n) > min(0.9, e * 8)).astype(int)
                for i in range(n):
                    rows.append((label, "pgd", e, i, correct[i], 3, 3 if correct[i] else 4, sens[i], 0.1))
    cols = ["model", "attack", "eps", "idx", "correct", "clean_pred", "adv_pred", "logit_sensitivity", "kl"]
    return pd.DataFrame(rows, columns=cols), pd.DataFrame(models)


def test_wilson_and_holm_by_hand():
    lo, hi = S.wilson_interval(92, 100)
    assert round(lo, 3) == 0.85 and round(hi, 3) == 0.959
    assert S.holm([0.01, 0.04, 0.03]) == [0.03, 0.06, 0.06]
    assert S.holm([0.5]) == [0.5]
    with pytest.raises(ValueError, match="successes"):
        S.wilson_interval(5, 3)


def test_bootstrap_mean_covers_the_truth_most_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(40):
        data = rng.normal(1.0, 1.0, size=(3, 200)) + rng.normal(0, 0.05, size=(3, 1))
        _, lo, hi = S.bootstrap_mean(data, n_boot=400, seed=trial)
        covered += lo <= 1.0 <= hi
    assert covered >= 32  # nominal 95%; a broken interval (too narrow or off-centre) falls far short


def test_the_seed_level_test_detects_a_shift_and_not_noise():
    """What the retired example-level sign-flip test was checked for, on the test that replaced it:
    a real shift between paired models is found, noise is not, identical models give no difference."""
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, size=(8, 300))
    shifted = S.compare_paired_models(base + 0.3 + rng.normal(0, 0.05, size=(8, 1)), base)
    assert shifted.p < 0.01 and shifted.verdict == "a amplifies"
    same = S.compare_paired_models(base + rng.normal(0, 0.05, size=(8, 1)), base)
    assert same.p > 0.05 and same.verdict == "inconclusive"
    assert S.compare_paired_models(base, base).diff == 0.0


@pytest.mark.parametrize(
    "diff, p, p_eq, higher, want",
    [
        (-0.2, 0.01, 1.0, False, "SE damps"),
        (0.2, 0.01, 1.0, False, "SE amplifies"),
        (0.2, 0.01, 1.0, True, "SE damps"),
        (0.1, 0.2, 1.0, False, "inconclusive"),
        (-0.2, 0.2, 1.0, False, "inconclusive"),
        (0.001, 0.3, 0.01, False, "equivalent"),
    ],
)
def test_verdict_rules(diff, p, p_eq, higher, want):
    got = T._verdicts(diff, p, p_eq, 6, alpha=0.05, higher_is_damping=higher, margin=0.01)
    assert str(got) == want


def test_known_effect_is_detected_and_covered():
    from robustse.analysis.inference import verdict_table

    effect = 0.4
    ex, models = _examples(effect, seeds=6)
    table = verdict_table(ex, models)
    sens = table[(table.measurement == "logit_sensitivity")].set_index("eps")
    assert list(sens.index) == [0.01, 0.02, 0.05]  # eps = 0 is not a comparison
    for eps, row in sens.iterrows():
        truth = -effect * eps / 0.05
        assert row.ci_low <= truth <= row.ci_high, (eps, truth, row.ci_low, row.ci_high)
    assert sens.loc[0.05, "verdict"] == "SE damps"
    assert sens.loc[0.05, "p_adjusted"] < 0.05
    assert (sens.p_adjusted >= sens.p).all()


def test_no_effect_claims_no_direction():
    from robustse.analysis.inference import verdict_table

    ex, models = _examples(0.0, seeds=6, rng_seed=5)
    table = verdict_table(ex, models)
    assert not set(table.verdict) & {"SE damps", "SE amplifies"}
    assert set(table.measurement) >= {"robust_accuracy", "logit_sensitivity", "kl", "flip_rate"}


def test_se_only_arm_is_compared_with_the_first_arms_plain_twin():
    models = pd.DataFrame(
        [
            {"label": "p_s0", "family": "net", "se": False, "arm": "main", "seed": 0},
            {"label": "se_s0", "family": "net", "se": True, "arm": "main", "seed": 0},
            {"label": "se_r2_s0", "family": "net", "se": True, "arm": "r2", "seed": 0},
        ]
    )
    groups = S.twin_groups(models)
    assert [(g["arm"], g["se"], g["plain"], g["plain_arm"]) for g in groups] == [
        ("main", ["se_s0"], ["p_s0"], "main"),
        ("r2", ["se_r2_s0"], ["p_s0"], "main"),
    ]


def test_compare_paired_models_and_shape_errors():
    a = np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [0.0, 1.0, 5.0], [1.0, 1.0, 1.0], [3.0, 2.0, 1.0]])
    d = S.compare_paired_models(a + 1.0, a)
    assert d.diff == pytest.approx(1.0) and d.ci_low == pytest.approx(1.0) and d.ci_high == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        S.compare_paired_models(a, a[:, :2])


def test_sensitivity_relative_to_noise_cancels_the_logit_scale():
    """SE's logits twice as large: raw sensitivity doubles, its ratio to noise does not move."""
    rng = np.random.default_rng(3)
    rows, models = [], []
    n = 300
    base_attack = rng.gamma(4.0, 1.0, size=n) + 1.0
    base_noise = rng.gamma(2.0, 0.5, size=n) + 0.2
    for s in range(6):
        for se in (False, True):
            label = f"{'se_' if se else ''}net_s{s}"
            models.append({"label": label, "family": "net", "se": se, "arm": "main", "seed": s})
            scale = 2.0 * np.exp(rng.normal(0, 0.02)) if se else 1.0
            for attack, base in (("pgd", base_attack), ("noise", base_noise)):
                sens = scale * base * np.exp(rng.normal(0, 0.05, size=n))
                for i in range(n):
                    rows.append((label, attack, "linf", 0.03, i, 1, 3, 3, sens[i], 0.1))
    cols = ["model", "attack", "norm", "eps", "idx", "correct", "clean_pred", "adv_pred", "logit_sensitivity", "kl"]
    from robustse.analysis.inference import verdict_table

    table = verdict_table(pd.DataFrame(rows, columns=cols), pd.DataFrame(models))
    raw = table[(table.measurement == "logit_sensitivity") & (table.attack == "pgd")].iloc[0]
    rel = table[(table.measurement == "log_sensitivity_vs_noise") & (table.attack == "pgd")].iloc[0]
    assert raw.verdict == "SE amplifies" and raw["diff"] > 1.0
    assert rel.verdict not in ("SE damps", "SE amplifies") and abs(rel["diff"]) < 0.05
    assert rel.se_mean == pytest.approx(np.log(base_attack / base_noise).mean(), abs=0.05)
    assert "log_sensitivity_vs_noise" not in set(table[table.attack == "noise"].measurement)
