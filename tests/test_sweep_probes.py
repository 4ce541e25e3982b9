"""Sweeps record the science: output sensitivity, gate/block drift, interventions, excitations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import robustse as rs
from robustse.core.errors import AttackError
from robustse.core.store import ResultsStore
from robustse.data.base import to_float
from robustse.data.datasets import load_dataset
from robustse.experiment.sweep import SweepModel, build_attacks, run_sweep
from robustse.models.checkpoint import load_checkpoint
from robustse.models.gates import find_blocks, find_gates, find_sites
from robustse.probes.capture import capture, fixed_gates, gate_means
from robustse.probes.cell import GATE_METRICS, SQUEEZE_METRICS
from robustse.training.train import GATE_MEAN_EXAMPLES, SUBSET_SEED

N = 96


@pytest.fixture(scope="module")
def probed(trained_small, tmp_path_factory):
    """A probed sweep of the trained SE model and an untrained plain twin: FGSM, gate attack, noise."""
    _, _, _, ckpt = trained_small
    se, meta = load_checkpoint(ckpt)
    torch.manual_seed(0)
    plain = rs.create_model("small_cnn")
    evalset = load_dataset("fashion-mnist", split="test").subset(N, seed=3)
    attacks = build_attacks([{"name": "fgsm"}, {"name": "gate", "steps": 5}], norm="linf", seed=0)
    out = tmp_path_factory.mktemp("probed")
    res = run_sweep(
        [SweepModel("se", se, str(ckpt), meta), SweepModel("plain", plain, "-")],
        attacks,
        [0.0, 0.05],
        evalset,
        out,
        batch_size=40,
        probe_subsample=50,
        progress=False,
    )
    store = ResultsStore(out / "results.db")
    yield res, store, se, plain, evalset
    store.close()


def test_noise_control_is_added_per_norm_unless_listed():
    names = [
        (a.name, a.norm) for a in build_attacks([{"name": "fgsm"}, {"name": "pgd", "norm": "l2"}], norm="linf", seed=0)
    ]
    assert names == [("fgsm", "linf"), ("pgd", "l2"), ("noise", "linf"), ("noise", "l2")]
    listed = build_attacks([{"name": "fgsm"}, {"name": "noise", "seed": 5}], norm="linf", seed=0)
    assert [(a.name, a.seed) for a in listed] == [("fgsm", 0), ("noise", 5)]


def test_gate_attack_runs_only_on_se_models_and_not_in_robust_accuracy(probed):
    res, store, *_ = probed
    cells = store.cells()
    assert set(cells[cells.attack == "gate"].model) == {"se"}
    assert set(cells[cells.attack == "noise"].model) == {"se", "plain"}
    fgsm = cells[(cells.attack == "fgsm") & (cells.model == "se")].set_index("eps").correct
    robust = res.robust[res.robust.model == "se"].set_index("eps").correct
    assert robust.to_dict() == fgsm.to_dict()  # the worst case is over FGSM only


def test_output_measurements_zero_at_eps0_and_positive_after(probed):
    _, store, *_ = probed
    ex = store.examples()
    zero, pos = ex[ex.eps == 0], ex[(ex.eps > 0) & (ex.attack == "fgsm")]
    assert len(zero) == 3 * N + 2 * N  # se: fgsm, gate, noise; plain: fgsm, noise
    assert (zero.logit_sensitivity == 0).all() and (zero.logit_change == 0).all()
    assert np.allclose(zero.kl, 0, atol=1e-6)
    assert (pos.logit_sensitivity > 0).all() and (pos.kl > 0).mean() > 0.9


def test_interventions_recorded_for_se_models_only(probed):
    _, store, *_ = probed
    ex = store.examples()
    se, plain = ex[ex.model == "se"], ex[ex.model == "plain"]
    assert plain[["cg_correct", "fm_correct"]].isna().all().all()
    assert se[["cg_correct", "cg_sensitivity", "fm_correct", "fm_sensitivity"]].notna().all().all()
    zero = se[se.eps == 0]
    assert (zero.cg_correct == zero.correct).all()  # clean_gates on the clean input changes nothing
    assert (zero.cg_sensitivity == 0).all() and (zero.fm_sensitivity == 0).all()
    # frozen_mean changes the model: its clean predictions are not all the normal ones
    assert 0.3 < zero.fm_correct.mean() <= 1.0


def test_site_aggregates_and_subsample(probed):
    _, store, se, plain, _ = probed
    sites = store.probe_table("sites")
    n_gates, n_blocks, n_sites = len(find_gates(se)), len(find_blocks(se)), len(find_sites(se))
    per_cell = len(GATE_METRICS) * n_gates + len(SQUEEZE_METRICS) * n_sites + n_blocks
    se_fgsm = sites[(sites.model == "se") & (sites.attack == "fgsm")]
    assert len(se_fgsm) == 2 * per_cell
    pl = sites[sites.model == "plain"]
    plain_cell = pl[(pl.attack == "fgsm") & (pl.eps == 0)]
    assert set(pl.kind) == {"block", "squeeze"}  # the plain twin has the premise's sites, not gates
    assert len(plain_cell) == len(find_blocks(plain)) + len(SQUEEZE_METRICS) * len(find_sites(plain))
    zero = se_fgsm[(se_fgsm.eps == 0) & (se_fgsm.metric == "gate_drift")]
    assert (zero["mean"] == 0).all() and (zero.n == N).all()
    drift = se_fgsm[(se_fgsm.eps > 0) & (se_fgsm.metric == "gate_drift")]
    assert (drift["mean"] > 0).all() and (drift.q05 <= drift.q50).all() and (drift.q50 <= drift.q95).all()
    sub = store.probe_table("site_examples")
    cell = sub[(sub.model == "se") & (sub.attack == "fgsm") & (sub.eps == 0.05)]
    assert len(cell) == 50 * per_cell and cell.idx.max() == 49
    # the subsample's values are the first 50 of the values aggregated
    amp = cell[cell.metric == "amplification"].groupby("site").value.mean()
    assert (amp > 0).all()


def test_gate_attack_moves_gates_more_than_noise_and_fgsm(probed):
    _, store, *_ = probed
    sites = store.probe_table("sites")
    gd = sites[(sites.model == "se") & (sites.eps == 0.05) & (sites.metric == "gate_drift")]
    total = gd.groupby("attack")["mean"].sum()
    assert total["gate"] > total["noise"] and total["gate"] > total["fgsm"]


def test_excitations_per_class_and_gallery(probed):
    _, store, se, _, evalset = probed
    exc = store.probe_table("excitations")
    zero = exc[(exc.model == "se") & (exc.attack == "fgsm") & (exc.eps == 0)]
    gate = next(iter(find_gates(se)))
    with torch.no_grad(), capture(se) as rec:
        se(to_float(evalset.x))
    for _, row in zero[zero.site == gate].iterrows():
        want = rec.gates[gate][evalset.y == row.label].mean(0)
        assert row.n == int((evalset.y == row.label).sum())
        assert torch.allclose(torch.tensor(json.loads(row["mean"])), want, atol=1e-5)
    gal = store.probe_table("gallery")
    g0 = gal[(gal.model == "se") & (gal.attack == "fgsm") & (gal.eps == 0)].sort_values("idx")
    assert list(g0.idx) == list(range(8))
    img = np.frombuffer(g0.iloc[2].image, dtype=np.float32).reshape(json.loads(g0.iloc[2]["shape"]))
    assert np.array_equal(img, to_float(evalset.x[2]).numpy())


def test_training_stores_gate_means_used_by_frozen_mean(trained_small):
    model, x, _, ckpt = trained_small
    _, meta = load_checkpoint(ckpt)
    gates = find_gates(model)
    assert set(meta["gate_means"]) == set(gates)
    train = load_dataset("fashion-mnist", split="train").subset(4000, seed=SUBSET_SEED)
    want = gate_means(model, train.subset(GATE_MEAN_EXAMPLES, seed=SUBSET_SEED).x)
    for name, v in want.items():
        assert torch.allclose(torch.tensor(meta["gate_means"][name]), v, atol=1e-5)
    # fixed to the mean, every gate is the same for every input
    means = {k: torch.tensor(v) for k, v in meta["gate_means"].items()}
    with torch.no_grad(), fixed_gates(model, means), capture(model) as rec:
        model(x[:4])
    for name in gates:
        assert torch.allclose(rec.gates[name], means[name].expand(4, -1))


def test_gate_attack_needs_gates_and_stays_in_the_ball(trained_small):
    model, x, y, _ = trained_small
    atk = rs.create_attack("gate", steps=3)
    adv = atk(model, x[:16], y[:16], epsilons=[0.03]).adversarials[0]
    assert float((adv - x[:16]).abs().max()) <= 0.03 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with pytest.raises(AttackError, match="needs a model with SE gates"):
        atk(rs.create_model("small_cnn"), x[:4], y[:4], epsilons=[0.03])


def test_timm_se_modules_are_found():
    timm = pytest.importorskip("timm")
    from timm.layers.squeeze_excite import SEModule

    model = timm.create_model("seresnet18", pretrained=False, num_classes=10)
    gates = find_gates(model)
    assert len(gates) == sum(isinstance(m, SEModule) for m in model.modules()) > 0
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), capture(model.eval()) as rec:
        model(x)
    name = next(iter(gates))
    assert rec.gates[name].shape == (2, rec.gate_inputs[name].shape[1])
    assert torch.allclose(rec.gate_outputs[name], rec.gate_inputs[name] * rec.gates[name][:, :, None, None])


def test_capture_refuses_tensors_changed_in_place_and_clone_fixes_it():
    from robustse.models import SEBlock

    class InPlaceAfterSE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.se = SEBlock(8, reduction=2)

        def forward(self, x):  # type: ignore[no-untyped-def]
            y = self.se(x)
            y += 1.0  # like timm's residual add into the SE output
            return y

    model, x = InPlaceAfterSE().eval(), torch.rand(2, 8, 4, 4)
    with pytest.raises(RuntimeError, match="changed in place"), capture(model):
        model(x)
    with torch.no_grad(), capture(model, clone=True) as rec:
        out = model(x)
    assert torch.allclose(rec.gate_outputs["se.gate"] + 1.0, out)


def test_only_eps_restricts_an_attack_to_some_rungs(trained_small, tmp_path):
    from robustse.core.errors import SpecError

    model, _, _, ckpt = trained_small
    evalset = load_dataset("fashion-mnist", split="test").subset(32, seed=4)
    attacks = build_attacks(
        [{"name": "fgsm"}, {"name": "pgd", "steps": 2, "only_eps": [0.05]}], norm="linf", seed=0, noise=False
    )
    assert attacks[1].describe() == build_attacks([{"name": "pgd", "steps": 2}], norm="linf", seed=0)[0].describe()
    res = run_sweep([SweepModel("m", model, str(ckpt))], attacks, [0.0, 0.02, 0.05], evalset, tmp_path, progress=False)
    cells = res.cells
    assert sorted(cells[cells.attack == "pgd"].eps) == [0.0, 0.05]
    assert sorted(cells[cells.attack == "fgsm"].eps) == [0.0, 0.02, 0.05]
    with pytest.raises(SpecError, match="only_eps 0.03 is not on the sweep's eps ladder"):
        run_sweep(
            [SweepModel("m", model, str(ckpt))],
            build_attacks([{"name": "pgd", "only_eps": [0.03]}], norm="linf", seed=0),
            [0.0, 0.05],
            evalset,
            tmp_path / "b",
            progress=False,
        )
    aa = rs.create_attack("torchattacks:AutoAttack", n_classes=10, only_eps=[0.1])
    assert aa.only_eps == (0.1,) and "only_eps" not in aa.describe()


@pytest.mark.parametrize("table", ["examples", "sites", "site_examples", "excitations", "gallery"])
def test_tables_read_with_their_cells_equal_the_sql_join(probed, table):
    """The store joins rows to their cells in pandas (faster for millions of rows): the same frame,
    row order and columns as SQL's JOIN ... ORDER BY."""
    import pandas as pd

    _, store, *_ = probed
    last = "idx" if table == "examples" else "rowid"
    want = pd.read_sql_query(
        f"SELECT c.model, c.attack, c.attack_key, c.norm, c.eps, t.* FROM {table} t JOIN cells c ON c.id = t.cell_id"
        f" ORDER BY c.model, c.attack_key, c.eps, t.{last}",
        store.conn,
    )
    got = store.examples() if table == "examples" else store.probe_table(table)
    assert len(want) > 0 and want["model"].nunique() == (1 if table == "excitations" else 2)  # SE only: excitations
    pd.testing.assert_frame_equal(got, want)
