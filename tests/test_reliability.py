"""Reliability: the bad-input matrix through the real CLI, faults (SIGKILL, NaN), determinism, polish."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import robustse as rs
from robustse.cli import cli
from robustse.core.store import ResultsStore
from robustse.experiment.sweep import SweepModel, build_attacks, run_sweep


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(trained_small, tmp_path_factory):
    """A finished sweep (results we must never lose) and the bad files of the matrix."""
    model, _, _, ckpt = trained_small
    root = tmp_path_factory.mktemp("matrix")
    run_dir = root / "run"
    res = CliRunner().invoke(
        cli,
        ["--quiet", "sweep", str(ckpt), "--attack", "fgsm", "--eps", "0,0.05", "--eval-subset", "40", "--out",
         str(run_dir)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    trunc = root / "trunc.safetensors"
    trunc.write_bytes(ckpt.read_bytes()[:1000])
    state = {k: v for k, v in model.state_dict().items()}
    torch.save(state, root / "small.pt")  # se_small_cnn weights, 10 classes

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {root / 'pwned'}",))

    with (root / "evil.pt").open("wb") as fh:
        pickle.dump({"w": Evil()}, fh)
    rgb = rs.create_model("small_cnn", in_channels=3)
    rs.save_checkpoint(rgb, root / "rgb.safetensors")
    (root / "file").write_text("not a directory")
    specs = {
        "unknown_key": "[train]\nepochz = 3\n",
        "wrong_type": "[train]\nepochs = 'three'\n",
        "invalid_toml": "[train\nepochs = 3\n",
        "traversal": 'name = "../../etc"\n',
    }
    for name, text in specs.items():
        (root / f"{name}.toml").write_text(text)
    return {"root": root, "run": run_dir, "ckpt": ckpt, "db": run_dir / "results.db"}


MATRIX = [
    # (what, args with {placeholders}, needle in the one-line message)
    ("unknown architecture", ["train", "nope_net"], "unknown architecture 'nope_net'"),
    ("unknown attack", ["sweep", "{ckpt}", "--attack", "cw", "--out", "{run}"], "unknown attack 'cw'"),
    ("unknown norm", ["sweep", "{ckpt}", "--norm", "l3", "--out", "{run}"], "'l3' is not one of"),
    ("unknown dataset", ["eval", "{ckpt}", "--dataset", "imagenet"], "imagenet"),
    ("negative eps", ["sweep", "{ckpt}", "--eps=-0.1", "--out", "{run}"], "-0.1"),
    ("Linf eps > 1", ["sweep", "{ckpt}", "--eps", "0,1.5", "--out", "{run}"], "1.5"),
    ("steps < 1", ["sweep", "{ckpt}", "--attack", "pgd(steps=0)", "--out", "{run}"],
     "steps must be an integer in [1, 10,000]"),
    ("spec: unknown key", ["experiment", "--spec", "{root}/unknown_key.toml", "--out", "{run}"],
     "unknown key 'train.epochz'"),
    ("spec: wrong type", ["experiment", "--spec", "{root}/wrong_type.toml", "--out", "{run}"],
     "train.epochs: expected int"),
    ("spec: invalid TOML", ["experiment", "--spec", "{root}/invalid_toml.toml", "--out", "{run}"], "invalid TOML"),
    ("missing checkpoint", ["sweep", "{root}/none.safetensors", "--out", "{run}"], "checkpoint not found"),
    ("truncated checkpoint", ["sweep", "{root}/trunc.safetensors", "--out", "{run}"], "trunc.safetensors"),
    ("checkpoint for another architecture", ["eval", "{root}/small.pt", "--arch", "resnet20"], "small.pt"),
    ("checkpoint for another class count", ["eval", "{root}/small.pt", "--arch", "se_small_cnn", "--num-classes", "7"],
     "small.pt"),
    ("malicious pickle", ["eval", "{root}/evil.pt", "--arch", "small_cnn"], "evil.pt"),
    ("channels that don't fit the model", ["eval", "{root}/rgb.safetensors"], "channel"),
    ("output directory is a file", ["sweep", "{ckpt}", "--out", "{root}/file"], "not a directory"),
    ("output directory not writable", ["sweep", "{ckpt}", "--out", "/proc/robustse-out"], "/proc/robustse-out"),
    ("run name with path traversal", ["experiment", "--spec", "{root}/traversal.toml"], "invalid run name '../../etc'"),
    ("empty dataset subset", ["eval", "{ckpt}", "--eval-subset", "0"], "--eval-subset"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "args", "needle"), MATRIX, ids=[m[0] for m in MATRIX])
def test_bad_input_matrix(world, what, args, needle):
    before = _sha(world["db"])
    argv = [a.format(ckpt=world["ckpt"], run=world["run"], root=world["root"]) for a in args]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, (what, result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (what, result.stderr)
    assert needle in lines[0], (what, needle, lines[0])
    assert "Traceback" not in result.output
    assert _sha(world["db"]) == before  # the finished results are untouched
    assert not (world["root"] / "pwned").exists()


# --------------------------------------------------------------------------- faults


def test_sigkill_during_training_resumes_from_the_last_epoch(real_fmnist, tmp_path):
    out = tmp_path / "m.safetensors"
    args = ["train", "small_cnn", "--epochs", "4", "--no-augment", "--train-subset", "4000", "--eval-subset", "200"]
    cmd = [sys.executable, "-m", "robustse.cli", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume = out.with_name(out.name + ".resume.pt")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not resume.exists():
        time.sleep(0.05)
    time.sleep(0.2)  # the resume file is written atomically; kill during a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and resume.exists() and not out.exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming after epoch" in again.stderr
    fresh = tmp_path / "fresh.safetensors"
    ref = subprocess.run(
        [sys.executable, "-m", "robustse.cli", "--quiet", *args, "--out", str(fresh)], capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr
    a, _ = rs.load_checkpoint(out)
    b, _ = rs.load_checkpoint(fresh)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k  # resumed == uninterrupted, bit for bit


class _NaNWhere(torch.nn.Module):
    """The base model's logits, NaN in the rows where ``rule(x)`` holds."""

    def __init__(self, base: torch.nn.Module, rule) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.base, self.rule = base, rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.base(x)
        return torch.where(self.rule(x)[:, None], torch.full_like(logits, float("nan")), logits)


