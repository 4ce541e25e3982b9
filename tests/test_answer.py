"""The Answer: the bottom-line rule on simulated tables, the `negligible` verdict by simulation, the
premise and the gates' reaction on hand-built networks where the answer is known, and the tiny
run's numbers against an independent computation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from robustse.analysis import answer as A
from robustse.analysis import inference as I
from robustse.analysis import ratios as R
from robustse.analysis import stats as S
from robustse.cli import cli
from robustse.models import create_model
from robustse.probes import metrics as M
from robustse.probes.cell import CellProbe

from .conftest import copy_run
from .test_inference import _models
from .test_twins_inference import continuous, run

# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    "outcome, cause, want",
    [
        ("SE damps", "reaction helps", A.YES),
        ("SE damps", "reaction hurts", A.NO),
        ("inconclusive", "reaction hurts", A.NO),
        ("inconclusive", "equivalent", A.NO),
        ("equivalent", "negligible", A.NO),
        ("SE amplifies", "inconclusive", A.NO),
        ("SE amplifies", "reaction helps", A.NOT_SETTLED),
        ("SE damps", "equivalent", A.NOT_SETTLED),
        ("inconclusive", "inconclusive", A.NOT_SETTLED),
        ("negligible", "reaction helps", A.NOT_SETTLED),
        ("too few seeds", "too few seeds", A.NOT_SETTLED),
        ("SE damps", None, A.NOT_SETTLED),
        (None, "reaction helps", A.NOT_SETTLED),
    ],
)
def test_bottom_line_rule(outcome, cause, want):
    verdict, reason = A.bottom_line(outcome, cause)
    assert verdict == want and reason and "\n" not in reason


def _run_tables(seeds, se_gain, held_loss, n=1500, seed=0):
    """Examples of SE, plain and held-gates models: SE ``se_gain`` more robust than plain under the
    attacks; the held-gates model loses ``held_loss`` of SE's correct examples (the same examples
    otherwise: the same weights)."""
    rng = np.random.default_rng(seed)
    models = _models(seeds=seeds, static=False)
    rows = []
    for s in seeds:
        for attack in ("fgsm", "pgd", "noise"):
            for e in (0.0, 0.05):
                base = 0.9 if e == 0 or attack == "noise" else 0.5
                p = {"plain": base, "se": base + (se_gain if e > 0 and attack != "noise" else 0)}
                correct = {k: rng.random(n) < v for k, v in p.items()}
                drop = rng.random(n) < (held_loss if e > 0 and attack != "noise" else 0)
                correct["held"] = correct["se"] & ~drop
                labels = {
                    "plain": f"small_cnn_s{s}",
                    "se": f"se_small_cnn_s{s}",
                    "held": f"se_small_cnn_s{s}@held_gates",
                }
                for k, c in correct.items():
                    rows.append(pd.DataFrame({"model": labels[k], "attack": attack, "norm": "linf", "eps": e,
                                              "idx": np.arange(n), "correct": c.astype(int), "clean_pred": 0,
                                              "adv_pred": np.where(c, 0, 1), "logit_sensitivity": 1.0}))  # fmt: skip
    return pd.concat(rows, ignore_index=True), models


@pytest.mark.parametrize(
    "seeds, se_gain, held_loss, want",
    [
        ((0, 1, 2, 3, 4, 5), 0.10, 0.15, A.YES),  # SE more robust, and holding the gates loses it
        ((0, 1, 2, 3, 4, 5), 0.0, 0.0, A.NO),  # nothing differs: the held-gates effect is equivalent to 0
        ((0, 1, 2), 0.10, 0.15, A.NOT_SETTLED),  # three seed pairs: no verdict
    ],
)
def test_bottom_line_from_simulated_tables(seeds, se_gain, held_loss, want):
    ex, models = _run_tables(seeds, se_gain, held_loss)
    verdicts = I.verdict_table(ex[~ex.model.str.contains("@")], models)
    effects = I.gate_effect_table(ex, models)
    ratios = R.ratio_table(ex, None, models, main="pgd")
    (ans,) = A.answers(A.Tables(verdicts, effects, ratios, 0.05, "robust_accuracy", "pgd"), models)
    assert ans.bottom_line == want, (ans.reason, [line.verdict for line in ans.lines])
    outcome, cause = ans.lines[1], ans.lines[2]
    assert outcome.unit == cause.unit == "pp" and outcome.n == len(seeds)
    if want == A.YES:  # effects in pp, read the same way as the text
        assert outcome.effect == pytest.approx(100 * se_gain, abs=3) and "pp (95% CI" in outcome.text
        assert cause.effect == pytest.approx(-100 * held_loss * (0.5 + se_gain), abs=3)
    assert ans.lines[0].verdict is None and "not measured" in ans.lines[0].text  # no probes in these tables


def test_answers_are_given_per_arm():
    ex, models = _run_tables((0, 1, 2, 3, 4, 5), 0.10, 0.15)
    ex2, _ = _run_tables((0, 1, 2, 3, 4, 5), 0.0, 0.0, seed=1)
    adv = models.assign(arm="adv", label=models.label + "_adv")
    ex2 = ex2.assign(model=ex2.model.str.replace(r"(_s\d)", r"\1_adv", regex=True))
    both, all_models = pd.concat([ex, ex2], ignore_index=True), pd.concat([models, adv], ignore_index=True)
    verdicts = I.verdict_table(both[~both.model.str.contains("@")], all_models)
    effects = I.gate_effect_table(both, all_models)
    got = A.answers(A.Tables(verdicts, effects, R.ratio_table(both, None, all_models, main="pgd"), 0.05,
                             "robust_accuracy", "pgd"), all_models)  # fmt: skip
    assert [(a.arm, a.bottom_line) for a in got] == [("main", A.YES), ("adv", A.NO)]


def test_ratios_read_as_changes():
    assert A.change(1.19) == "enlarges the change by 19.0 %" and A.change(0.9) == "shrinks the change by 10.0 %"
    assert A.change(1.0) == "leaves the change as it is" and A.pp(-0.016, -0.037, 0.006).startswith("-1.6 pp (95% CI")


# --------------------------------------------------------------------------- negligible, by simulation


def test_a_significant_difference_inside_the_margin_is_negligible_not_a_direction():
    """True effect 0.3 × margin, precise data: significant most of the time, yet a direction is
    claimed at most ~alpha of the time; true effect 3 × margin: the direction, with power."""
    small = run(lambda g, k: continuous(g, k, n=3000, effect=0.03, tau=0.005, shared=0.005, noise=0.5), 30,
                sims=1000, margin=0.1)  # fmt: skip
    assert small["rejected"].mean() > 0.8  # the difference is real...
    assert (small["verdict"] == "negligible").mean() > 0.8  # ...but inside the margin
    assert np.isin(small["verdict"], ["SE damps", "SE amplifies"]).mean() <= 0.05
    large = run(lambda g, k: continuous(g, k, effect=0.3, tau=0.05, shared=0.05), 31, sims=1000, margin=0.1)
    assert (large["verdict"] == "SE amplifies").mean() >= 0.8
    null = run(lambda g, k: continuous(g, k, tau=0.3), 32, sims=1000, margin=0.1)
    assert np.isin(null["verdict"], ["SE damps", "SE amplifies"]).mean() <= 0.06  # false positives


# --------------------------------------------------------------------------- hand-built networks


def test_spatially_constant_input_and_perturbation_give_attenuation_one():
    u = torch.rand(3, 8, 1, 1).expand(3, 8, 5, 5).clone()
    up = u + torch.randn(3, 8, 1, 1)  # the same change at every position
    torch.testing.assert_close(M.squeeze_attenuation(u, up), torch.ones(3, dtype=u.dtype))


def test_a_perturbation_with_zero_spatial_mean_leaves_the_squeeze_still():
    u = torch.rand(2, 4, 6, 6)
    d = torch.randn(2, 4, 6, 6)
    d = d - d.mean(dim=(2, 3), keepdim=True)  # zero mean over space in every channel
    assert (M.squeeze_drift(u, u + d) < 1e-6).all() and (M.relative_change(u, u + d) > 0.1).all()
    assert (M.squeeze_attenuation(u, u + d) < 1e-5).all()


def _frozen_gates(model):
    """Every SE gate of ``model`` made input-independent: fc2 weights zero (s = sigmoid(bias))."""
    for m in model.modules():
        if hasattr(m, "fc2") and hasattr(m, "gate"):
            torch.nn.init.zeros_(m.fc2.weight)
    return model


def test_a_gate_that_cannot_move_gives_output_reaction_exactly_one():
    torch.manual_seed(0)
    model = _frozen_gates(create_model("se_small_cnn", num_classes=10, in_channels=1)).eval()
    x = torch.rand(16, 1, 28, 28)
    xp = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    probe = CellProbe(16)
    probe.add(model, x, xp, torch.zeros(16, dtype=torch.long), 0)
    ex = pd.DataFrame(probe.example_columns()).assign(model="m", attack="noise", norm="linf", eps=0.05, idx=range(16))
    logs = R.log_output_reaction(ex)
    assert len(logs.table) == 16 and (logs.table.value.abs() < 1e-12).all()  # ln 1 = 0, exactly up to rounding


def test_plain_twin_records_the_premise_at_the_se_site():
    """The plain twin's SE site (an identity) gets the same input u its SE twin's gate would."""
    from robustse.probes.cell import snapshot

    torch.manual_seed(1)
    model = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    x = torch.rand(4, 1, 28, 28)
    snap = snapshot(model, x)
    with torch.no_grad():
        u0 = model.blocks[0].convs(model.stem(model.normalize(x)))  # by hand, no hooks
    assert set(snap.site_inputs) == {"blocks.0.se", "blocks.1.se"}
    torch.testing.assert_close(snap.site_inputs["blocks.0.se"], u0)


# --------------------------------------------------------------------------- the tiny run, independently


def _independent_premise_and_reaction(model, x, x_adv):
    """Squeeze attenuation at blocks.0.se and the output reaction by a hand-written forward pass."""
    with torch.no_grad():

        def stages(inp, held=None):
            h = model.stem(model.normalize(inp))
            us, gates = [], []
            for k, stage in enumerate(model.blocks):
                u = stage.convs(h)
                se = stage.se
                s = se.gate(se.fc2(se.act(se.fc1(u.mean(dim=(2, 3)))))) if held is None else held[k]
                us.append(u)
                gates.append(s)
                h = stage.pool(u * s[:, :, None, None])
            return model.head(model.pool(h).flatten(1)), us, gates

        f, us, gates = stages(x)
        f_adv, us_adv, _ = stages(x_adv)
        f_held, _, _ = stages(x_adv, held=gates)
    u, up = us[0].double(), us_adv[0].double()
    drift = (up - u).flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1)
    z, zp = u.mean(dim=(2, 3)), up.mean(dim=(2, 3))
    att = ((zp - z).norm(dim=1) / z.norm(dim=1)) / drift
    reaction = (f_adv - f).norm(dim=1) / (f_held - f).norm(dim=1)
    return att.numpy(), reaction.double().numpy()


def test_tiny_run_numbers_match_an_independent_computation(tiny_run):
    """The stored premise and output reaction of one SE model under FGSM equal a hand-written
    forward pass on the same examples, and the ratio table's value is their geometric mean."""
    from robustse.attacks import create_attack
    from robustse.core.store import ResultsStore
    from robustse.data.base import to_float
    from robustse.experiment.setup import SUBSET_SEED
    from robustse.models.checkpoint import load_checkpoint
    from robustse.training.train import load_splits

    spec, out, res = tiny_run
    label, eps = "se_small_cnn_s0", 0.05
    model, _ = load_checkpoint(next((out / "models").glob(f"{label}.safetensors")))
    model.eval()
    test = load_splits(spec.data, training=False)[1].subset(spec.sweep.eval_subset, seed=SUBSET_SEED)
    x, y = to_float(test.x), test.y
    x_adv = create_attack("fgsm")(model, x, y, epsilons=[eps]).adversarials[0]
    att, reaction = _independent_premise_and_reaction(model, x, x_adv)
    with ResultsStore(out / "results.db", read_only=True) as store:
        site_ex, ex = store.probe_table("site_examples"), store.examples()
    cells = site_ex[(site_ex.model == label) & (site_ex.attack == "fgsm") & np.isclose(site_ex.eps, eps)]
    mine = cells[(cells.site == "blocks.0.se") & (cells.metric == "squeeze_attenuation")].sort_values("idx")
    np.testing.assert_allclose(mine.value.to_numpy(), att[mine.idx.to_numpy()], rtol=1e-4)
    cell = ex[(ex.model == label) & (ex.attack == "fgsm") & np.isclose(ex.eps, eps)].sort_values("idx")
    np.testing.assert_allclose((cell.logit_sensitivity / cell.cg_sensitivity).to_numpy(), reaction, rtol=1e-4)
    row = res.report.ratios
    row = row[(row.measurement == "output_reaction") & (row.models == "se") & np.isclose(row.eps, eps)].iloc[0]
    per_model = []
    for lab in ("se_small_cnn_s0", "se_small_cnn_s1"):
        c = ex[(ex.model == lab) & (ex.attack == "fgsm") & np.isclose(ex.eps, eps)]
        per_model.append(np.log(c.logit_sensitivity / c.cg_sensitivity).mean())
    assert row.a_value == pytest.approx(float(np.exp(np.mean(per_model))), rel=1e-9)


