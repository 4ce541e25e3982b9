"""The attack contract (README "Adding an attack"), checked for every registered attack: the built-in
ones, a plugin loaded from outside the package (``tests/plugins/contract_attacks.py``), and a
torchattacks attack through the adapter. Anything registered is tested the same way."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import robustse as rs
from robustse.attacks import load_plugin, unregister_attack
from robustse.attacks.base import Rungs
from robustse.core.errors import AttackError
from robustse.core.roles import UNRECORDED_ROLES, attack_role

HERE = Path(__file__).parent
PLUGIN = load_plugin(str(HERE / "plugins" / "contract_attacks.py"))  # registers test_rand_fgsm
NAMES = [*rs.list_attacks(), "torchattacks:PGD"]  # every registered attack, the plugin included
unregister_attack("test_rand_fgsm")  # the rest of the session sees the built-in attacks only


@pytest.fixture(scope="module", autouse=True)
def plugin_registered():
    """The plugin, registered for this module's tests (as ``--plugin`` would) and taken out after."""
    rs.register_attack("test_rand_fgsm", role="attack")(PLUGIN.RandFGSM)
    yield
    unregister_attack("test_rand_fgsm")


LADDER = {"linf": [0.0, 0.01, 0.03, 0.1], "l2": [0.0, 0.2, 0.5, 1.5]}


@pytest.fixture(scope="module")
def case():
    """An SE model (the gate attack needs gates) and a batch of real Fashion-MNIST images."""
    from robustse.data.base import to_float

    torch.manual_seed(0)
    model = rs.create_model("se_small_cnn", num_classes=10, in_channels=1).eval()
    ds = rs.load_dataset("fashion-mnist", split="test").subset(12, seed=1)
    return model, to_float(ds.x), ds.y


def size(adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    delta = (adv - x).flatten(1)
    return delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)


def test_the_plugin_is_registered_and_listed():
    assert "test_rand_fgsm" in rs.list_attacks()
    assert rs.create_attack("test_rand_fgsm").role == "attack"


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", NAMES)
def test_eps_zero_budget_and_pixel_range(case, name, norm):
    """eps = 0 returns the input exactly; every rung lies in its eps-ball and in [0, 1]."""
    if name.startswith("torchattacks:") and norm == "l2":
        pytest.skip("torchattacks:PGD is an Linf attack (PGDL2 is its L2 twin)")
    model, x, y = case
    eps = LADDER[norm]
    res = rs.create_attack(name, norm=norm, seed=3)(model, x, y, epsilons=eps)
    assert torch.equal(res.adversarials[0], x)
    for e, adv in zip(eps, res.adversarials, strict=True):
        assert adv.shape == x.shape and adv.dtype == x.dtype
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1
        assert float(size(adv, x, norm).max()) <= e * (1 + 1e-5) + 1e-6, (name, e)


@pytest.mark.parametrize("name", NAMES)
def test_each_module_keeps_its_mode_and_parameters_keep_their_gradient_flags(case, name):
    model, x, y = case
    model.train()
    model.blocks[0].eval()
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)
    before = {n: m.training for n, m in model.named_modules()}
    flags = [p.requires_grad for p in model.parameters()]
    try:
        rs.create_attack(name)(model, x, y, epsilons=[0.03])
        assert {n: m.training for n, m in model.named_modules()} == before
        assert [p.requires_grad for p in model.parameters()] == flags
    finally:
        frozen.requires_grad_(True)
        model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_a_rung_does_not_depend_on_the_rest_of_the_ladder(case, name):
    """The rung at eps = 0.03 is the same whatever comes before it in one call, and the same as a
    call with that eps alone: each rung draws from its own stream."""
    model, x, y = case
    atk = rs.create_attack(name, seed=5)
    alone = atk(model, x, y, epsilons=[0.03], stream=2).adversarials[0]
    for ladder in ([0.01, 0.03], [0.1, 0.0, 0.05, 0.03]):
        got = atk(model, x, y, epsilons=ladder, stream=2).adversarials[ladder.index(0.03)]
        assert (got - alone).abs().max() <= 1e-6, (name, ladder)


