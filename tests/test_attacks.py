"""Attack engine: golden cross-checks against torchattacks, budgets, eps = 0, modes, errors."""

from __future__ import annotations

import pytest
import torch
import torchattacks

from robustse.attacks import attack_info, create_attack, list_attacks
from robustse.core.errors import AttackError

EPS = [0.0, 0.01, 0.03, 0.1]
BUDGET = {"linf": [0.0, 0.005, 0.05, 0.3], "l2": [0.0, 0.1, 0.5, 2.0]}


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def agrees(adv, ref, model, y, *, exact, norm="linf", eps=1.0):
    """Bit for bit with ``exact``. Else (the eval-mode copy: float rounding apart, which can flip
    a step's sign where a gradient is ~0 and grows over the steps) the same robust accuracy within
    one example, and the adversarials apart by under 5% of eps on average."""
    if exact:
        assert (adv - ref).abs().max() <= 1e-6
        assert accuracy(model, adv, y) == accuracy(model, ref, y)
        return
    d = (adv - ref).flatten(1)
    apart = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert float(apart.mean()) <= 0.05 * eps
    assert accuracy(model, adv, y) == pytest.approx(accuracy(model, ref, y), abs=1 / len(y))


@pytest.mark.parametrize("exact", [True, False])
def test_fgsm_equals_torchattacks(trained_small, exact):
    model, x, y, _ = trained_small
    res = create_attack("fgsm", exact=exact)(model, x, y, epsilons=EPS)
    for eps, adv in zip(EPS[1:], res.adversarials[1:], strict=True):
        ref = torchattacks.FGSM(model, eps=eps)(x, y)
        agrees(adv, ref, model, y, exact=exact, eps=eps)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize(
    ("norm", "ta", "alpha", "eps"), [("linf", "PGD", 0.01, [0.01, 0.03, 0.1]), ("l2", "PGDL2", 0.1, [0.5, 1.0, 2.0])]
)
def test_pgd_without_random_start_equals_torchattacks(trained_small, norm, ta, alpha, eps, exact):
    model, x, y, _ = trained_small
    atk = create_attack("pgd", norm=norm, steps=10, random_start=False, abs_stepsize=alpha, exact=exact)
    res = atk(model, x, y, epsilons=eps)
    for e, adv in zip(eps, res.adversarials, strict=True):
        ref = getattr(torchattacks, ta)(model, eps=e, alpha=alpha, steps=10, random_start=False)(x, y)
        agrees(adv, ref, model, y, exact=exact, norm=norm, eps=e)


def test_pgd_equals_torchattacks_on_a_channels_last_model(trained_small):
    # the sweep's --channels-last attacks the model in that layout: still the same model for
    # both engines, so still the same adversarials
    import copy

    model, x, y, _ = trained_small
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    atk = create_attack("pgd", steps=5, random_start=False, abs_stepsize=0.01, exact=True)
    for e, adv in zip([0.03, 0.1], atk(cl, x, y, epsilons=[0.03, 0.1]).adversarials, strict=True):
        ref = torchattacks.PGD(cl, eps=e, alpha=0.01, steps=5, random_start=False)(x, y)
        assert (adv - ref).abs().max() <= 1e-6, e


@pytest.mark.parametrize(
    ("name", "norm"), [(n, norm) for n in list_attacks() for norm in ("linf", "l2")] + [("torchattacks:PGD", "linf")]
)
def test_budget_box_and_eps_zero(trained_small, name, norm):
    model, x, y, _ = trained_small
    eps = BUDGET[norm]
    res = create_attack(name, norm=norm)(model, x, y, epsilons=eps)
    assert res.epsilons == tuple(eps) and len(res.adversarials) == len(eps)
    assert torch.equal(res.adversarials[0], x)  # eps = 0 is the clean input, exactly
    for e, adv in zip(eps, res.adversarials, strict=True):
        assert adv.shape == x.shape and torch.isfinite(adv).all()
        assert adv.min() >= 0 and adv.max() <= 1
        delta = (adv - x).flatten(1)
        size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
        assert size.max() <= e + 1e-6, (name, e, float(size.max()))
        if e > 0:
            assert size.max() > 0.5 * e  # it really perturbs