def test_report_json_is_strict_and_carries_the_answer(tiny_run, tmp_path):

    _, out, _ = tiny_run
    copy = copy_run(out, tmp_path / "copy")
    result = CliRunner().invoke(cli, ["--quiet", "report", str(copy), "--bootstrap", "200", "--json"])
    assert result.exit_code == 0, result.output

    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    payload = json.loads(result.stdout, parse_constant=refuse)["result"]
    (ans,) = payload["answers"]
    assert ans["bottom_line"] == A.NOT_SETTLED and "held-gates" in ans["reason"]  # the tiny run attacks none
    assert [line["name"] for line in ans["lines"]] == ["Premise", "Outcome", "Cause", "Mechanism"]
    assert ans["lines"][1]["unit"] == "pp" and ans["lines"][1]["n_of"] == "seed pairs"
    assert {r["measurement"] for r in payload["ratios"]} >= {"squeeze_attenuation", "output_reaction"}
    md = (copy / "report.md").read_text()
    html = (copy / "report.html").read_text()
    for text in (md, html):
        assert "95% CI" in text and "Not settled" in text and "pp" in text
    assert (copy / "squeeze.csv").stat().st_size > 0 and (copy / "ratios.csv").stat().st_size > 0
    assert S.MIN_PAIRS == 5