@pytest.mark.parametrize("name", NAMES)
def test_works_under_no_grad_and_inference_mode(case, name):
    model, x, y = case
    atk = rs.create_attack(name, seed=1)
    ref = atk(model, x, y, epsilons=[0.03]).adversarials[0]
    with torch.no_grad():
        under_no_grad = atk(model, x, y, epsilons=[0.03]).adversarials[0]
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        under_inference = atk(model, xi, yi, epsilons=[0.03]).adversarials[0]
    assert torch.equal(under_no_grad, ref)
    assert (under_inference - ref).abs().max() <= 1e-6
    assert not ref.requires_grad and ref.grad_fn is None


@pytest.mark.parametrize("name", NAMES)
def test_seeded_streams_are_reproducible(case, name):
    model, x, y = case
    a = rs.create_attack(name, seed=7)(model, x, y, epsilons=[0.05], stream=1).adversarials[0]
    b = rs.create_attack(name, seed=7)(model, x, y, epsilons=[0.05], stream=1).adversarials[0]
    assert torch.equal(a, b)


def test_built_in_roles_agree_with_the_table_for_stores_without_a_record():
    """Stores written before sweeps recorded roles fall back to UNRECORDED_ROLES: it must say what
    the registry says."""
    for name, role in UNRECORDED_ROLES.items():
        assert rs.create_attack(name).role == role
        assert attack_role(name) == role


# --------------------------------------------------------------------------- what the base class enforces


def test_the_base_class_brings_a_sloppy_attack_back_into_the_ball(case):
    """An attack that overshoots its budget and the pixel range still returns valid adversarials:
    the final call projects what lies outside (and only that)."""
    model, x, y = case

    @rs.register_attack("test_overshoot", role="probe")
    @dataclass
    class Overshoot(rs.Attack):
        def perturb(self, model, x, y, eps, rungs):  # type: ignore[no-untyped-def]
            return x + 3 * eps - 0.5  # outside the ball and below 0 in places

    try:
        for norm, e in (("linf", 0.05), ("l2", 0.5)):
            adv = rs.create_attack("test_overshoot", norm=norm)(model, x, y, epsilons=[e]).adversarials[0]
            assert float(size(adv, x, norm).max()) <= e * (1 + 1e-5) + 1e-6
            assert float(adv.min()) >= 0 and float(adv.max()) <= 1
        assert attack_role("test_overshoot") == "probe"
    finally:
        unregister_attack("test_overshoot")
    assert "test_overshoot" not in rs.list_attacks()


def test_a_hook_that_returns_nonsense_gets_one_line(case):
    model, x, y = case

    @rs.register_attack("test_nan", role="attack")
    @dataclass
    class Broken(rs.Attack):
        def perturb(self, model, x, y, eps, rungs):  # type: ignore[no-untyped-def]
            return x[:1] * float("nan")

    try:
        with pytest.raises(AttackError, match="perturb returned"):
            rs.create_attack("test_nan")(model, x, y, epsilons=[0.1])
    finally:
        unregister_attack("test_nan")


def test_the_contract_refuses_a_subclass_that_overrides_the_call_and_bad_registrations():
    with pytest.raises(TypeError, match="implement perturb"):

        class Rogue(rs.Attack):
            def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                return None

    with pytest.raises(TypeError, match="abstract"):
        rs.Attack()  # type: ignore[abstract]
    with pytest.raises(ValueError, match="already registered"):
        rs.register_attack("pgd")(type(rs.create_attack("noise")))
    with pytest.raises(ValueError, match="role"):
        rs.register_attack("test_x", role="defence")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lower-case"):
        rs.register_attack("Bad:Name")


