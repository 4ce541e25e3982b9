"""Gate interventions attacked white-box as models of their own: held gates and frozen means."""

from __future__ import annotations

import pytest
import torch

from robustse.attacks import create_attack
from robustse.core.config import SweepConfig
from robustse.core.errors import SpecError
from robustse.core.store import ResultsStore
from robustse.data.base import to_float
from robustse.data.datasets import load_dataset
from robustse.experiment.setup import intervention_models
from robustse.experiment.sweep import SweepModel, build_attacks, run_sweep
from robustse.models.checkpoint import load_checkpoint
from robustse.models.gates import find_gates
from robustse.probes.capture import capture, fixed_gates, held_gates

N = 64


@pytest.fixture(scope="module")
def se_model(trained_small):
    _, _, _, ckpt = trained_small
    model, meta = load_checkpoint(ckpt)
    x = to_float(load_dataset("fashion-mnist", split="test").subset(N, seed=5).x)
    y = load_dataset("fashion-mnist", split="test").subset(N, seed=5).y
    return model.eval(), meta, ckpt, x, y


def test_held_gates_reproduce_the_clean_logits_and_ignore_the_perturbation(se_model):
    model, _, _, x, _ = se_model
    with torch.no_grad():
        clean = model(x)
        with held_gates(model, x):
            torch.testing.assert_close(model(x), clean)  # eps 0: the model itself
            x_p = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
            with capture(model) as rec:
                model(x_p)
    with torch.no_grad(), capture(model) as ref:
        model(x)
    for name, s in ref.gates.items():  # the gates kept s(x), not s(x')
        torch.testing.assert_close(rec.gates[name], s)


def test_the_held_model_is_attacked_white_box(se_model):
    """FGSM on the held model follows the held model's own gradient, not the intact model's."""
    model, _, _, x, y = se_model
    fgsm = create_attack("fgsm", exact=True)  # the held model's own gradient, compared exactly below
    with held_gates(model, x):
        adv_held = fgsm(model, x, y, epsilons=[0.05]).adversarials[0]
    adv_intact = fgsm(model, x, y, epsilons=[0.05]).adversarials[0]
    assert not torch.equal(adv_held, adv_intact)
    with torch.no_grad(), capture(model) as rec:
        model(x)
    xg = x.clone().requires_grad_(True)
    with fixed_gates(model, dict(rec.gates)):
        loss = torch.nn.functional.cross_entropy(model(xg), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, xg)
    torch.testing.assert_close(adv_held, (x + 0.05 * grad.sign()).clamp(0, 1))


def test_interventions_join_a_sweep_as_models_with_their_own_cells(se_model, tmp_path):
    model, meta, ckpt, *_ = se_model
    sm = SweepModel("se", model, str(ckpt), meta)
    assert sm.gate_means is not None  # trained checkpoints carry training-set means
    models = [sm, *intervention_models([sm])]
    assert [m.label for m in models] == ["se", "se@held_gates", "se@frozen_mean"]
    attacks = build_attacks([{"name": "fgsm"}, {"name": "gate", "steps": 2}], norm="linf", seed=0)
    evalset = load_dataset("fashion-mnist", split="test").subset(N, seed=5)
    res = run_sweep(models, attacks, [0.0, 0.05], evalset, tmp_path, batch_size=32, progress=False)
    store = ResultsStore(tmp_path / "results.db")
    try:
        stored = store.models().set_index("model")
        cells = store.cells()
        ex = store.examples()
    finally:
        store.close()
    # held gates: clean logits identical, so the same clean accuracy; frozen means: its own
    assert stored.loc["se@held_gates", "clean_correct"] == stored.loc["se", "clean_correct"]
    assert set(cells[cells.attack == "gate"].model) == {"se"}  # held gates cannot be moved
    assert {"fgsm", "noise"} <= set(cells[cells.model == "se@held_gates"].attack)
    # white-box: the held model's FGSM accuracy is its own, not the transfer number
    held = ex[(ex.model == "se@held_gates") & (ex.attack == "fgsm") & (ex.eps == 0.05)].sort_values("idx")
    transfer = ex[(ex.model == "se") & (ex.attack == "fgsm") & (ex.eps == 0.05)].sort_values("idx")
    x = to_float(evalset.x)
    with held_gates(model, x):
        adv = create_attack("fgsm")(model, x, evalset.y, epsilons=[0.05]).adversarials[0]
        with torch.no_grad():
            expected = (model(adv).argmax(1) == evalset.y).int().tolist()
    assert held.correct.tolist() == expected
    assert held.cg_correct.isna().all() and transfer.cg_correct.notna().all()  # transfer rows: intact model only
    assert not res.checks or all(c.status != "fail" or c.name != "eps0_equals_clean" for c in res.checks)


def test_plain_models_have_no_interventions_and_unknown_ones_are_refused():
    torch.manual_seed(0)
    from robustse.models import create_model

    plain = SweepModel("plain", create_model("small_cnn"), "-")
    assert not find_gates(plain.model) and intervention_models([plain]) == []
    with pytest.raises(SpecError, match="sweep.interventions: unknown 'clean'"):
        SweepConfig(interventions=("clean",))


def test_cli_sweep_attacks_the_held_gates_model_when_asked(trained_small, tmp_path):
    import json

    from click.testing import CliRunner

    from robustse.cli import cli

    _, _, _, ckpt = trained_small
    args = ["--quiet", "sweep", str(ckpt), "--out", str(tmp_path), "--eps", "0,0.05", "--attack", "fgsm"]
    res = CliRunner().invoke(cli, [*args, "--eval-subset", "64", "--intervention", "held_gates", "--json"])
    assert res.exit_code == 0, res.output
    robust = json.loads(res.stdout)["result"]["robust"]
    label = ckpt.name.removesuffix(".safetensors")
    assert {r["model"] for r in robust} == {label, f"{label}@held_gates"}
    at0 = {r["model"]: r["correct"] for r in robust if r["eps"] == 0}
    assert at0[label] == at0[f"{label}@held_gates"]  # held gates: the same clean predictions


def test_interventions_run_the_engines_own_attacks_only(se_model):
    from robustse.experiment.sweep import attack_pairs

    model, meta, ckpt, *_ = se_model
    sm = SweepModel("se", model, str(ckpt), meta)
    attacks = build_attacks([{"name": "fgsm"}, {"name": "gate"}, {"name": "torchattacks:APGD", "steps": 2}],
                            norm="linf", seed=0)  # fmt: skip
    pairs = {(m.label, a.name) for m, a in attack_pairs([sm, *intervention_models([sm])], attacks)}
    assert ("se", "torchattacks:APGD") in pairs and ("se", "gate") in pairs
    for what in ("held_gates", "frozen_mean"):  # pinned gates: no gate attack, no re-running subsets of rows
        assert {a for m, a in pairs if m == f"se@{what}"} == {"fgsm", "noise"}
