"""The attacks' eval-mode copy (README "Performance"): the model's function up to float rounding,
for every registered model, with the model itself untouched and its hooks still firing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import robustse as rs
from robustse.attacks import create_attack
from robustse.core.errors import AttackError
from robustse.models.eval_copy import EvalAffine, eval_copy


def settled(model: nn.Module) -> nn.Module:
    """``model`` with batch-norm statistics and scales away from their defaults, in eval mode."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5, generator=gen)
                m.bias.data.uniform_(-0.2, 0.2, generator=gen)
    return model.eval()


def logits_and_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    logits = model(x)
    w = torch.linspace(-1, 1, logits.shape[1], dtype=logits.dtype)  # a loss whose gradient is not ~0
    (grad,) = torch.autograd.grad((logits * w).sum(), x)
    return logits.detach(), grad


@pytest.mark.parametrize("name", rs.list_models())
@pytest.mark.parametrize("channels_last", [False, True])
def test_same_function_and_the_model_untouched(name, channels_last):
    torch.manual_seed(0)
    model = settled(rs.create_model(name, num_classes=10, in_channels=3)).double()  # float64: no rounding
    before = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
    view = eval_copy(model, channels_last=channels_last)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in view.modules())  # every one folded or affine
    assert not any(m.training for m in view.modules())  # a sweep's check counts training-mode passes
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    ref_logits, ref_grad = logits_and_grad(model, x)
    logits, grad = logits_and_grad(view, x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-9 * float(ref_grad.abs().max()))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].stride() == s for k, (v, s) in before.items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_folds_into_the_convolution_before_and_lays_out_weights():
    model = settled(rs.create_model("small_cnn", num_classes=10, in_channels=1))
    view = eval_copy(model, channels_last=True)
    conv, bn = view.blocks[0].convs[0][0], view.blocks[0].convs[0][1]
    assert isinstance(bn, nn.Identity) and conv.bias is not None  # the batch norm lives in the conv now
    assert conv.weight.stride() == (9, 1, 3, 1)  # channels_last, even for one input channel
    assert view.head is model.head  # untouched modules are the model's own


def test_a_batch_norm_not_after_a_conv_becomes_affine():
    model = settled(rs.create_model("resnet20", num_classes=10, in_channels=1))
    view = eval_copy(model)
    assert isinstance(view.blocks[0].bn1, EvalAffine)  # resnet blocks call conv and bn as attributes


def copy_and_run_with(model: nn.Module, *handles) -> nn.Module:  # type: ignore[no-untyped-def]
    """The channels_last eval copy of ``model``, run once on two images while ``handles``' hooks
    are registered (removed afterwards)."""
    try:
        view = eval_copy(model, channels_last=True)
        view(torch.rand(2, 1, 28, 28))
    finally:
        for h in handles:
            h.remove()
    return view


def test_hooks_fire_and_hooked_modules_stay():
    torch.manual_seed(0)
    model = settled(rs.create_model("se_small_cnn", num_classes=10, in_channels=1))
    seen = []
    gate = model.blocks[0].se.gate
    bn = model.blocks[1].convs[0][1]
    view = copy_and_run_with(
        model,
        gate.register_forward_hook(lambda m, i, o: seen.append("gate")),
        bn.register_forward_hook(lambda m, i, o: seen.append("bn")),
    )
    assert seen == ["gate", "bn"]
    assert view.blocks[1].convs[0][1] is bn  # a hooked batch norm is left as it is ...
    assert isinstance(view.blocks[0].convs[0][1], nn.Identity)  # ... the others are folded
    assert view.blocks[0].convs[0][0].weight.stride() == (9, 9, 3, 1)  # hooks inside: the layout stays


def test_hooks_on_the_model_itself_or_marked_any_layout_keep_channels_last():
    from robustse.models.eval_copy import any_layout

    model = settled(rs.create_model("se_small_cnn", num_classes=10, in_channels=1))
    gate = model.blocks[0].se.gate
    seen = []
    view = copy_and_run_with(
        model,
        model.register_forward_pre_hook(lambda m, i: seen.append("model")),  # sees the input, as given
        gate.register_forward_hook(any_layout(lambda m, i, o: seen.append(o.shape))),
    )
    assert seen == ["model", (2, 16)]
    assert view.blocks[0].convs[0][0].weight.stride() == (9, 1, 3, 1)  # channels_last all the same


def test_batch_statistics_in_eval_are_left_alone():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert eval_copy(model) is model  # nothing to fold: it normalizes with each batch's statistics


def test_torchvision_conv_norm_activation_is_folded():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = settled(torchvision.models.mobilenet_v3_small(num_classes=10))
    view = eval_copy(model, channels_last=True)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(view(x), model(x), rtol=1e-4, atol=1e-4)
    assert isinstance(view.features[0][1], nn.Identity)


def test_attacks_default_to_the_copy_and_exact_to_the_model():
    torch.manual_seed(0)
    model = settled(rs.create_model("small_cnn", num_classes=10, in_channels=1))
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    kinds = []
    handle = model.register_forward_pre_hook(lambda m, i: kinds.append(type(m.blocks[0].convs[0][1]).__name__))
    try:
        create_attack("fgsm")(model, x, y, epsilons=[0.1])
        create_attack("fgsm", exact=True)(model, x, y, epsilons=[0.1])
    finally:
        handle.remove()
    assert kinds == ["Identity", "BatchNorm2d"]
    assert create_attack("fgsm", exact=True).describe()["exact"] is True  # a cell of its own in a store
    assert "exact" not in create_attack("fgsm").describe()  # the default's cells keep their identity
    with pytest.raises(AttackError, match=r"exact must be true or false \(got 'yes'\)"):
        create_attack("pgd", exact="yes")


