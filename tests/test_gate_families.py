"""Gate discovery for every channel gate timm and torchvision ship (README "Models": "Channel gates found").

Each case builds a real network of the family (random weights), counts the gating modules of the
family's class independently of robustse, and checks that :func:`find_gates` finds exactly those
gates, that :func:`capture` records each gate as (B, C) with values in [0, 1], that the gate's
output is what scales the block's input, and that :func:`fixed_gates` really steers the network.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from robustse.models.gates import find_blocks, find_gates
from robustse.probes.capture import capture, fixed_gates

timm = pytest.importorskip("timm")

# (timm model, create_model kwargs, (module, class) of the gating block, count in the paper/timm config)
TIMM_CASES = [
    ("seresnet18", {}, ("timm.layers.squeeze_excite", "SEModule"), 8),
    ("legacy_seresnet18", {}, ("timm.models.senet", "SEModule"), 8),  # the SENet paper's port: `sigmoid`
    ("legacy_seresnext26_32x4d", {}, ("timm.models.senet", "SEModule"), 8),
    ("ese_vovnet19b_dw", {}, ("timm.layers.squeeze_excite", "EffectiveSEModule"), 4),
    ("mobilenetv3_small_100", {}, ("timm.models._efficientnet_blocks", "SqueezeExcite"), 9),
    ("ecaresnet26t", {}, ("timm.layers.eca", "EcaModule"), 8),
    ("resnet18", {"block_args": {"attn_layer": "ceca"}}, ("timm.layers.eca", "CecaModule"), 8),
    ("resnet18", {"block_args": {"attn_layer": "cbam"}}, ("timm.layers.cbam", "ChannelAttn"), 8),
    ("hgnet_tiny", {}, ("timm.models.hgnet", "EseModule"), 5),
]

TORCHVISION_CASES = [("mobilenet_v3_small", 9), ("regnet_y_400mf", 16)]


def _count(model: torch.nn.Module, module: str, cls_name: str) -> int:
    cls = getattr(importlib.import_module(module), cls_name)
    return sum(type(m) is cls for m in model.modules())


def _check_gates_record_and_steer(model: torch.nn.Module, gates: dict[str, torch.nn.Module]) -> None:
    for m in model.modules():  # timm zero-initialises each block's last BN: the branch (and its gate) would be mute
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            torch.nn.init.ones_(m.weight)
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), capture(model) as rec:
        out = model(x)
    assert list(rec.gates) == list(gates)
    for name, s in rec.gates.items():
        u = rec.gate_inputs[name]
        assert s.shape == (2, u.shape[1]) and float(s.min()) >= 0 and float(s.max()) <= 1
        assert torch.allclose(rec.gate_outputs[name], u * s[:, :, None, None], atol=1e-6)
    with torch.no_grad(), fixed_gates(model, {name: torch.zeros(s.shape[1]) for name, s in rec.gates.items()}):
        closed = model(x)
    assert not torch.equal(closed, out)  # the hooked modules are the gates the network uses (else bit-identical)


@pytest.mark.parametrize(("name", "kwargs", "gate_class", "expected"), TIMM_CASES, ids=lambda v: str(v)[:40])
def test_timm_channel_gates_are_found(name, kwargs, gate_class, expected):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    gates = find_gates(model)
    assert len(gates) == _count(model, *gate_class) == expected
    assert find_blocks(model)  # the depth profile has blocks to read
    _check_gates_record_and_steer(model, gates)


@pytest.mark.parametrize(("name", "expected"), TORCHVISION_CASES)
def test_torchvision_squeeze_excitation_gates_are_found(name, expected):
    import torchvision.models as tvm
    from torchvision.ops import SqueezeExcitation

    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, num_classes=5)
    gates = find_gates(model)
    assert len(gates) == sum(isinstance(m, SqueezeExcitation) for m in model.modules()) == expected
    _check_gates_record_and_steer(model, gates)


def test_plain_timm_resnet_has_no_gates():
    assert find_gates(timm.create_model("resnet18", pretrained=False, num_classes=5)) == {}


@pytest.mark.parametrize("name", ["se_resnet20", "timm:seresnet18", "timm:legacy_seresnet18"])
def test_streamed_site_metrics_equal_those_of_a_second_snapshot(name):
    """perturbed_pass measures in the hooks (no second set of activations): same values, bit for bit,
    also for timm blocks that change the SE output in place after the hook."""
    import robustse as rs
    from robustse.probes.cell import perturbed_pass, site_metrics, snapshot

    torch.manual_seed(0)
    model = rs.create_model(name, num_classes=5, in_channels=3)
    _check_gates_record_and_steer(model, find_gates(model))  # also un-mutes timm's zero-initialised branches
    x = torch.rand(3, 3, 32, 32)
    x_p = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    clean, pert = snapshot(model, x), snapshot(model, x_p)
    logits, gates, values = perturbed_pass(model, clean, x, x_p)
    expected = site_metrics(clean, pert, x, x_p)
    assert list(values) == list(expected) and len(values) > 0
    for key, v in expected.items():
        assert torch.equal(values[key].nan_to_num(-1.0), v.nan_to_num(-1.0)), key
    assert torch.equal(logits, pert.logits) and all(torch.equal(gates[k], pert.gates[k]) for k in pert.gates)


def test_gate_means_of_a_timm_se_resnet_equal_a_whole_recorded_pass(monkeypatch):
    """The training-set gate means (frozen_mean) of a timm SE-ResNet, whose blocks change the SE
    output in place: summed gate by gate inside the hooks, a few large images per pass, equal
    to the mean of one whole recorded pass; no activation is copied or kept (only gates, (C,))."""
    import robustse.data.base as D
    from robustse.probes.capture import gate_means

    model = timm.create_model("seresnet18", num_classes=5).eval()
    x = (torch.rand(7, 3, 96, 96) * 255).to(torch.uint8)
    with torch.no_grad(), capture(model) as rec:
        model(x.float() / 255)
    assert (
        D.forward_rows(torch.zeros(1, 1, 28, 28), 500) == 500 and D.forward_rows(torch.zeros(1, 3, 224, 224), 500) == 41
    )
    monkeypatch.setattr(D, "FORWARD_PIXELS", 3 * 96 * 96)  # 3 images a pass: 3 + 3 + 1
    assert D.forward_rows(x, 500) == 3
    import robustse.probes.capture as P

    keepers: list[P._Keeper] = []
    keeper = P._Keeper
    monkeypatch.setattr(P, "_Keeper", lambda **kw: keepers.append(keeper(**kw)) or keepers[-1])
    clones = []
    clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.shape) or clone(t, *a, **k))
    means = gate_means(model, x)
    assert clones == [] and len(keepers) == 1 and keepers[0].versions == []  # nothing copied, nothing held
    assert list(means) == list(rec.gates)
    for name, s in rec.gates.items():
        assert means[name].shape == (s.shape[1],)
        assert torch.allclose(means[name], s.mean(0), atol=1e-5)
