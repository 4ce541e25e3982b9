"""Model zoo: registry-driven shape and twin tests, and the SE block against its formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import robustse as rs
from robustse.core.errors import ModelError
from robustse.models import SEBlock, model_info, register_model, se_hidden

ALL = rs.list_models()
SE_MODELS = [n for n in ALL if model_info(n).has_se]


def test_registry_has_at_least_three_twin_families():
    families = {model_info(n).family for n in ALL}
    assert {"small_cnn", "cnn", "resnet20"} <= families
    for fam in families:
        assert fam in ALL and f"se_{fam}" in ALL, f"{fam} lacks a twin"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_forward_shapes(name, channels, size):
    torch.manual_seed(0)
    model = rs.create_model(name, num_classes=7, in_channels=channels).eval()
    out = model(torch.rand(3, channels, size, size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    assert model.robustse_arch == name


@pytest.mark.parametrize("name", SE_MODELS)
def test_twins_identical_except_se(name):
    se_model = rs.create_model(name)
    plain = rs.create_model(model_info(name).twin)
    se_params = dict(se_model.named_parameters())
    plain_params = dict(plain.named_parameters())
    se_only = {k for k in se_params if ".se." in k}
    assert se_only, "the SE twin has no SE parameters"
    assert set(se_params) - se_only == set(plain_params)
    for k, p in plain_params.items():
        assert se_params[k].shape == p.shape, k
    n_se_blocks = sum(isinstance(m, SEBlock) for m in se_model.modules())
    assert len(rs.find_gates(se_model)) == n_se_blocks > 0
    assert rs.find_gates(plain) == {}
    # the gate is a named submodule, reachable by its qualified name
    for gate_name, gate in rs.find_gates(se_model).items():
        assert gate_name.endswith(".se.gate")
        assert se_model.get_submodule(gate_name) is gate


def test_se_block_matches_formula_on_hand_made_tensor():
    se = SEBlock(4, reduction=2, min_hidden=1)  # hidden = 2
    assert se.hidden == 2
    with torch.no_grad():
        se.fc1.weight.copy_(torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.0, 2.0, 0.0, -1.0]]))
        se.fc1.bias.copy_(torch.tensor([0.1, -0.2]))
        se.fc2.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 0.5], [-2.0, 0.0], [0.0, 3.0]]))
        se.fc2.bias.copy_(torch.tensor([0.0, 0.1, 0.2, -0.3]))
    u = torch.tensor(
        [
            [
                [[1.0, 2.0], [3.0, 4.0]],  # channel means: 2.5, 0, -1, 1
                [[0.0, 0.0], [0.0, 0.0]],
                [[-1.0, -1.0], [-1.0, -1.0]],
                [[2.0, 0.0], [2.0, 0.0]],
            ]
        ]
    )
    z = [2.5, 0.0, -1.0, 1.0]
    h = [max(0.0, 1 * z[0] - z[2] + 0.5 * z[3] + 0.1), max(0.0, 2 * z[1] - z[3] - 0.2)]  # [4.1, 0]
    pre = [h[0] - h[1], 0.5 * h[0] + 0.5 * h[1] + 0.1, -2 * h[0] + 0.2, 3 * h[1] - 0.3]
    s = [1 / (1 + math.exp(-p)) for p in pre]
    expected = u * torch.tensor(s).view(1, 4, 1, 1)
    captured = {}
    se.gate.register_forward_hook(lambda m, i, o: captured.setdefault("s", o))
    y = se(u)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(captured["s"], torch.tensor([s]), rtol=1e-6, atol=1e-6)


def test_se_block_max_squeeze_and_hardsigmoid():
    se = SEBlock(2, reduction=1, squeeze="max", gate="hardsigmoid")
    with torch.no_grad():
        for lin in (se.fc1, se.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        se.fc1.weight.copy_(torch.eye(4, 2))  # hidden = max(2 // 1, 4) = 4
        se.fc2.weight.copy_(torch.eye(2, 4))
    u = torch.tensor([[[[1.0, 5.0]], [[-3.0, 2.0]]]])  # max per channel: 5, 2
    s = torch.tensor([min(1.0, max(0.0, 5 / 6 + 0.5)), min(1.0, max(0.0, 2 / 6 + 0.5))])
    torch.testing.assert_close(se(u), u * s.view(1, 2, 1, 1))


def test_se_hidden_width_floor():
    assert se_hidden(64, 16) == 4
    assert se_hidden(16, 16) == 4
    assert se_hidden(256, 16) == 16
    assert SEBlock(16, reduction=16).hidden == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduction": 0}, "reduction"),
        ({"squeeze": "median"}, "squeeze.*avg, max"),
        ({"gate": "tanh"}, "gate.*sigmoid"),
    ],
)
def test_se_options_are_validated(kwargs, match):
    with pytest.raises(ModelError, match=match):
        rs.create_model("se_small_cnn", **kwargs)


def test_se_options_change_the_model():
    m = rs.create_model("se_resnet20", reduction=4, squeeze="max", gate="hardsigmoid")
    se = m.blocks[0].se
    assert se.hidden == 4 and isinstance(se.squeeze, nn.AdaptiveMaxPool2d) and isinstance(se.gate, nn.Hardsigmoid)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError, match="unknown architecture 'resnet21'.*se_resnet20"):
        rs.create_model("resnet21")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ModelError, match="resnet20: unknown option 'reduction'.*num_classes"):
        rs.create_model("resnet20", reduction=4)


def test_list_models_pattern():
    assert rs.list_models("*resnet*") == ["resnet20", "se_resnet20", "static_resnet20"]


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("cnn", family="cnn", description="dup")(lambda: nn.Identity())


def test_normalize_is_first_and_travels_in_state_dict():
    m = rs.create_model("small_cnn", mean=[0.5], std=[0.25]).eval()
    assert list(dict(m.named_children()))[0] == "normalize"
    assert "normalize.mean" in m.state_dict()
    x = torch.full((1, 1, 28, 28), 0.75)
    torch.testing.assert_close(m.normalize(x), torch.ones_like(x))


def test_torchvision_model_gates_equal_squeeze_excitation_count():
    from torchvision.ops import SqueezeExcitation

    m = rs.create_model("torchvision:mobilenet_v3_small", num_classes=10, in_channels=1).eval()
    n_se = sum(isinstance(x, SqueezeExcitation) for x in m.modules())
    gates = rs.find_gates(m)
    assert len(gates) == n_se > 0
    assert all(name.endswith("scale_activation") for name in gates)
    assert m(torch.rand(2, 1, 32, 32)).shape == (2, 10)


def test_unknown_torchvision_model_suggests():
    with pytest.raises(ModelError, match="unknown torchvision classifier 'resnet181'.*resnet18"):
        rs.create_model("torchvision:resnet181")


@pytest.mark.parametrize("shape", [(16, 8, 28, 28), (4, 32, 14, 14), (3, 4, 7, 7), (2, 3, 9, 6)])
def test_fast_max_pool_equals_torch_values_and_gradients(shape):
    from robustse.models.layers import MaxPool2d

    torch.manual_seed(0)
    x = torch.relu(torch.randn(*shape)).round()  # many ties: zeros and equal integers
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = torch.nn.MaxPool2d(2)(a), MaxPool2d(2)(b)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
    with torch.no_grad():
        assert torch.equal(torch.nn.MaxPool2d(2)(x), MaxPool2d(2)(x))
        cl = x.contiguous(memory_format=torch.channels_last)
        assert MaxPool2d(2)(cl).is_contiguous(memory_format=torch.channels_last)


def test_fast_max_pool_steps_aside_for_the_compiler(monkeypatch):
    # torch.compile cannot trace the channels_last autograd function; while compiling, the layer
    # is plain nn.MaxPool2d (the compiler picks its own kernels)
    from robustse.models import layers

    def refuse(*args):  # noqa: ANN002
        raise AssertionError("the channels_last function ran while compiling")

    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    monkeypatch.setattr(layers._ChannelsLastMaxPool, "apply", refuse)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y = layers.MaxPool2d(2)(x)
    assert torch.equal(y, torch.nn.MaxPool2d(2)(x))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    with pytest.raises(AssertionError, match="channels_last function ran"):
        layers.MaxPool2d(2)(x)


def _pooled_reference(se: SEBlock, u: torch.Tensor) -> torch.Tensor:
    """The SE block as its formula reads, squeeze through ``AdaptiveAvgPool2d`` (PyTorch's backward)."""
    s = se.gate(se.fc2(se.act(se.fc1(se.squeeze(u).flatten(1)))))
    return u * s[:, :, None, None]


@pytest.mark.parametrize("channels_last", [False, True])
def test_se_squeeze_backward_is_pytorchs_bit_for_bit(channels_last):
    """The SE squeeze's own backward (a broadcast view, not a full tensor) gives PyTorch's
    gradients exactly: input and parameters, in either memory layout."""
    torch.manual_seed(0)
    se = SEBlock(16)
    u0 = torch.randn(8, 16, 12, 12)
    u0 = u0.contiguous(memory_format=torch.channels_last) if channels_last else u0
    g = torch.randn_like(u0)
    leaf = u0.clone().requires_grad_(True)
    paths = (se, lambda u: _pooled_reference(se, u))
    grads = [torch.autograd.grad(f(leaf * 1.5), [leaf, *se.parameters()], g) for f in paths]
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_se_squeeze_keeps_hooks_and_second_derivatives():
    """A hooked squeeze module still runs (its hook fires), and the squeeze's backward is itself
    differentiable (a gradient penalty's double backward)."""
    torch.manual_seed(0)
    se = SEBlock(4, reduction=2, min_hidden=1).double()
    u = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(se, (u,))
    seen = []
    se.squeeze.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    torch.testing.assert_close(se(u), _pooled_reference(se, u), rtol=0, atol=0)
    assert seen == [torch.Size([2, 4, 1, 1])] * 2
