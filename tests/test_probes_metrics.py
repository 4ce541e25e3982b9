"""Gate capture and the measurements of README "Metrics" on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

import robustse as rs
from robustse.models import SEBlock
from robustse.models.gates import find_blocks
from robustse.probes import metrics as M
from robustse.probes.capture import capture


def test_capture_se_resnet20_gates_inputs_outputs_blocks():
    torch.manual_seed(0)
    model = rs.create_model("se_resnet20").eval()
    x = torch.rand(3, 1, 28, 28)
    with capture(model) as rec:
        model(x)
    assert len(rec.gates) == 9 and len(rec.blocks) == 9
    for name, s in rec.gates.items():
        se = model.get_submodule(name.rsplit(".", 1)[0])
        assert isinstance(se, SEBlock) and s.shape == (3, se.channels)
        u, y = rec.gate_inputs[name], rec.gate_outputs[name]
        torch.testing.assert_close(y, u * s[:, :, None, None])  # y = s ⊙ u
        z = u.mean(dim=(2, 3))
        torch.testing.assert_close(s, torch.sigmoid(se.fc2(torch.relu(se.fc1(z)))))
    assert rec.blocks["blocks.8"].shape == (3, 64, 7, 7)


def test_plain_model_has_no_gates_but_a_full_profile():
    model = rs.create_model("resnet20").eval()
    with capture(model) as rec:
        model(torch.rand(2, 1, 28, 28))
    assert rec.gates == {} and list(rec.blocks) == list(find_blocks(rs.create_model("se_resnet20")))
    assert len(rec.blocks) == 9


def test_hooks_are_removed_even_after_an_exception():
    model = rs.create_model("se_small_cnn").eval()
    with pytest.raises(RuntimeError, match="boom"), capture(model) as rec:
        model(torch.rand(1, 1, 28, 28))
        raise RuntimeError("boom")
    assert rec.gates
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_torchvision_gates_are_vectors():
    from torchvision.ops import SqueezeExcitation

    model = rs.create_model("torchvision:mobilenet_v3_small", num_classes=10, in_channels=1).eval()
    with capture(model) as rec:
        model(torch.rand(2, 1, 32, 32))
    assert len(rec.gates) == sum(isinstance(m, SqueezeExcitation) for m in model.modules())
    assert all(s.dim() == 2 and s.shape[0] == 2 for s in rec.gates.values())
    assert rec.blocks  # InvertedResidual blocks


def test_output_metrics_by_hand():
    f = torch.tensor([[3.0, 4.0, 0.0]])
    fp = torch.tensor([[0.0, 0.0, 0.0]])
    delta = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])  # ‖δ‖ = 1
    assert M.logit_sensitivity(f, fp, delta).item() == pytest.approx(5.0)
    assert M.logit_change(f, fp).item() == pytest.approx(1.0)
    p = torch.softmax(f, 1)[0]
    expected_kl = float((p * (p.log() - math.log(1 / 3))).sum())
    assert M.kl(f, fp).item() == pytest.approx(expected_kl, rel=1e-5)
    assert M.flip(f, fp).item() is True  # argmax 1 → argmax 0 (ties resolve to the first)
    assert M.margin(f, torch.tensor([1])).item() == pytest.approx(1.0)
    assert M.margin(f, torch.tensor([2])).item() == pytest.approx(-4.0)


def test_everything_is_zero_without_a_perturbation():
    f, x = torch.randn(4, 10), torch.rand(4, 1, 5, 5)
    s, u = torch.rand(4, 6), torch.rand(4, 6, 3, 3)
    assert (M.logit_sensitivity(f, f, x - x) == 0).all() and (M.logit_change(f, f) == 0).all()
    assert torch.allclose(M.kl(f, f), torch.zeros(4), atol=1e-6) and not M.flip(f, f).any()
    assert (M.gate_drift(s, s) == 0).all()
    assert torch.allclose(M.gate_cosine_distance(s, s), torch.zeros(4), atol=1e-6)
    assert (M.relative_change(u, u) == 0).all()
    assert M.damping(u, u, u, u).isnan().all() and M.amplification(u, u, x, x).isnan().all()


def test_gate_drift_and_cosine_by_hand():
    s = torch.tensor([[1.0, 0.0]])
    sp = torch.tensor([[0.0, 1.0]])
    assert M.gate_drift(s, sp).item() == pytest.approx(math.sqrt(2))
    assert M.gate_cosine_distance(s, sp).item() == pytest.approx(1.0)
    assert M.gate_cosine_distance(s, 2 * s).item() == pytest.approx(0.0, abs=1e-7)


def test_damping_is_exactly_one_for_a_constant_gate():
    u = torch.rand(3, 4, 5, 5)
    up = u + 0.1 * torch.randn_like(u)
    gate = 0.37  # the same s for clean and perturbed input, every channel
    d = M.damping(u, up, gate * u, gate * up)
    torch.testing.assert_close(d, torch.ones(3))
    # a gate that closes on the perturbed input damps: output moves less than input
    closing = M.damping(u, up, u, 0.5 * up)
    assert (closing != 1).all()


def test_amplification_by_hand():
    x, xp = torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2) * 1.1  # input moves 10%
    h, hp = torch.ones(1, 3), torch.ones(1, 3) * 1.3  # block output moves 30%
    assert M.amplification(h, hp, x, xp).item() == pytest.approx(3.0)


def test_clean_gates_on_an_unperturbed_input_changes_nothing():
    from robustse.probes.capture import clean_gates_logits

    torch.manual_seed(0)
    model = rs.create_model("se_resnet20").eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(clean_gates_logits(model, x, x), ref, rtol=0, atol=0)
    x_adv = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        adaptive = model(x_adv)
    assert not torch.allclose(clean_gates_logits(model, x, x_adv), adaptive)  # the gates did adapt
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_fixed_gates_with_ones_pass_u_through():
    from robustse.probes.capture import fixed_gates

    model = rs.create_model("se_small_cnn").eval()
    names = list(rs.find_gates(model))
    ones = {n: torch.ones(model.get_submodule(n.rsplit(".", 1)[0]).channels) for n in names}
    with torch.no_grad(), fixed_gates(model, ones), capture(model) as rec:
        model(torch.rand(2, 1, 28, 28))
    for n in names:
        torch.testing.assert_close(rec.gate_outputs[n], rec.gate_inputs[n])  # y = 1 ⊙ u
    with pytest.raises(KeyError, match="not a gate"), fixed_gates(model, {"head": torch.ones(3)}):
        pass


def test_drift_command_se_and_plain(tmp_path, trained_small):
    import json

    from click.testing import CliRunner

    from robustse.cli import cli

    _, _, _, ckpt = trained_small
    png = tmp_path / "d.png"
    res = CliRunner().invoke(
        cli,
        ["--quiet", "drift", str(ckpt), "--eps", "0.03", "--eval-subset", "64", "--plot", str(png), "--json"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout, parse_constant=lambda token: pytest.fail(f"non-strict JSON: {token}"))["result"]
    squeeze = [r for r in rows if r["kind"] == "squeeze"]
    assert {r["site"] for r in squeeze} == {"blocks.0.se", "blocks.1.se"}  # the premise, at every SE site
    assert all(r["squeeze_attenuation"] > 0 for r in squeeze)
    gates = [r for r in rows if r["kind"] == "gate"]
    assert {r["perturbation"] for r in gates} == {"pgd", "noise"} and len(gates) == 2 * 2
    for r in gates:
        assert r["gate_drift"] > 0 and r["input_drift"] > 0 and r["channel_gain"] > 0
        assert r["channel_gain"] == pytest.approx(r["output_drift"] / r["input_drift"], rel=0.5)
    pgd = {r["site"]: r for r in rows if r["perturbation"] == "pgd"}
    assert pgd["blocks.0"]["logit_sensitivity"] > 0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    plain = tmp_path / "plain.safetensors"
    rs.save_checkpoint(rs.create_model("small_cnn"), plain, meta={"dataset": "fashion-mnist"})
    text = CliRunner().invoke(cli, ["--quiet", "drift", str(plain), "--eval-subset", "16"], catch_exceptions=False)
    assert text.exit_code == 0 and "no SE gates (a plain model)" in text.stdout and "blocks.1" in text.stdout
    bad = CliRunner().invoke(cli, ["drift", str(ckpt), "--eps", "2"], catch_exceptions=False)
    assert bad.exit_code == 2 and "Linf eps 2.0 > 1" in bad.stderr


def test_measure_drift_follows_the_pass_budget_without_changing_its_draws(trained_small, real_fmnist, monkeypatch):
    """uint8 images are made float a batch at a time (a large set is never converted whole); a
    pass budget of 7 rows' gradient graph takes gradients and records clean passes 7 rows at a
    time, with the same rows as whole batches (the draws are the batch's, whatever the budget:
    drift agrees across devices); each batch draws its own noise."""
    import robustse.attacks.base as A
    import robustse.attacks.evaluator as AE
    import robustse.core.passes as PS
    import robustse.experiment.drift as D
    from robustse.attacks import create_attack
    from robustse.data.base import to_float
    from robustse.data.datasets import load_dataset

    model = trained_small[0]
    ds = load_dataset("fashion-mnist", split="test").subset(24, seed=5)
    atk = create_attack("pgd", steps=2, seed=0)
    whole = D.measure_drift(model, to_float(ds.x), ds.y, attack=atk, eps=0.03, batch_size=12, rows=12)
    per_row = AE.grad_bytes_per_row(model, to_float(ds.x[:1]))
    monkeypatch.setattr(PS, "CPU_PASS_MEMORY", 7 * per_row + per_row // 2)
    converted, passes, snaps = [], [], []
    for name, seen in (("as_float_images", converted), ("snapshot", snaps)):
        real = getattr(D, name)
        monkeypatch.setattr(D, name, lambda x, *a, _r=real, _s=seen: _s.append(len(a[0] if a else x)) or _r(x, *a))
    grad = A._chunk_grad
    monkeypatch.setattr(A, "_chunk_grad", lambda m, x, y, b: passes.append(len(x)) or grad(m, x, y, b))
    parts = D.measure_drift(model, ds.x, ds.y, attack=atk, eps=0.03, batch_size=12)
    assert converted == [1, 12, 12]  # one row to measure the graph, then batch by batch
    assert max(passes) == 7 and snaps == [7, 5, 7, 5]
    assert len(parts) == len(whole) > 4
    for a, b in zip(parts, whole, strict=True):
        assert a.keys() == b.keys() and a["site"] == b["site"]
        near = {k: pytest.approx(b[k], rel=1e-4, abs=1e-7, nan_ok=True) for k in a if isinstance(a[k], float)}
        off = [(k, a[k], b[k]) for k in near if a[k] != near[k]]  # float rounding only (1 - cosine ~ 2e-6)
        assert not off, (a["perturbation"], a["site"], off)
    noise = create_attack("noise", seed=0)
    one, two = (noise(model, to_float(ds.x[:12]), ds.y[:12], epsilons=[0.03], stream=s).adversarials[0] for s in (0, 1))
    assert not torch.equal(one, two)  # batch b draws from stream b


def test_gate_reaction_splits_the_output_change_exactly():
    u, s = torch.rand(4, 6, 3, 3), torch.rand(4, 6)
    up, sp = u + 0.1 * torch.randn_like(u), (s + 0.05 * torch.randn_like(s)).clamp(0, 1)
    static, adaptive = M.gate_reaction(u, up, s, sp)
    y, yp = s[:, :, None, None] * u, sp[:, :, None, None] * up
    torch.testing.assert_close(static + adaptive, yp - y)  # Δy = s⊙Δu + Δs⊙u′
    torch.testing.assert_close(static, s[:, :, None, None] * (up - u))


def test_a_gate_that_cannot_move_has_adaptive_damping_exactly_one():
    u, s = torch.rand(3, 5, 4, 4), torch.rand(3, 5)  # a non-uniform gate: channel gain is not 1
    up = u + 0.2 * torch.randn_like(u)
    static, adaptive = M.gate_reaction(u, up, s, s.clone())
    torch.testing.assert_close(M.adaptive_damping(static, adaptive), torch.ones(3))
    assert (M.adaptive_share(static, adaptive) == 0).all()
    assert M.adaptive_alignment(static, adaptive).isnan().all()  # no reaction, no direction
    assert not torch.allclose(M.channel_gain(u, up, s[:, :, None, None] * u, s[:, :, None, None] * up), torch.ones(3))


def test_a_gate_that_closes_against_the_perturbation_damps_adaptively():
    u = torch.rand(2, 3, 2, 2) + 0.5
    up = u * 1.5  # the input grows by half along itself
    s = torch.full((2, 3), 0.8)
    static, adaptive = M.gate_reaction(u, up, s, s * 0.5)  # the gate closes: y' = 0.4 u′ = 0.6 u
    # ‖Δy‖ = ‖0.6u − 0.8u‖ = 0.2‖u‖; ‖s⊙Δu‖ = 0.4‖u‖
    torch.testing.assert_close(M.adaptive_damping(static, adaptive), torch.full((2,), 0.5))
    torch.testing.assert_close(M.adaptive_share(static, adaptive), torch.full((2,), 1.5))  # 0.6‖u‖ / 0.4‖u‖
    torch.testing.assert_close(M.adaptive_alignment(static, adaptive), torch.full((2,), -1.0))
