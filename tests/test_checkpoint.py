"""Checkpoints: round trip, integrity, architecture checks and refusal of unsafe pickles."""

from __future__ import annotations

import os

import pytest
import torch

import robustse as rs
from robustse.core.errors import CheckpointError
from robustse.models.checkpoint import read_metadata


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return rs.create_model("se_small_cnn", num_classes=10, in_channels=1, mean=[0.3], std=[0.4], reduction=2)


def test_round_trip(tmp_path, model):
    path = rs.save_checkpoint(model, tmp_path / "m.safetensors", meta={"seed": 3, "dataset": "fashion-mnist"})
    loaded, meta = rs.load_checkpoint(path)
    assert meta["arch"] == "se_small_cnn"
    assert meta["arch_kwargs"]["reduction"] == 2 and meta["arch_kwargs"]["mean"] == [0.3]
    assert meta["seed"] == 3 and meta["normalization"]["std"] == pytest.approx([0.4])
    assert set(meta["versions"]) >= {"robustse", "torch", "torchvision", "python"}
    assert len(meta["weight_hash"]) == 64
    assert not loaded.training
    x = torch.rand(4, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, model):
    rs.save_checkpoint(model, tmp_path / "sub" / "m.safetensors")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["m.safetensors"]


def test_truncated_checkpoint(tmp_path, model):
    path = rs.save_checkpoint(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        rs.load_checkpoint(path)


def test_edited_weights_fail_the_hash(tmp_path, model):
    path = rs.save_checkpoint(model, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match their recorded hash"):
        rs.load_checkpoint(path)


def test_architecture_mismatch(tmp_path, model):
    path = rs.save_checkpoint(model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint is for 'se_small_cnn', not 'small_cnn'"):
        rs.load_checkpoint(path, arch="small_cnn")


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        rs.load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a file"):
        rs.load_checkpoint(tmp_path)


def test_foreign_state_dict_loads_with_arch(tmp_path):
    torch.manual_seed(1)
    src = rs.create_model("resnet20")
    path = tmp_path / "foreign.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match="pass --arch"):
        rs.load_checkpoint(path)
    loaded, meta = rs.load_checkpoint(path, arch="resnet20")
    assert meta["foreign"] is True
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), src.eval()(x))


def test_foreign_state_dict_for_other_class_count(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save(rs.create_model("small_cnn", num_classes=5).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit small_cnn: 2 shape mismatch\(es\), e.g. head.weight"):
        rs.load_checkpoint(path, arch="small_cnn", arch_kwargs={"num_classes": 10})


def test_bare_torchvision_state_dict(tmp_path):
    import torchvision

    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    path = tmp_path / "mnv3.pth"
    torch.save(net.state_dict(), path)
    loaded, _ = rs.load_checkpoint(path, arch="torchvision:mobilenet_v3_small", arch_kwargs={"num_classes": 10})
    assert torch.equal(loaded.net.classifier[-1].weight, net.classifier[-1].weight)


class _Evil:
    """Unpickling this runs a shell command (the classic pickle attack)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    assert b"system" in path.read_bytes() or b"posix" in path.read_bytes()  # the payload is really there
    with pytest.raises(CheckpointError, match="refused.*may carry code"):
        rs.load_checkpoint(path, arch="small_cnn")
    assert not marker.exists()


def test_read_metadata_of_foreign_file_is_empty(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, path)
    assert read_metadata(path) == {}


def test_metadata_without_arch_is_a_checkpoint_error(tmp_path, model):
    import json

    from safetensors.torch import save_file

    from robustse.models.checkpoint import FORMAT, weight_hash

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "odd.safetensors"
    meta = {"format": FORMAT, "weight_hash": weight_hash(state), "arch_kwargs": []}
    save_file(state, str(path), metadata={"robustse": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="'arch_kwargs' must be a JSON object"):
        rs.load_checkpoint(path)
