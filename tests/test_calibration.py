"""Temperature calibration: fitted on held-out examples, used for the calibrated output measures."""

from __future__ import annotations

import pytest
import torch

from robustse.data.datasets import load_dataset
from robustse.training.predict import fit_temperature


def test_fit_temperature_recovers_the_scale_of_overconfident_logits():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 10, generator=gen) * 2  # calibrated logits: labels drawn from softmax(z)
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=gen).squeeze(1)
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.05)
    assert fit_temperature(3 * z, y) == pytest.approx(3.0, rel=0.05)  # 3x too confident: T = 3
    assert fit_temperature(z / 2, y) == pytest.approx(0.5, rel=0.05)


def test_held_out_examples_are_disjoint_from_the_evaluation_subset(real_fmnist):
    test = load_dataset("fashion-mnist", split="test")
    ev, held = test.subset(1000, seed=0), test.held_out(1000, seed=0, size=500)
    assert held is not None and len(held) == 500
    rows = {bytes(x.numpy()) for x in ev.x}
    assert not any(bytes(x.numpy()) in rows for x in held.x)
    assert test.held_out(None, seed=0) is None and test.held_out(len(test), seed=0) is None


def test_probed_sweeps_record_calibrated_measures(trained_small, tmp_path):
    from robustse.core.config import SweepConfig
    from robustse.core.store import ResultsStore
    from robustse.data.base import to_float
    from robustse.experiment.setup import sweep_checkpoints
    from robustse.models.checkpoint import load_checkpoint
    from robustse.probes import metrics as M

    _, _, _, ckpt = trained_small
    cfg = SweepConfig(epsilons=(0.0, 0.05), attacks=({"name": "fgsm"},), eval_subset=64, probe_subsample=8)
    sweep_checkpoints([str(ckpt)], cfg, tmp_path, progress=False)
    with ResultsStore(tmp_path / "results.db") as store:
        ex = store.examples()
    row = ex[(ex.attack == "fgsm") & (ex.eps == 0.05)].sort_values("idx")
    ratio = (row.logit_sensitivity / row.logit_sensitivity_calibrated).to_numpy()
    t = float(ratio[0])
    assert 0.2 < t < 5 and ratio == pytest.approx(t)  # one temperature per model
    model, _ = load_checkpoint(ckpt)
    test = load_dataset("fashion-mnist", split="test")
    assert t == pytest.approx(fit_temperature(model.eval()(to_float(test.held_out(64, seed=0).x)).detach(),
                                              test.held_out(64, seed=0).y), rel=1e-4)  # fmt: skip
    evalset = test.subset(64, seed=0)
    x = to_float(evalset.x[:4])
    from robustse.attacks import create_attack

    adv = create_attack("fgsm")(model, x, evalset.y[:4], epsilons=[0.05]).adversarials[0]
    with torch.no_grad():
        kl = M.kl(model(x) / t, model(adv) / t)
    assert row.kl_calibrated.to_numpy()[:4] == pytest.approx(kl.numpy(), rel=1e-3, abs=1e-6)