def test_attack_strength_ordering(trained_small):
    model, x, y, _ = trained_small
    eps = [0.02, 0.05]
    acc = {
        name: [accuracy(model, a, y) for a in create_attack(name)(model, x, y, epsilons=eps).adversarials]
        for name in ("noise", "fgsm", "pgd")
    }
    clean = accuracy(model, x, y)
    for i in range(len(eps)):
        assert acc["pgd"][i] <= acc["fgsm"][i] <= acc["noise"][i] <= clean + 0.05
    assert (
        acc["pgd"][1] < clean - 0.2
    )  # a trained model really breaks (0.30 on one CPU; training differs a little between CPUs)


def test_model_mode_and_grads_are_restored(trained_small):
    model, x, y, _ = trained_small
    model.train()
    create_attack("pgd", steps=2)(model, x[:8], y[:8], epsilons=[0.01])
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()


def test_fgsm_computes_one_gradient_for_the_whole_ladder(trained_small):
    model, x, y, _ = trained_small
    calls = []
    handle = model.register_forward_pre_hook(lambda m, inp: calls.append(inp[0].shape[0]))
    try:
        create_attack("fgsm")(model, x, y, epsilons=[0.01 * i for i in range(9)])
    finally:
        handle.remove()
    assert calls == [x.shape[0]]


def test_restarts_keep_the_per_example_worst_case(trained_small):
    model, x, y, _ = trained_small
    one = create_attack("pgd", steps=3, seed=4)(model, x, y, epsilons=[0.03]).adversarials[0]
    three = create_attack("pgd", steps=3, restarts=3, seed=4)(model, x, y, epsilons=[0.03]).adversarials[0]
    with torch.no_grad():
        fooled_one, fooled_three = model(one).argmax(1) != y, model(three).argmax(1) != y
    assert bool((fooled_three | ~fooled_one).all())  # whatever one restart fooled, three still fool
    assert int(fooled_three.sum()) >= int(fooled_one.sum())


