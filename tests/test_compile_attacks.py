"""Compiled attack passes in a sweep: the auto rule, hooks beside the compiler, and a compiled
sweep that gives the eager sweep's results up to float rounding."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from robustse.attacks import compiled as A
from robustse.cli import cli
from robustse.core.compiling import COMPILE_ENV, has_cxx_compiler
from robustse.core.config import SweepConfig
from robustse.core.errors import DeviceError, SpecError
from robustse.models.eval_copy import copy_for, reusing_copies, with_compiled_forward

from .test_cli import assert_user_error

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_compiler = pytest.mark.skipif(not has_cxx_compiler(), reason="inductor needs a C++ compiler on CPU")


def _graphs() -> int:
    """Graphs compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.fixture
def fresh_compiler():
    """No compiled graphs left from earlier tests (a graph cached in memory would not count again)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_auto_compiles_only_where_measured_faster(monkeypatch):
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    monkeypatch.setattr(A, "has_cxx_compiler", lambda: True)
    long, short = A.AUTO_MIN_PASSES, A.AUTO_MIN_PASSES - 1
    assert A.compiles_attacks("auto", CPU, arch="se_resnet20", passes=long)  # measured 1.12-1.19x
    assert not A.compiles_attacks("auto", CPU, arch="se_resnet20", passes=short)  # the warm-up would not pay
    assert not A.compiles_attacks("auto", CPU, arch="se_small_cnn", passes=10**6)  # measured 0.42-1.11x
    assert not A.compiles_attacks("auto", CPU, arch="timm:seresnet50", passes=10**6)  # a foreign model: not measured
    assert not A.compiles_attacks("auto", CUDA, arch="se_resnet20", passes=10**6)  # not measured yet
    monkeypatch.setattr(A, "AUTO_DEVICES", frozenset({"cpu", "cuda"}))
    assert A.compiles_attacks("auto", CPU) and A.compiles_attacks("auto", CUDA)
    monkeypatch.setattr(A, "has_cxx_compiler", lambda: False)
    assert not A.compiles_attacks("auto", CPU) and A.compiles_attacks("auto", CUDA)
    with pytest.raises(DeviceError, match="needs a C\\+\\+ compiler"):
        A.compiles_attacks("on", CPU)
    assert A.compiles_attacks("on", CUDA) and not A.compiles_attacks("off", CUDA)
    monkeypatch.setenv(COMPILE_ENV, "off")
    assert not A.compiles_attacks("auto", CUDA) and A.compiles_attacks("on", CUDA)
    with pytest.raises(SpecError, match="compile must be one of auto, on, off"):
        A.compiles_attacks("sometimes", CPU)


def test_planned_passes_count_steps_restarts_rungs_and_batches():
    from robustse.attacks import create_attack

    pgd, fgsm = create_attack("pgd", steps=7, restarts=2), create_attack("fgsm")
    assert A.planned_passes([(pgd, 3), (fgsm, 5)], 4) == (7 * 2 * 3 + 5) * 4


def test_sweep_config_and_cli_refuse_an_unknown_setting(tmp_path):
    with pytest.raises(SpecError, match="sweep.compile must be one of auto, on, off"):
        SweepConfig(compile="sometimes")  # type: ignore[arg-type]
    assert SweepConfig(compile="on").run_options()["compile"] == "on"
    spec = tmp_path / "s.toml"
    spec.write_text('[sweep]\ncompile = "sometimes"\nmodels = ["m.safetensors"]\n')
    res = CliRunner().invoke(cli, ["sweep", "--spec", str(spec)], catch_exceptions=False)
    assert_user_error(res, "sweep.compile: 'sometimes' is not one of 'auto', 'on', 'off'")
    res = CliRunner().invoke(cli, ["sweep", "m.safetensors", "--compile", "sometimes"], catch_exceptions=False)
    assert_user_error(res, "'sometimes' is not one of 'auto', 'on', 'off'")


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    logits = model(x)
    return logits.detach(), torch.autograd.grad(F.cross_entropy(logits, y), x)[0]


@needs_compiler
def test_a_compiled_forward_runs_eager_while_hooks_sit_inside(fresh_compiler):
    """The compiler ignores hooks added after it traced (it does not guard on them): the compiled
    forward must notice them itself, run them eagerly, and go back to the graph once they are gone;
    hooks on the module itself fire either way."""
    model, gen = _tiny(), torch.Generator().manual_seed(1)
    x, y = torch.rand(8, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    calls = []
    model.register_forward_pre_hook(lambda m, inp: calls.append(len(inp[0])))
    fast = with_compiled_forward(model)
    before = _graphs()
    logits, grad = _input_grad(fast, x, y)
    assert _graphs() > before  # it did compile
    want_logits, want_grad = _input_grad(model, x, y)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    assert calls == [8, 8]  # the outer hook fired on the compiled path too

    hook = model[1].register_forward_hook(lambda m, inp, out: out * 2)  # after the trace
    torch.testing.assert_close(fast(x), model(x))
    assert not torch.allclose(fast(x), want_logits)  # the hook took effect
    hook.remove()
    torch.testing.assert_close(fast(x), want_logits, rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(model)  # the model itself is untouched

    every = nn.modules.module.register_module_forward_hook(lambda m, inp, out: out * 2 if m is model[1] else None)
    try:
        torch.testing.assert_close(fast(x), model(x))  # a hook on every module reaches inside too
        assert not torch.allclose(fast(x), want_logits)
    finally:
        every.remove()


@needs_compiler
def test_a_forward_past_the_recompile_limit_runs_eager_with_a_warning(fresh_compiler, monkeypatch):
    """The compiler quietly runs eager past its recompile limit; the compiled forward says so."""
    import torch._dynamo.config as dynamo_config

    import robustse.models.eval_copy as E

    monkeypatch.setattr(E, "RECOMPILE_LIMIT", 1)
    model = _tiny()
    fast = with_compiled_forward(model)
    with dynamo_config.patch(recompile_limit=1):
        torch.testing.assert_close(fast(torch.ones(4, 1, 8, 8)), model(torch.ones(4, 1, 8, 8)))
        x = torch.rand(5, 1, 8, 8)  # a second shape: a second graph, past the limit
        with pytest.warns(UserWarning, match="torch.compile could not take Sequential; it runs eager"):
            torch.testing.assert_close(fast(x), model(x))
        graphs = _graphs()
        torch.testing.assert_close(fast(x * 2), model(x * 2))  # eager from then on
        assert _graphs() == graphs


@needs_compiler
def test_reusing_copies_compiled_hands_out_one_compiled_copy_per_model():
    model, x = _tiny(), torch.rand(4, 1, 8, 8)
    assert "forward" not in vars(copy_for(model, x))  # outside the block: a plain copy per call
    with reusing_copies(compiled=True):
        first = copy_for(model, x)
        assert first is copy_for(model, x) and "forward" in vars(first)
    with reusing_copies():
        assert "forward" not in vars(copy_for(model, x))


@needs_compiler
def test_a_compiled_sweep_gives_the_eager_sweeps_results(tmp_path, trained_small, fresh_compiler):
    """One checkpoint, FGSM, PGD and noise with every probe and the held-gates intervention, swept
    compiled and eager: the same predictions, margins and probe values up to float rounding."""
    _, _, _, ckpt = trained_small
    args = ["--quiet", "sweep", str(ckpt), "--eval-subset", "64", "--batch-size", "64", "--eps", "0,0.02,0.1",
            "--attack", "fgsm", "--attack", "pgd(steps=3)", "--attack", "noise",
            "--intervention", "held_gates"]  # fmt: skip
    tables = {}
    for mode in ("off", "on"):
        before = _graphs()
        res = CliRunner().invoke(cli, [*args, "--compile", mode, "--out", str(tmp_path / mode)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        assert (_graphs() > before) == (mode == "on")
        tables[mode] = pd.read_csv(tmp_path / mode / "results.csv")
    on, off = tables["on"], tables["off"]
    assert len(on) == len(off) == 64 * 3 * 3 * 2  # two models: the SE model and its held-gates twin
    assert (on["adv_pred"] != off["adv_pred"]).mean() < 0.01  # a rounding-level gradient may flip a sign
    numeric = [c for c in off.columns if off[c].dtype.kind == "f"]
    assert {"adv_margin", "logit_sensitivity", "cg_sensitivity", "fm_sensitivity"} <= set(numeric)
    close = ((on[numeric] - off[numeric]).abs() <= 1e-3 + 1e-3 * off[numeric].abs()) | off[numeric].isna()
    assert close.mean().min() > 0.99, close.mean()


@needs_compiler
def test_a_model_that_refuses_channels_last_is_attacked_compiled_in_its_own_layout(fresh_compiler):
    """The compiler reports the ``.view`` that channels_last strides refuse in its own words; the
    compiled copy hands the model's own error on, so the attack retries in the default layout."""
    from robustse.attacks import create_attack

    from .test_eval_copy import _ViewNet, settled

    torch.manual_seed(0)
    model = settled(_ViewNet())
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    with reusing_copies(compiled=True):
        fast = create_attack("pgd", steps=3, random_start=False)(model, x, y, epsilons=[0.05]).adversarials[0]
    assert _graphs() >= 1  # compiled, in the default layout
    exact = create_attack("pgd", steps=3, random_start=False, exact=True)(model, x, y, epsilons=[0.05]).adversarials[0]
    assert ((fast - exact).abs() > 1e-6).float().mean() < 0.01  # a rounding-level gradient may flip a sign


