"""Dataset registry: IDX files the tests write, torchvision formats, subsets, errors."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

import robustse as rs
from robustse.core.errors import DataError
from robustse.data.base import Dataset
from robustse.data.datasets import read_idx, write_idx

from .conftest import make_images, write_fake_fmnist


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / f"a-idx3-ubyte{suffix}"
    write_idx(path, arr)
    np.testing.assert_array_equal(read_idx(path), arr)
    raw = gzip.decompress(path.read_bytes()) if suffix else path.read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3]) and int.from_bytes(raw[4:8], "big") == 2


def test_fashion_mnist_from_data_root(tmp_path):
    root = write_fake_fmnist(tmp_path / "fm", n_train=50, n_test=20)
    train = rs.load_dataset("fashion-mnist", split="train", root=root)
    test = rs.load_dataset("fashion-mnist", split="test", root=root)
    assert train.x.shape == (50, 1, 28, 28) and train.x.dtype == torch.uint8
    assert test.y.shape == (20,) and test.y.dtype == torch.int64
    x, y = make_images(20, seed=2)
    assert torch.equal(test.x[:, 0], torch.from_numpy(x[:, 0]))
    assert torch.equal(test.y, torch.from_numpy(y.astype(np.int64)))
    assert test.classes[0] == "T-shirt/top" and test.num_classes == 10


def test_fashion_mnist_uncompressed_and_torchvision_layout(tmp_path):
    write_fake_fmnist(tmp_path / "FashionMNIST" / "raw", n_train=10, n_test=5, gz=False)
    assert len(rs.load_dataset("fashion-mnist", split="test", root=tmp_path)) == 5


def test_fashion_mnist_from_env(tmp_path, monkeypatch):
    write_fake_fmnist(tmp_path, n_train=10, n_test=7)
    monkeypatch.setenv("ROBUSTSE_DATA", str(tmp_path))
    assert len(rs.load_dataset("fashion-mnist", split="test")) == 7


def test_missing_fashion_mnist_names_where_and_how(tmp_path):
    with pytest.raises(DataError, match=rf"t10k-images-idx3-ubyte.gz not found in {tmp_path}.*apt-get install"):
        rs.load_dataset("fashion-mnist", split="test", root=tmp_path)


def test_bad_magic_and_truncated_idx(tmp_path):
    write_fake_fmnist(tmp_path, n_train=10, n_test=5)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x01\x02\x03\x04garbage")
    with pytest.raises(DataError, match="not an IDX file"):
        rs.load_dataset("fashion-mnist", split="test", root=tmp_path)
    x, _ = make_images(5, seed=0)
    write_idx(bad, x[:, 0])
    data = gzip.decompress(bad.read_bytes())
    with gzip.open(bad, "wb") as fh:
        fh.write(data[:-10])
    with pytest.raises(DataError, match="payload"):
        rs.load_dataset("fashion-mnist", split="test", root=tmp_path)


def test_mismatched_labels(tmp_path):
    write_fake_fmnist(tmp_path, n_train=10, n_test=5)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match="does not match"):
        rs.load_dataset("fashion-mnist", split="test", root=tmp_path)


def test_subset_is_deterministic_and_ordered(fake_fmnist):
    ds = rs.load_dataset("fashion-mnist", split="train", root=fake_fmnist)
    a, b, c = ds.subset(100, seed=3), ds.subset(100, seed=3), ds.subset(100, seed=4)
    assert len(a) == 100 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert ds.subset(None) is ds and ds.subset(10_000) is ds
    with pytest.raises(DataError, match="subset size must be >= 1"):
        ds.subset(0)


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'.*fashion-mnist"):
        rs.load_dataset("imagenet")
    with pytest.raises(DataError, match="unknown split 'val'"):
        rs.load_dataset("fashion-mnist", split="val")  # type: ignore[arg-type]


def test_channel_stats(fake_fmnist):
    ds = rs.load_dataset("fashion-mnist", split="test", root=fake_fmnist)
    mean, std = ds.channel_stats()
    x = ds.x.double() / 255
    assert mean[0] == pytest.approx(float(x.mean()), abs=1e-5)
    assert std[0] == pytest.approx(float(x.std()), abs=1e-5)


def test_real_fashion_mnist(real_fmnist):
    test = rs.load_dataset("fashion-mnist", split="test")
    assert test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.y).tolist() == [1000] * 10


# --------------------------------------------------------------------------- torchvision paths


def test_mnist_through_torchvision(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n, seed in (("train", 12, 1), ("t10k", 6, 2)):
        x, y = make_images(n, seed=seed)
        write_idx(raw / f"{split}-images-idx3-ubyte", x[:, 0])
        write_idx(raw / f"{split}-labels-idx1-ubyte", y)
    ds = rs.load_dataset("mnist", split="test", root=tmp_path)
    x, y = make_images(6, seed=2)
    assert ds.x.shape == (6, 1, 28, 28) and torch.equal(ds.x[:, 0], torch.from_numpy(x[:, 0]))
    assert torch.equal(ds.y, torch.from_numpy(y.astype(np.int64)))


def test_mnist_missing_suggests_download(tmp_path):
    with pytest.raises(DataError, match=r"mnist: .*not found.*--download"):
        rs.load_dataset("mnist", split="test", root=tmp_path)


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x, y = make_images(8, seed=5, size=32, channels=3)
    flat = x.reshape(8, -1)  # CIFAR stores rows of 3072 bytes, channel-major
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": flat, "labels": y.tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": ["c"] * 10}, fh)
    # the fake files cannot match torchvision's recorded MD5s
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: True)
    ds = rs.load_dataset("cifar10", split="test", root=tmp_path)
    assert ds.x.shape == (8, 3, 32, 32)
    assert torch.equal(ds.x, torch.from_numpy(x)) and ds.y.tolist() == y.tolist()
    assert ds.classes[0] == "airplane"


def test_svhn_through_torchvision(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets as tvd

    x, y = make_images(6, seed=7, size=32, channels=3)
    labels = np.where(y == 0, 10, y).astype(np.uint8)  # SVHN stores digit 0 as label 10
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": labels[:, None]})
    monkeypatch.setattr(tvd.SVHN, "_check_integrity", lambda self: True)
    ds = rs.load_dataset("svhn", split="test", root=tmp_path)
    assert ds.x.shape == (6, 3, 32, 32) and torch.equal(ds.x, torch.from_numpy(x))
    assert ds.y.tolist() == y.tolist()


def test_channel_stats_in_chunks_equal_the_whole_set_at_once():
    """Normalization statistics are summed 1,024 images at a time (a large image-folder set is
    never converted to float whole); they equal the one-shot mean and sample std."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2500, 3, 6, 6), dtype=torch.uint8, generator=gen)
    x[:, 1] //= 4  # channels with different statistics
    ds = Dataset("d", "train", x, torch.zeros(2500, dtype=torch.int64), ("a",))
    ref = x.to(torch.float64) / 255
    mean, std = ds.channel_stats()
    assert mean == tuple(round(float(m), 6) for m in ref.mean(dim=(0, 2, 3)))
    assert std == tuple(round(float(s), 6) for s in ref.std(dim=(0, 2, 3)))
