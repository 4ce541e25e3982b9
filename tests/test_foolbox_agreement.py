"""The attack engine against Foolbox 3 (Rauber et al. 2017/2020), a second independent reference
beside torchattacks: the same model and inputs give the same adversarials and the same robust
accuracy, for FGSM/FGM and PGD without random start, L∞ and L2 (README "Attacks")."""

from __future__ import annotations

import pytest
import torch

from robustse.attacks import create_attack

fb = pytest.importorskip("foolbox")

EPS = {"linf": [0.01, 0.03, 0.1], "l2": [0.3, 1.0, 2.0]}
# L2 steps divide the gradient by its norm: ours (as torchattacks) that of the mean loss plus
# 1e-10, Foolbox's that of the summed loss floored at 1e-12: most rows stay within 1e-4 over ten steps
TOLERANCE = {"linf": 1e-5, "l2": 1e-4}


def _robust_accuracy(model: torch.nn.Module, adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(adv).argmax(1) == y).float().mean())


def _foolbox(model: torch.nn.Module, attack, x: torch.Tensor, y: torch.Tensor, eps: list[float]):  # type: ignore[no-untyped-def]
    fmodel = fb.PyTorchModel(model.eval(), bounds=(0, 1))
    _, clipped, success = attack(fmodel, x, y, epsilons=eps)
    return clipped, success


@pytest.mark.parametrize(("norm", "reference"), [("linf", "FGSM"), ("l2", "FGM")])
def test_fgsm_equals_foolbox(trained_small, norm, reference):
    """One step of size eps along the gradient's sign (L∞) or its L2 direction (L2)."""
    model, x, y, _ = trained_small
    ours = create_attack("fgsm", norm=norm)(model, x, y, epsilons=EPS[norm]).adversarials
    theirs, success = _foolbox(model, getattr(fb.attacks, reference)(), x, y, EPS[norm])
    for e, a, b, s in zip(EPS[norm], ours, theirs, success, strict=True):
        assert (a - b).abs().max() <= 1e-5, e  # one step: no room to drift
        assert _robust_accuracy(model, a, y) == pytest.approx(1 - float(s.float().mean()), abs=1 / len(y)), e
    assert _robust_accuracy(model, ours[-1], y) < _robust_accuracy(model, x, y)  # the attack did something


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize(("norm", "reference", "step"), [("linf", "LinfPGD", 0.01), ("l2", "L2PGD", 0.2)])
def test_pgd_without_random_start_equals_foolbox(trained_small, norm, reference, step, exact):
    """Ten steps of a fixed size, each projected onto the eps ball and the [0, 1] box. Exact (the
    model itself): L∞ every row as Foolbox's; L2 a few rows drift apart over the steps (the two
    references normalize the gradient differently, see TOLERANCE, and ReLU boundaries amplify
    it), exactly the rows where torchattacks drifts from Foolbox. Robust accuracy agrees within
    one example, also through the default eval-mode copy (whose rounding moves a few more rows)."""
    import torchattacks

    model, x, y, _ = trained_small
    atk = create_attack("pgd", norm=norm, steps=10, random_start=False, abs_stepsize=step, exact=exact)
    ours = atk(model, x, y, epsilons=EPS[norm]).adversarials
    ref = getattr(fb.attacks, reference)(steps=10, abs_stepsize=step, random_start=False)
    theirs, success = _foolbox(model, ref, x, y, EPS[norm])
    ta = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    for e, a, b, s in zip(EPS[norm], ours, theirs, success, strict=True):
        assert _robust_accuracy(model, a, y) == pytest.approx(1 - float(s.float().mean()), abs=1 / len(y)), e
        assert (a - x).flatten(1).norm(p=float("inf") if norm == "linf" else 2, dim=1).max() <= e + 1e-5
        if not exact:
            continue
        apart = (a - b).flatten(1).abs().amax(1) > TOLERANCE[norm]
        ta_apart = (ta(model, eps=e, alpha=step, steps=10, random_start=False)(x, y) - b).flatten(1).abs().amax(1)
        # L2: the engine stacks rungs into one batch, whose kernels may round differently from a
        # batch of one rung, and ten normalized steps can grow that past the tolerance in a row
        assert int((apart != (ta_apart > TOLERANCE[norm])).sum()) <= (0 if norm == "linf" else 2), e
        assert int(apart.sum()) <= (0 if norm == "linf" else len(y) // 20), e