def test_seeded_and_deterministic(trained_small):
    model, x, y, _ = trained_small
    a = create_attack("pgd", steps=2, seed=1)(model, x, y, epsilons=[0.03]).adversarials[0]
    b = create_attack("pgd", steps=2, seed=1)(model, x, y, epsilons=[0.03]).adversarials[0]
    c = create_attack("pgd", steps=2, seed=2)(model, x, y, epsilons=[0.03]).adversarials[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stacked_ladder_equals_one_eps_at_a_time(trained_small):
    model, x, y, _ = trained_small
    atk = create_attack("pgd", steps=3, random_start=False)
    together = atk(model, x, y, epsilons=[0.01, 0.05]).adversarials
    apart = [atk(model, x, y, epsilons=[e]).adversarials[0] for e in (0.01, 0.05)]
    for t, a in zip(together, apart, strict=True):
        assert (t - a).abs().max() <= 1e-6


def test_accuracy_only_mode(trained_small):
    model, x, y, _ = trained_small
    eps = [0.05, 0.0, 0.01, 0.2]  # unsorted on purpose
    res = create_attack("pgd", steps=5)(model, x, y, epsilons=eps, accuracy_only=True)
    assert res.correct is not None
    for e, adv, ok in zip(eps, res.adversarials, res.correct, strict=True):
        with torch.no_grad():
            assert torch.equal(ok, model(adv).argmax(1) == y), e
        assert (adv - x).abs().max() <= e + 1e-6
    order = sorted(range(len(eps)), key=lambda i: eps[i])
    for a, b in zip(order, order[1:], strict=False):
        assert bool((res.correct[b] <= res.correct[a]).all())  # survivors only shrink


def test_noise_has_the_exact_budget():
    x = torch.full((4, 1, 8, 8), 0.5)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    y = torch.zeros(4, dtype=torch.long)
    linf = create_attack("noise")(model, x, y, epsilons=[0.1]).adversarials[0]
    assert torch.allclose((linf - x).abs(), torch.full_like(x, 0.1))
    l2 = create_attack("noise", norm="l2")(model, x, y, epsilons=[0.3]).adversarials[0]
    torch.testing.assert_close((l2 - x).flatten(1).norm(dim=1), torch.full((4,), 0.3))


def test_registry_options_listed():
    assert set(list_attacks()) == {"fgsm", "pgd", "noise", "gate"}  # the contract tests' plugin is gone again
    assert {"steps", "rel_stepsize", "random_start", "restarts", "norm", "seed"} <= set(attack_info("pgd").options())
    assert "steps" not in attack_info("fgsm").options()


@pytest.mark.parametrize(
    ("name", "kwargs", "eps", "match"),
    [
        ("pgd", {}, [-0.1], r"eps must be a number in \[0, 1e\+06\] \(got -0.1\)"),
        ("pgd", {}, [1.5], r"Linf eps 1.5 > 1"),
        ("pgd", {}, [], "no epsilons"),
        ("pgd", {"steps": 0}, [0.1], r"steps must be an integer in \[1, 10,000\] \(got 0\)"),
        ("pgd", {"restarts": 2, "random_start": False}, [0.1], "restarts > 1 need random_start"),
        ("pgd", {"rel_stepsize": 0}, [0.1], r"rel_stepsize must be a number in \(0, 1e\+06\]"),
        ("pgd", {"abs_stepsize": 1e308}, [0.1], r"abs_stepsize must be a number in \(0, 1e\+06\]"),
        ("pgd", {"norm": "l2"}, [1e308], r"eps must be a number in \[0, 1e\+06\]"),
        ("pgd", {"norm": "l1"}, [0.1], r"unknown norm 'l1' \(valid: linf, l2\)"),
        ("pgd", {"step": 3}, [0.1], r"pgd: unknown option 'step' \(valid: .*steps"),
        ("fgsm", {"steps": 3}, [0.1], r"fgsm: unknown option 'steps'"),
        ("cw", {}, [0.1], r"unknown attack 'cw' \(valid: fgsm, gate, noise, pgd, or torchattacks:<Name>\)"),
        ("torchattacks:Nope", {}, [0.1], r"unknown torchattacks attack 'Nope' \(valid: .*PGD"),
        ("torchattacks:CW", {}, [0.1], "has no eps budget"),
        ("torchattacks:PGD", {"stepz": 1}, [0.1], r"option 'stepz' not allowed \(valid: alpha, steps"),
    ],
)
def test_bad_attack_input(trained_small, name, kwargs, eps, match):
    model, x, y, _ = trained_small
    with pytest.raises(AttackError, match=match):
        create_attack(name, **kwargs)(model, x[:2], y[:2], epsilons=eps)


def test_inputs_outside_unit_range(trained_small):
    model, x, y, _ = trained_small
    with pytest.raises(AttackError, match=r"inputs must lie in \[0, 1\]"):
        create_attack("fgsm")(model, x[:2] * 255, y[:2], epsilons=[0.1])


def test_evaluator_matches_the_model_and_drops_hooks(trained_small):
    from robustse.attacks.evaluator import Evaluator

    model, x, y, _ = trained_small
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        ev = Evaluator(model)
        logits = ev(x)
        assert calls == []  # the copy does not fire the user's hooks
        with torch.no_grad():
            ref = model.eval()(x)
        assert calls == [1]
    finally:
        handle.remove()
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(1), ref.argmax(1))
    assert all(p.requires_grad for p in model.parameters())  # the user's model is untouched


def test_evaluator_logits_and_grad(trained_small):
    # the sweep's clean pass: its logits must equal the evaluator's prediction logits bit for bit
    # (eps = 0 cells reuse them), its gradient the model's up to rounding
    import torch.nn.functional as F

    from robustse.attacks.evaluator import Evaluator

    model, x, y, _ = trained_small
    ev = Evaluator(model)
    logits, grad = ev.logits_and_grad(x, y)
    assert torch.equal(logits, ev(x)) and not logits.requires_grad
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(F.cross_entropy(model.eval()(xr), y, reduction="sum"), xr)
    torch.testing.assert_close(grad, ref, rtol=1e-3, atol=1e-5)
    assert grad.abs().amax() > 0