def _off_grid(x: torch.Tensor) -> torch.Tensor:
    """Perturbed images: some pixel is not a multiple of 1/255 (clean images all are)."""
    return (x * 255 - (x * 255).round()).abs().flatten(1).amax(1) > 1e-3


def _bright(x: torch.Tensor) -> torch.Tensor:
    """Images brighter than 0.3 on average, clean or not."""
    return x.flatten(1).mean(1) > 0.3


def test_nan_logits_fail_their_cell_and_the_sweep_goes_on(trained_small, tmp_path):
    model, _, _, _ = trained_small
    ds = rs.load_dataset("fashion-mnist", split="test").subset(32, seed=7)
    res = run_sweep(
        [SweepModel("nan", _NaNWhere(model, _off_grid).eval(), "-")],
        build_attacks([{"name": "fgsm"}], norm="linf", seed=0),
        [0.0, 0.05],
        ds,
        tmp_path,
        progress=False,
    )
    cells = res.cells.set_index(["attack", "eps"])
    assert cells.loc[("fgsm", 0.0), "status"] == "done" and cells.loc[("noise", 0.0), "status"] == "done"
    for attack in ("fgsm", "noise"):
        assert cells.loc[(attack, 0.05), "status"] == "failed"
        assert cells.loc[(attack, 0.05), "reason"] == "32 non-finite rows"
    assert {c.name: c.status for c in res.checks}["no_nan_inf"] == "fail"


def test_eps0_cell_counts_nonfinite_clean_logits(trained_small, tmp_path):
    # the eps = 0 cell reuses the clean pass (its input is the clean image): its non-finite
    # rows must still be counted, from the clean logits
    model, _, _, _ = trained_small
    ds = rs.load_dataset("fashion-mnist", split="test").subset(48, seed=3)
    bright = int(_bright(ds.x.float() / 255).sum())
    assert 0 < bright < len(ds)
    res = run_sweep(
        [SweepModel("nan", _NaNWhere(model, _bright).eval(), "-")],
        build_attacks([{"name": "pgd", "steps": 2}], norm="linf", seed=0, noise=False),
        [0.0, 0.01],
        ds,
        tmp_path,
        batch_size=20,
        progress=False,
    )
    cell = res.cells.set_index("eps").loc[0.0]
    assert cell.status == "failed" and cell.reason == f"{bright} non-finite rows"


