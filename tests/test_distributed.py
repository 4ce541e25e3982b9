"""torchrun: a sweep sharded over 2 CPU processes (gloo) stores exactly what one process stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from robustse.core.distributed import Dist, from_env
from robustse.core.errors import DeviceError
from robustse.core.store import ResultsStore


def _sweep(args: list[str], *, nproc: int, cwd) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    cmd = [sys.executable, "-m", "robustse.cli", "--quiet", "sweep", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "robustse.cli", "--quiet", "sweep", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_torchrun_sweep_equals_single_process(trained_small, tmp_path):
    _, _, _, ckpt = trained_small
    args = [str(ckpt), "--attack", "fgsm", "--attack", "pgd(steps=3)", "--attack", "gate(steps=2)",
            "--eps", "0,0.03", "--eval-subset", "80", "--batch-size", "32"]  # fmt: skip
    one = _sweep([*args, "--out", str(tmp_path / "one")], nproc=1, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _sweep([*args, "--out", str(tmp_path / "two")], nproc=2, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("results:") == 1  # rank 0 alone reports

    with ResultsStore(tmp_path / "one" / "results.db") as a, ResultsStore(tmp_path / "two" / "results.db") as b:
        ea, eb = a.examples().drop(columns="cell_id"), b.examples().drop(columns="cell_id")
        assert len(ea) == 80 * 2 * 4  # fgsm, pgd, gate, noise at 2 eps
        assert ea.equals(eb)
        ca, cb = (s.cells().drop(columns=["id", "seconds"]) for s in (a, b))
        assert ca.equals(cb)
        for table in ("sites", "site_examples", "gallery"):
            ta, tb = (s.probe_table(table).drop(columns="cell_id") for s in (a, b))
            assert ta.equals(tb), table
        xa, xb = (s.probe_table("excitations").drop(columns="cell_id") for s in (a, b))
        assert xa[["model", "attack", "eps", "site", "label", "n"]].equals(
            xb[["model", "attack", "eps", "site", "label", "n"]]
        )
        for ma, mb in zip(xa["mean"], xb["mean"], strict=True):  # sums over ranks: same to rounding
            assert np.allclose(np.array(json.loads(ma)), np.array(json.loads(mb)), atol=1e-6)
        assert a.models().drop(columns="checkpoint").equals(b.models().drop(columns="checkpoint"))


def test_torchrun_training_uses_ddp(real_fmnist, tmp_path):
    from robustse.models.checkpoint import read_metadata

    out = tmp_path / "m.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "robustse.cli",
           "train", "small_cnn", "--epochs", "2", "--no-augment", "--train-subset", "1024", "--eval-subset", "300",
           "--out", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("clean accuracy") == 1  # rank 0 reports
    meta = read_metadata(out)
    assert meta["clean_accuracy"] > 0.5  # two ranks each saw half of every batch and still learned
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert not out.with_name(out.name + ".resume.pt").exists()


def test_layout_from_env(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert from_env() == Dist(0, 1, 0) and not from_env().active
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    d = from_env()
    assert d.active and not d.is_main and [b for b in range(9) if d.owns(b)] == [2, 6]
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(DeviceError, match="bad torchrun layout"):
        from_env()