class _Residual(nn.Sequential):
    """A Sequential whose forward reads the conv's output twice: folding would change it."""

    def forward(self, x):  # type: ignore[no-untyped-def]
        y = self[0](x)
        return self[1](y) + y


@pytest.mark.parametrize("channels_last", [False, True])
def test_odd_modules_keep_their_function(channels_last):
    torch.manual_seed(0)
    model = nn.Sequential(
        _Residual(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 6), nn.BatchNorm1d(6),
    )  # fmt: skip
    settled(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model = model.double()
    view = eval_copy(model, channels_last=channels_last)
    assert isinstance(view[0][1], EvalAffine)  # inside the custom forward: affine, not folded
    assert isinstance(view[2], nn.Identity) and isinstance(view[6], EvalAffine)  # folded; after a Linear: affine
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    for a, b in zip(logits_and_grad(model, x), logits_and_grad(view, x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_a_stacked_model_keeps_its_function():
    from robustse.models.stacked import MemberRows, member_rows, stack_models

    torch.manual_seed(0)
    members = [settled(rs.create_model("se_small_cnn", num_classes=10, in_channels=1)) for _ in range(3)]
    model = MemberRows(stack_models(members)).double().eval()
    view = eval_copy(model, channels_last=True)
    x = member_rows(torch.rand(4, 1, 28, 28, dtype=torch.float64), 3)
    for a, b in zip(logits_and_grad(model, x), logits_and_grad(view, x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


class _ViewNet(nn.Module):
    """The classic MNIST net's pattern: ``.view`` right after a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):  # type: ignore[no-untyped-def]
        h = self.bn(self.conv(x)).relu()
        return self.fc(h.view(h.size(0), -1))


def test_a_model_that_needs_its_own_layout_is_attacked_in_it():
    torch.manual_seed(0)
    model = settled(_ViewNet())
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        eval_copy(model, channels_last=True)(x)  # what the attack meets first
    fast = create_attack("pgd", steps=3, random_start=False)(model, x, y, epsilons=[0.05]).adversarials[0]
    exact = create_attack("pgd", steps=3, random_start=False, exact=True)(model, x, y, epsilons=[0.05]).adversarials[0]
    assert (fast - exact).abs().max() <= 0.05 * 2  # both in the ball; the copy in the default layout
    assert create_attack("fgsm").clean_gradient(model, x, y) is not None  # the shared gradient too


def test_torchattacks_attacks_take_exact_too():
    atk = create_attack("torchattacks:PGD", exact=True, steps=2)
    assert atk.exact and atk.describe()["exact"] is True
    assert "exact" not in create_attack("torchattacks:PGD", steps=2).describe()


def _probe_columns(model: nn.Module, x: torch.Tensor, x_p: torch.Tensor, y: torch.Tensor):
    from robustse.probes.capture import clean_gate_values
    from robustse.probes.cell import CellProbe

    means = {name: s.mean(0) for name, s in clean_gate_values(model, x).items()}  # frozen_mean's values
    probe = CellProbe(len(x), gate_means=means or None)
    probe.add(model, x, x_p, y, 0)
    return probe.outputs, probe.values


def test_probes_run_the_eval_copy_and_measure_what_the_model_measures(monkeypatch):
    """A cell's probe passes (recorded clean pass, perturbed pass, clean_gates) run the model's
    eval copy, channels_last on a CPU: the same measurements as passes of the model itself, up
    to float rounding (float64 here: gate drift of an untrained model is near float32's resolution)."""
    import robustse.probes.cell as C

    torch.manual_seed(0)
    model = settled(rs.create_model("se_small_cnn")).double()
    x = torch.rand(16, 1, 28, 28, dtype=torch.float64)
    x_p, y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1), torch.randint(0, 10, (16,))
    used = []
    real = C.copy_for
    monkeypatch.setattr(C, "copy_for", lambda m, t: used.append(real(m, t)) or used[-1])
    fast = _probe_columns(model, x, x_p, y)
    assert used and all(c is not model and c.blocks is not model.blocks for c in used)
    monkeypatch.setattr(C, "copy_for", lambda m, t: m)
    slow = _probe_columns(model, x, x_p, y)
    for got, want in zip(fast, slow, strict=True):
        assert list(got) == list(want) and len(want) > 3
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-12, equal_nan=True, msg=str(key))


def test_a_model_that_needs_its_own_layout_is_probed_in_it():
    torch.manual_seed(0)
    model = settled(_ViewNet())
    x = torch.rand(6, 1, 28, 28)
    outputs, _ = _probe_columns(model, x, (x + 0.05).clamp(0, 1), torch.randint(0, 10, (6,)))
    assert outputs["logit_sensitivity"].isfinite().all() and (outputs["logit_sensitivity"] > 0).all()


def test_a_sweep_reuses_one_copy_per_model_and_layout():
    """Inside ``reusing_copies`` (a sweep, model by model) every pass of a model runs one copy; the
    same adversarials as copies built per call; outside, every call builds its own."""
    from robustse.models.eval_copy import copy_for, reusing_copies

    torch.manual_seed(0)
    model = settled(rs.create_model("se_small_cnn"))
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    pgd = create_attack("pgd", steps=3)
    fresh = pgd(model, x, y, epsilons=[0.05]).adversarials[0]
    assert copy_for(model, x) is not copy_for(model, x)
    with reusing_copies():
        first = copy_for(model, x)
        assert copy_for(model, x) is first and copy_for(model, x[0, 0]) is not first  # another layout
        reused = pgd(model, x, y, epsilons=[0.05]).adversarials[0]
        assert copy_for(model, x) is first
    assert copy_for(model, x) is not first
    assert torch.equal(reused, fresh)