class _Quantized(torch.nn.Module):
    """Rounds its input to 8 bits first: every input gradient is exactly zero (gradient masking)."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(torch.round(x * 255) / 255)


def test_zero_input_gradients_fail_their_check(trained_small, tmp_path):
    model, _, _, _ = trained_small
    ds = rs.load_dataset("fashion-mnist", split="test").subset(32, seed=4)
    res = run_sweep(
        [SweepModel("masked", _Quantized(model).eval(), "-")],
        build_attacks([{"name": "fgsm"}], norm="linf", seed=0, noise=False),
        [0.0, 0.05],
        ds,
        tmp_path,
        progress=False,
    )
    check = {c.name: c for c in res.checks}["nonzero_input_gradients"]
    assert check.status == "fail" and check.detail.startswith("100.0% of examples")


# --------------------------------------------------------------------------- determinism


def test_same_spec_and_seed_give_identical_results_and_verdicts(real_fmnist, tmp_path):
    spec = tmp_path / "det.toml"
    spec.write_text(
        "seeds = [0]\n[data]\ntrain_subset = 1500\neval_subset = 200\n[train]\nepochs = 1\naugment = true\n"
        "[sweep]\nepsilons = [0.0, 0.03]\neval_subset = 48\n"
        "attacks = [{ name = 'fgsm' }, { name = 'pgd', steps = 3 }]\n"
        "[report]\nbootstrap = 200\n"
    )
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        res = CliRunner().invoke(cli, ["--quiet", "experiment", "--spec", str(spec), "--out", str(out)])
        assert res.exit_code == 0, res.output
    (a, b) = (ResultsStore(o / "results.db") for o in outs)
    try:
        assert a.examples().drop(columns="cell_id").equals(b.examples().drop(columns="cell_id"))
        assert a.probe_table("sites").drop(columns="cell_id").equals(b.probe_table("sites").drop(columns="cell_id"))
        assert a.models().drop(columns="checkpoint").equals(b.models().drop(columns="checkpoint"))
    finally:
        a.close(), b.close()
    assert (outs[0] / "stats.csv").read_text() == (outs[1] / "stats.csv").read_text()


# --------------------------------------------------------------------------- polish


@pytest.mark.parametrize(
    "args",
    [["models"], ["inspect", "se_small_cnn"], ["eval", "{ckpt}", "--eval-subset", "50"], ["attacks"],
     ["drift", "{ckpt}", "--eps", "0.02", "--eval-subset", "24"],
     ["sweep", "{ckpt}", "--attack", "fgsm", "--eps", "0,0.05", "--eval-subset", "40", "--out", "{run}"],
     ["report", "{run}", "--bootstrap", "100"]],
    ids=lambda a: a[0],
)  # fmt: skip
def test_json_output_parses(world, args):
    argv = ["--quiet", *[a.format(ckpt=world["ckpt"], run=world["run"]) for a in args], "--json"]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)


def test_shell_completion_script():
    script = Path(sys.executable).parent / "robustse"
    out = subprocess.run(
        [str(script)], env={**os.environ, "_ROBUSTSE_COMPLETE": "bash_source"}, capture_output=True, text=True
    )
    assert out.returncode == 0 and "_robustse_completion" in out.stdout


def test_parquet_export(world):
    pytest.importorskip("pyarrow")
    import pandas as pd

    path = world["run"] / "results.parquet"
    assert path.exists()
    with ResultsStore(world["db"]) as store:
        assert pd.read_parquet(path).equals(store.examples().drop(columns=["cell_id"]))


def test_verbose_prints_per_cell_lines(world):
    argv = ["--verbose", "sweep", str(world["ckpt"]), "--attack", "fgsm", "--eps", "0,0.05", "--eval-subset", "40",
            "--out", str(world["run"])]  # fmt: skip
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output
    assert "cells to run: 0" in result.stderr  # everything was already there


def test_malicious_pickle_in_a_real_process_is_one_line(world):
    """Through a real interpreter (warnings reach stderr there, unlike in CliRunner)."""
    cmd = [sys.executable, "-m", "robustse.cli", "eval", str(world["root"] / "evil.pt"), "--arch", "small_cnn"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "refused" in out.stderr and not (world["root"] / "pwned").exists()
