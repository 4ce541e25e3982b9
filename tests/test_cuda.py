"""CUDA readiness, checked when a GPU is present (skipped otherwise): a sweep on CUDA agrees with the
CPU, batched training learns on CUDA, compiled training matches eager, the attacks' eval-mode copy is
the same function there, a compiled sweep matches an eager one, and a one-node torchrun NCCL
sweep equals one process.
`make gpu-check` runs these and the throughput benchmarks with --device cuda."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from robustse.core.store import ResultsStore

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
]


def _sweep(args: list[str], *, nproc: int = 1, device: str = "cpu") -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    cli = ["-m", "robustse.cli", "--quiet", "--device", device, "sweep", *args]
    cmd = [sys.executable, *cli]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})


def test_sweep_on_cuda_agrees_with_cpu(trained_small, tmp_path):
    _, _, _, ckpt = trained_small
    args = [str(ckpt), "--attack", "fgsm", "--attack", "pgd(steps=5)", "--eps", "0,0.02,0.05", "--eval-subset", "500"]
    runs = {d: _sweep([*args, "--out", str(tmp_path / d)], device=d) for d in ("cpu", "cuda")}
    for d, r in runs.items():
        assert r.returncode == 0, (d, r.stderr[-3000:])
    with ResultsStore(tmp_path / "cpu" / "results.db") as a, ResultsStore(tmp_path / "cuda" / "results.db") as b:
        ca, cb = a.cells().set_index(["attack", "eps"]), b.cells().set_index(["attack", "eps"])
        acc = (ca.correct / ca.n - cb.correct / cb.n).abs()
        assert (acc <= 0.005).all(), acc  # within 0.5 pp at every cell
        eps = cb.reset_index().eps.to_numpy()
        assert (cb.max_linf.to_numpy() <= eps + 1e-6).all()  # adversarials inside the ball
        assert (cb.min_pixel >= 0).all() and (cb.max_pixel <= 1).all()


def test_batched_training_learns_on_cuda(real_fmnist, tmp_path):
    from robustse.core.config import DataConfig, TrainConfig
    from robustse.training.seeds import train_seeds

    outs = [tmp_path / f"m{s}.safetensors" for s in range(3)]
    res = train_seeds(
        "se_small_cnn", outs=outs, seeds=[0, 1, 2], data=DataConfig(train_subset=4096, eval_subset=1000),
        train=TrainConfig(epochs=2, augment=False), device="cuda", progress=False,
    )  # fmt: skip
    assert all(r.meta["clean_accuracy"] > 0.75 for r in res), [r.meta["clean_accuracy"] for r in res]
    assert all(o.exists() for o in outs)


def test_torchrun_nccl_sweep_equals_one_process(trained_small, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs one GPU per process: fewer than 2 here")
    _, _, _, ckpt = trained_small
    args = [str(ckpt), "--attack", "fgsm", "--eps", "0,0.03", "--eval-subset", "200", "--batch-size", "50"]
    one = _sweep([*args, "--out", str(tmp_path / "one")], device="cuda")
    two = _sweep([*args, "--out", str(tmp_path / "two")], nproc=2, device="cuda")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    with ResultsStore(tmp_path / "one" / "results.db") as a, ResultsStore(tmp_path / "two" / "results.db") as b:
        assert a.examples().drop(columns="cell_id").equals(b.examples().drop(columns="cell_id"))


def test_compiled_training_on_cuda_matches_eager(real_fmnist, tmp_path):
    """compile = on trains on the card the model eager training gives, up to float rounding."""
    from tests.test_compile import train_both_ways

    eager, comp = train_both_ways(tmp_path, "cuda")
    assert comp.meta["compiled"] is True
    for key, v in eager.model.state_dict().items():
        torch.testing.assert_close(comp.model.state_dict()[key], v, rtol=1e-3, atol=1e-3)


def test_eval_copy_on_cuda_is_the_same_function():
    """The attacks' eval-mode copy on the card, in float64: logits and input gradients as the model's."""
    import robustse as rs
    from robustse.models.eval_copy import eval_copy

    from .test_eval_copy import settled

    for name in ("se_small_cnn", "se_resnet20"):
        torch.manual_seed(0)
        model = settled(rs.create_model(name, num_classes=10, in_channels=3)).cuda().double()
        x = torch.rand(4, 3, 32, 32, device="cuda", dtype=torch.float64)
        outs = []
        for m in (model, eval_copy(model)):  # as the attacks use it on a GPU: the default layout
            xr = x.clone().requires_grad_(True)
            logits = m(xr)
            (grad,) = torch.autograd.grad(logits.logsumexp(1).sum(), xr)
            outs.append((logits.detach(), grad))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-7, atol=1e-12)


def test_a_compiled_sweep_on_cuda_matches_eager(trained_small, tmp_path):
    """[sweep] compile = on, on the card, two copies of one checkpoint attacked as a seed group
    (the default on a GPU) and the held-gates intervention: the eager sweep's results up to
    rounding, and the graphs really compiled."""
    import shutil

    import pandas as pd
    from click.testing import CliRunner

    from robustse.cli import cli

    _, _, _, ckpt = trained_small
    copies = [shutil.copy(ckpt, tmp_path / f"se_{k}.safetensors") for k in (0, 1)]
    args = ["--device", "cuda", "--quiet", "sweep", *map(str, copies), "--attack", "fgsm", "--attack", "pgd(steps=5)",
            "--eps", "0,0.02,0.05", "--eval-subset", "500", "--intervention", "held_gates",
            "--seed-batching"]  # fmt: skip
    for m in ("off", "on"):
        torch._dynamo.reset()
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        res = CliRunner().invoke(cli, [*args, "--compile", m, "--out", str(tmp_path / m)], catch_exceptions=False)
        assert res.exit_code == 0, (m, res.output[-3000:])
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > before) == (m == "on")
    on, off = (pd.read_csv(tmp_path / m / "results.csv") for m in ("on", "off"))
    assert (on["adv_pred"] != off["adv_pred"]).mean() <= 0.005  # TF32 and kernel choice may flip a few
    assert (on["adv_margin"] - off["adv_margin"]).abs().median() <= 1e-3
