"""Shared fixtures: small datasets written to disk in the real file formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from robustse.data.datasets import DEBIAN_FASHION_MNIST, write_idx

REAL_FMNIST = DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz"


def make_images(
    n: int, *, seed: int, size: int = 28, channels: int = 1, classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """A learnable toy problem: class k lights a bar whose row depends on k, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n).astype(np.uint8)
    x = rng.integers(0, 60, size=(n, channels, size, size)).astype(np.int32)
    rows = (np.arange(classes) * (size - 3)) // max(1, classes - 1)
    for i, label in enumerate(y):
        r = rows[label]
        x[i, :, r : r + 3, 4 : size - 4] += 180
    return np.clip(x, 0, 255).astype(np.uint8), y


def write_fake_fmnist(root: Path, *, n_train: int = 600, n_test: int = 200, gz: bool = True) -> Path:
    """Write the four Fashion-MNIST IDX files (toy content) into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x, y = make_images(n, seed=seed)
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", x[:, 0])
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", y)
    return root


RUN_FILES = ("results.db", "models.csv", "manifest.json", "spec.toml")


def copy_run(src: Path, dst: Path) -> Path:
    """A fresh run directory ``dst`` holding what ``robustse report`` reads of the finished run ``src``."""
    import shutil

    dst.mkdir()
    for name in RUN_FILES:
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a small learnable dataset in Fashion-MNIST's IDX .gz format."""
    return write_fake_fmnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="session")
def real_fmnist() -> Path:
    """The installed Fashion-MNIST (make test installs it; its absence is a set-up failure)."""
    if not REAL_FMNIST.exists():
        pytest.fail(f"Fashion-MNIST not installed at {DEBIAN_FASHION_MNIST}: run `make data`")
    return DEBIAN_FASHION_MNIST


@pytest.fixture(scope="session")
def trained_small(real_fmnist, tmp_path_factory):
    """An se_small_cnn trained briefly on real Fashion-MNIST, and 128 test images (x float, y)."""
    from robustse.core.config import DataConfig, TrainConfig
    from robustse.data.base import to_float
    from robustse.data.datasets import load_dataset
    from robustse.training.train import train_model

    out = tmp_path_factory.mktemp("trained") / "se_small_cnn.safetensors"
    res = train_model(
        "se_small_cnn",
        out=out,
        data=DataConfig(train_subset=4000, eval_subset=500),
        train=TrainConfig(epochs=2, augment=False),
        progress=False,
    )
    test = load_dataset("fashion-mnist", split="test").subset(128, seed=1)
    return res.model, to_float(test.x), test.y, out


@pytest.fixture(scope="session")
def tiny_run(real_fmnist, tmp_path_factory):
    """A finished tiny experiment (2 seeds x small twins, FGSM + noise sweep, report) and its result."""
    from robustse.core.config import DataConfig, ExperimentSpec, ModelsConfig, ReportConfig, SweepConfig, TrainConfig
    from robustse.experiment.pipeline import run_experiment

    spec = ExperimentSpec(
        name="tiny",
        seeds=(0, 1),
        data=DataConfig(train_subset=3000, eval_subset=1000),
        models=ModelsConfig(twins=("small_cnn",), se_options={"reduction": 2}),
        train=TrainConfig(epochs=2, augment=False),
        sweep=SweepConfig(
            epsilons=(0.0, 0.05, 0.1),
            attacks=({"name": "fgsm"}, {"name": "noise"}),
            eval_subset=100,
            probe_subsample=50,
        ),
        report=ReportConfig(bootstrap=300),
    )
    out = tmp_path_factory.mktemp("tiny") / "run"
    return spec, out, run_experiment(spec, out, progress=False)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs two workers) each worker computes on one thread, as
    do the processes it starts: two workers of two threads each on a 2-core machine ran the suite
    in 16.5 min instead of 8.2 (OpenMP threads spinning against each other)."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
