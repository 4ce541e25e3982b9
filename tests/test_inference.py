"""Seed-level experiment tables on hand-made results: pairs by seed, endpoints, the gates' effect,
adaptive damping attack vs noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from robustse.analysis import inference as I
from robustse.analysis import ratios as R

N = 400


def _models(seeds=(0, 1, 2, 3, 4, 5), static=True):
    rows = []
    for s in seeds:
        rows += [(f"small_cnn_s{s}", "plain"), (f"se_small_cnn_s{s}", "se")]
        if static:
            rows.append((f"static_small_cnn_s{s}", "static"))
    return pd.DataFrame(
        [{"label": lab, "family": "small_cnn", "se": kind == "se", "arm": "main",
          "seed": int(lab.rsplit("_s", 1)[1]), "kind": kind} for lab, kind in rows]
    )  # fmt: skip


def _examples(models, p_correct, rng, eps=(0.0, 0.05, 0.1), attacks=("fgsm", "pgd", "noise"), n=N):
    """Per-example rows; ``p_correct(label, attack, eps)`` gives each model's accuracy."""
    out = []
    for label in models:
        for attack in attacks:
            for e in eps:
                correct = rng.random(n) < p_correct(label, attack, e)
                out.append(pd.DataFrame({
                    "model": label, "attack": attack, "norm": "linf", "eps": e, "idx": np.arange(n),
                    "correct": correct.astype(int), "clean_pred": 0, "adv_pred": np.where(correct, 0, 1),
                    "logit_sensitivity": rng.gamma(2.0, 1.0, n),
                }))  # fmt: skip
    return pd.concat(out, ignore_index=True)


def test_pairs_match_seeds_and_include_the_static_control():
    models = _models(seeds=(0, 1, 2)).iloc[::-1]  # order must not matter
    groups = I.pair_groups(models)
    assert [g["baseline"] for g in groups] == ["plain", "static"]
    assert sorted(groups[0]["pairs"]) == [(f"se_small_cnn_s{s}", f"small_cnn_s{s}") for s in (0, 1, 2)]
    assert sorted(groups[1]["pairs"]) == [(f"se_small_cnn_s{s}", f"static_small_cnn_s{s}") for s in (0, 1, 2)]


def test_primary_endpoint_detects_a_real_effect_and_secondary_rows_are_labelled():
    rng = np.random.default_rng(0)
    models = _models()

    def acc(label, attack, e):  # SE 8 pp more robust under attack; static like plain
        base = 0.9 - 4 * e + rng.normal(0, 0.005)
        return base + (0.08 if label.startswith("se_") and e > 0 and attack != "noise" else 0)

    table = I.verdict_table(_examples(models.label, acc, rng), models)
    primary = table[table.endpoint == "primary"]
    assert set(primary.measurement) == {"robust_accuracy"} and set(primary.attack) == {"worst case"}
    assert set(primary.baseline) == {"plain", "static"} and len(primary) == 4  # 2 eps x 2 baselines
    assert (primary.verdict == "SE damps").all() and (primary.n_pairs == 6).all()
    assert (primary.p_adjusted >= primary.p - 1e-9).all()
    truth = (0.9 - 4 * primary.eps + 0.08) ** 2 - (0.9 - 4 * primary.eps) ** 2  # worst case of 2 attacks
    assert ((primary.ci_low < truth) & (truth < primary.ci_high)).all()
    assert set(table[table.endpoint == "secondary"].measurement) >= {"logit_sensitivity", "flip_rate"}


def test_fewer_than_five_pairs_show_estimates_but_no_verdict():
    rng = np.random.default_rng(1)
    models = _models(seeds=(0, 1, 2), static=False)
    table = I.verdict_table(_examples(models.label, lambda *_: 0.7, rng), models)
    assert (table.verdict == "too few seeds").all() and table["diff"].notna().all()


def test_no_effect_with_precise_data_is_equivalent():
    rng = np.random.default_rng(2)
    models = _models(static=False)
    ex = _examples(models.label, lambda *_: 0.7, rng, attacks=("pgd", "noise"), n=20_000)
    primary = I.verdict_table(ex, models, margins={"robust_accuracy": 0.03}).query("endpoint == 'primary'")
    assert (primary.verdict == "equivalent").all()


def test_gate_effect_compares_each_intervention_with_its_own_model():
    rng = np.random.default_rng(3)
    models = _models(static=False)
    se = [lab for lab in models.label if lab.startswith("se_")]
    labels = [*models.label, *[f"{s}@held_gates" for s in se]]

    def acc(label, attack, e):  # holding the gates makes the model 10 pp more robust: the reaction hurts
        return 0.6 + (0.1 if label.endswith("@held_gates") and e > 0 else 0)

    effect = I.gate_effect_table(_examples(labels, acc, rng), models)
    assert set(effect.intervention) == {"held_gates"} and (effect.verdict == "reaction hurts").all()
    assert ((effect["diff"] > 0.06) & (effect["diff"] < 0.14)).all() and (effect.n_pairs == 6).all()
    assert effect.intervention_clean.iloc[0] == pytest.approx(0.6, abs=0.03)  # its own clean accuracy


def test_adaptive_damping_attack_vs_noise():
    rng = np.random.default_rng(4)
    models = _models(static=False)
    rows = []
    for label in models.label[models.kind == "se"]:
        for attack, level in (("pgd", 0.9), ("noise", 1.0)):
            for site in ("b0.se.gate", "b1.se.gate"):
                value = level * np.exp(rng.normal(0, 0.05, 200))
                rows.append(pd.DataFrame({"model": label, "attack": attack, "norm": "linf", "eps": 0.05,
                                          "idx": np.arange(200), "site": site, "metric": "adaptive_damping",
                                          "value": value}))  # fmt: skip
    table = R.adaptive_damping_table(pd.concat(rows, ignore_index=True), models)
    (row,) = table.itertuples()
    assert row.attack == "pgd" and row.verdict == "attack damped more"
    assert row.ratio == pytest.approx(0.9, abs=0.02) and row.ci_low < 0.9 < row.ci_high < 1
    assert row.noise_damping == pytest.approx(1.0, abs=0.02)


def test_gate_effects_need_no_plain_twins():
    """SE checkpoints swept alone (no baselines) still get the gates' effect measured."""
    rng = np.random.default_rng(5)
    models = _models(static=False)
    models = models[models.kind == "se"]
    labels = [*models.label, *[f"{s}@held_gates" for s in models.label]]
    effect = I.gate_effect_table(_examples(labels, lambda *_: 0.6, rng), models)
    assert set(effect.intervention) == {"held_gates"} and (effect.n_pairs == 6).all()


def test_static_controls_are_not_counted_as_plain_twins():
    from robustse.analysis import stats as S

    (g,) = S.twin_groups(_models(seeds=(0, 1)))  # the report's curves and descriptive tables
    assert sorted(g["plain"]) == ["small_cnn_s0", "small_cnn_s1"]
    assert sorted(g["se"]) == ["se_small_cnn_s0", "se_small_cnn_s1"]