@pytest.mark.parametrize(("min_passes", "compiled"), [(1, True), (10**6, False)])
def test_a_sweep_under_auto_compiles_a_measured_family_once_its_plan_is_long_enough(
    tmp_path, trained_small, monkeypatch, min_passes, compiled
):
    """The sweep asks the rule per model with its family and planned passes (here small_cnn's
    family is made a measured one; the compiled copy is stubbed, so nothing compiles)."""
    import robustse.models.eval_copy as E

    made: list[nn.Module] = []
    monkeypatch.setattr(E, "with_compiled_forward", lambda m: made.append(m) or m)
    monkeypatch.setattr(A, "has_cxx_compiler", lambda: True)
    monkeypatch.setattr(A, "AUTO_CPU_FAMILIES", frozenset({"small_cnn"}))
    monkeypatch.setattr(A, "AUTO_MIN_PASSES", min_passes)
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    _, _, _, ckpt = trained_small
    res = CliRunner().invoke(cli, ["sweep", str(ckpt), "--eval-subset", "32", "--eps", "0,0.02", "--attack", "fgsm",
                                   "--no-probes", "--out", str(tmp_path / "o")], catch_exceptions=False)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert bool(made) == compiled
    assert ("attack passes compiled" in res.output) == compiled  # the log says so