def test_draws_follow_the_rungs_and_members():
    """Rungs.draw gives each rung its stream's draws and every stacked member member 0's."""
    gens = [torch.Generator().manual_seed(9) for _ in range(2)]
    rungs = Rungs(generators=gens, batch=3, members=2)
    x = torch.zeros(2 * 2 * 3, 1, 2, 2)
    eps = torch.full((12, 1, 1, 1), 0.1)
    drawn = rungs.draw(lambda x, e, g: torch.rand(x.shape, generator=g) * e, x, eps).view(2, 2, 3, 1, 2, 2)
    assert torch.equal(drawn[0, 0], drawn[0, 1]) and torch.equal(drawn[0], drawn[1])
    alone = torch.rand((3, 1, 2, 2), generator=torch.Generator().manual_seed(9)) * 0.1
    assert torch.equal(drawn[1, 1], alone)


# --------------------------------------------------------------------------- the manual's own example


def readme_attack() -> str:
    """The user-defined attack the manual shows (docs/attacks.md, "Adding an attack"), as written there."""
    text = (HERE.parent / "docs" / "attacks.md").read_text(encoding="utf-8")
    section = text.split("## Adding an attack", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_the_documented_attack_is_short_agrees_with_torchattacks_and_keeps_the_contract(case, tmp_path):
    import torchattacks

    code = readme_attack()
    assert len(code.strip().splitlines()) <= 30
    path = tmp_path / "my_attacks.py"
    path.write_text(code, encoding="utf-8")
    load_plugin(str(path))
    try:
        model, x, y = case
        res = rs.create_attack("mifgsm", steps=5)(model, x, y, epsilons=[0.0, 0.03, 0.1])
        assert torch.equal(res.adversarials[0], x)
        for e, adv in zip([0.03, 0.1], res.adversarials[1:], strict=True):
            ref = torchattacks.MIFGSM(model, eps=e, alpha=e / 5, steps=5, decay=1.0)(x, y)
            assert (adv - ref).abs().max() <= 1e-6, e
    finally:
        unregister_attack("mifgsm")


@pytest.mark.slow
def test_a_plugin_attack_runs_in_a_sweep_and_its_role_reaches_the_report(trained_small, tmp_path):
    """Through the CLI as a user runs it: ``--plugin FILE`` makes ``--attack NAME`` valid; the store
    records the plugin's role, so ``robustse report`` (no plugin, no torch needed) counts it as the
    control it is: an L2 control beside an Linf attack is not a mix of norms."""
    from robustse.core.store import ResultsStore

    ckpt = trained_small[3]
    plugin = tmp_path / "wide_noise.py"
    plugin.write_text(
        "from dataclasses import dataclass\nimport robustse as rs\n\n"
        "@rs.register_attack('wide_noise', role='control')\n@dataclass\nclass WideNoise(rs.Attack):\n"
        "    def tiles_draws(self):\n        return True\n\n"
        "    def perturb(self, model, x, y, eps, rungs):\n        return rungs.draw(self.norm_ops.noise, x, eps)\n",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    robustse = [sys.executable, "-m", "robustse.cli"]
    sweep = [*robustse, "--plugin", str(plugin), "sweep", str(ckpt), "--attack", "fgsm", "--attack",
             "wide_noise(norm=l2)", "--eps", "0,0.05", "--eval-subset", "40", "--out", str(run)]  # fmt: skip
    done = subprocess.run(sweep, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with ResultsStore(run / "results.db", read_only=True) as store:
        roles = store.roles()
    assert roles["fgsm"] == "attack" and roles["wide_noise"] == "control"
    without = subprocess.run([*robustse, "sweep", str(ckpt), "--attack", "wide_noise", "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert without.returncode == 2 and "unknown attack 'wide_noise'" in without.stderr
    report = subprocess.run([*robustse, "report", str(run)], capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr
    assert "mixes norms" not in report.stderr
