"""Paired twins and the static-gate control, registry-driven over every model family.

After ``torch.manual_seed(k)`` the plain, SE and static members of a family start from identical
values in every parameter and buffer they share, and leave the global RNG in the same state; the
static control's channel scale is learned but does not depend on the input.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import robustse as rs
from robustse.core.errors import ModelError
from robustse.models import SEBlock, StaticGate, family_members, model_info, register_model

FAMILIES = sorted({model_info(n).family for n in rs.list_models()})
KINDS = ("plain", "se", "static")


def _build(name: str, seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return rs.create_model(name, **kw)


def _members(family: str) -> dict[str, str]:
    members = family_members(family)
    assert tuple(members) == KINDS, members
    return members


def test_every_family_has_plain_se_and_static_members():
    assert {"cnn", "small_cnn", "resnet20"} <= set(FAMILIES)
    for family in FAMILIES:
        members = _members(family)
        for kind, name in members.items():
            info = model_info(name)
            assert (info.family, info.kind, info.has_se) == (family, kind, kind == "se")
        assert model_info(members["plain"]).twin == members["se"]
        assert model_info(members["se"]).twin == members["plain"]


def test_static_registry_entry():
    info = model_info("static_resnet20")
    assert info.family == "resnet20" and info.kind == "static" and not info.has_se
    assert info.twin == "se_resnet20"
    assert sorted(info.options()) == ["gate", "in_channels", "mean", "num_classes", "std"]
    assert family_members("resnet20") == {"plain": "resnet20", "se": "se_resnet20", "static": "static_resnet20"}


def test_unknown_family_and_misnamed_member_are_refused():
    with pytest.raises(ModelError, match="unknown model family 'resnet21'.*resnet20"):
        family_members("resnet21")
    with pytest.raises(ValueError, match="must be named"):
        register_model("gated_cnn", family="cnn", description="x")(lambda: nn.Identity())


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_parameters_and_buffers_start_identical(family, seed):
    states = {kind: _build(name, seed).state_dict() for kind, name in _members(family).items()}
    plain = states["plain"]
    for kind in ("se", "static"):
        extra = set(states[kind]) - set(plain)
        assert extra and all(".se." in k for k in extra), (kind, sorted(extra)[:3])
        for key, value in plain.items():
            assert states[kind][key].shape == value.shape, (kind, key)
            assert torch.equal(states[kind][key], value), (kind, key)


@pytest.mark.parametrize("family", FAMILIES)
def test_global_rng_after_creation_is_the_same_for_every_member(family):
    after = {}
    for kind, name in _members(family).items():
        _build(name, 3)
        after[kind] = (torch.random.get_rng_state(), torch.rand(1))
    for kind in ("se", "static"):
        assert torch.equal(after[kind][0], after["plain"][0]), kind
        assert torch.equal(after[kind][1], after["plain"][1]), kind


@pytest.mark.parametrize("family", FAMILIES)
def test_se_parameters_are_deterministic_and_differ_between_blocks(family):
    name = family_members(family)["se"]

    def se_state(seed: int) -> dict[str, torch.Tensor]:
        return {k: v for k, v in _build(name, seed).state_dict().items() if ".se." in k}

    a, b, c = se_state(0), se_state(0), se_state(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if k.endswith("weight"))
    weights = [v for k, v in a.items() if k.endswith("fc1.weight")]
    assert len(weights) >= 2
    for i, w in enumerate(weights):
        for v in weights[i + 1 :]:
            assert w.shape != v.shape or not torch.equal(w, v)


def test_se_block_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    first = SEBlock(16, reduction=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(0)
    again = SEBlock(16, reduction=4)
    assert torch.equal(first.fc1.weight, again.fc1.weight) and torch.equal(first.fc2.bias, again.fc2.bias)
    bound = 1 / 16**0.5  # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert first.fc1.weight.abs().max() <= bound and first.fc1.weight.std() > bound / 4


@pytest.mark.parametrize("family", FAMILIES)
def test_static_sites_match_se_sites_and_are_not_gates(family):
    members = _members(family)
    se_model, static = _build(members["se"], 0), _build(members["static"], 0)
    se_sites = {n: m.channels for n, m in se_model.named_modules() if isinstance(m, SEBlock)}
    static_sites = {n: m.channels for n, m in static.named_modules() if isinstance(m, StaticGate)}
    assert static_sites == se_sites and se_sites
    assert rs.find_gates(static) == {}
    assert len(rs.find_gates(se_model)) == len(se_sites)
    n_plain = sum(p.numel() for p in _build(members["plain"], 0).parameters())
    assert sum(p.numel() for p in static.parameters()) == n_plain + sum(static_sites.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_static_scale_does_not_depend_on_the_input(family):
    model = _build(family_members(family)["static"], 0).eval()
    sites = {n: m for n, m in model.named_modules() if isinstance(m, StaticGate)}
    with torch.no_grad():
        for m in sites.values():
            m.logit.normal_()  # distinct per-channel scales, not all 0.5
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in sites}
    for n, m in sites.items():
        m.register_forward_hook(lambda _m, inputs, output, n=n: seen[n].append((inputs[0], output)))
    with torch.no_grad():
        model(torch.rand(4, 1, 28, 28))
        model(torch.randn(4, 1, 28, 28) * 3 + 1)
        for n, m in sites.items():
            scale = m.scale()[None, :, None, None]
            assert len(seen[n]) == 2 and not torch.equal(seen[n][0][0][:, :, :2, :2], seen[n][1][0][:, :, :2, :2])
            for u, y in seen[n]:  # the same per-channel factor, whatever the input
                torch.testing.assert_close(y, u * scale, rtol=0, atol=0)
    assert {n for n, _ in sites["blocks.0.se"].named_parameters()} == {"logit"}  # no input path


@pytest.mark.parametrize("family", FAMILIES)
def test_static_model_trains_its_scales(family):
    model = _build(family_members(family)["static"], 0)
    sites = [m for m in model.modules() if isinstance(m, StaticGate)]
    assert all(torch.equal(m.scale(), torch.full((m.channels,), 0.5)) for m in sites)  # like SE at init
    loss = nn.functional.cross_entropy(model(torch.rand(8, 1, 28, 28)), torch.arange(8) % 10)
    loss.backward()
    for m in sites:
        assert m.logit.grad is not None and torch.isfinite(m.logit.grad).all() and m.logit.grad.abs().sum() > 0
    before = [m.logit.detach().clone() for m in sites]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(m.logit, b) for m, b in zip(sites, before, strict=True))


def test_static_gate_formula_and_options():
    gate = StaticGate(3)
    with torch.no_grad():
        gate.logit.copy_(torch.tensor([0.0, 2.0, -1.0]))
    u = torch.randn(2, 3, 4, 5)
    s = torch.sigmoid(torch.tensor([0.0, 2.0, -1.0]))
    torch.testing.assert_close(gate(u), u * s.view(1, 3, 1, 1))
    hard = rs.create_model("static_small_cnn", gate="hardsigmoid")
    assert all(isinstance(m.squash, nn.Hardsigmoid) for m in hard.modules() if isinstance(m, StaticGate))
    with pytest.raises(ModelError, match="static gate 'tanh'"):
        rs.create_model("static_cnn", gate="tanh")
    with pytest.raises(ModelError, match="unknown option 'reduction'"):
        rs.create_model("static_cnn", reduction=4)


def test_static_checkpoint_round_trip(tmp_path):
    model = _build("static_small_cnn", 0, mean=[0.3], std=[0.4], gate="hardsigmoid")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, StaticGate):
                m.logit.uniform_(-2, 2)
    path = rs.save_checkpoint(model, tmp_path / "static.safetensors", meta={"seed": 0})
    loaded, meta = rs.load_checkpoint(path)
    assert meta["arch"] == "static_small_cnn" and meta["arch_kwargs"]["gate"] == "hardsigmoid"
    model.eval()
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_experiments_plan_the_static_control_beside_each_pair_with_the_same_seeds():
    from robustse.core.config import ArmConfig, ExperimentSpec, ModelsConfig
    from robustse.core.errors import SpecError
    from robustse.experiment.pipeline import _model_kwargs, plan_models

    spec = ExperimentSpec(
        seeds=(0, 1),
        models=ModelsConfig(twins=("small_cnn",), static=True, se_options={"reduction": 4, "gate": "hardsigmoid"}),
        arms=(ArmConfig(name="std"), ArmConfig(name="r2", se_options={"reduction": 2}, plain=False)),
    )
    plan = plan_models(spec)
    assert [p.label for p in plan if p.seed == 1] == [
        "small_cnn_std_s1",
        "se_small_cnn_std_s1",
        "static_small_cnn_std_s1",
        "se_small_cnn_r2_s1",
    ]  # fmt: skip  (an SE-only arm trains neither plain twin nor control)
    static = next(p for p in plan if p.arch == "static_small_cnn")
    assert _model_kwargs(spec, static) == {"gate": "hardsigmoid"}  # the gate function, not r
    with pytest.raises(SpecError, match="name the plain twin"):
        plan_models(ExperimentSpec(models=ModelsConfig(twins=("static_small_cnn",))))
