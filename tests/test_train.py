"""Training: learns, resumes exactly after an interruption, adversarial training stays in the ball."""

from __future__ import annotations

import pytest
import torch

import robustse as rs
from robustse.core.config import DataConfig, TrainConfig
from robustse.core.errors import ModelError, TrainingError
from robustse.training.train import augment, fgsm_random_start, train_model


@pytest.fixture()
def data(fake_fmnist):
    return DataConfig(data_root=str(fake_fmnist))


FAST = TrainConfig(epochs=2, batch_size=64, lr=0.05, augment=False)


def test_training_learns_and_saves_metadata(tmp_path, data):
    res = train_model("se_small_cnn", out=tmp_path / "m.safetensors", data=data, train=FAST, seed=0, progress=False)
    assert res.meta["clean_accuracy"] > 0.8  # the toy task is easy; chance is 0.1
    assert [r["epoch"] for r in res.history] == [1, 2]
    assert res.meta["epochs"] == 2 and res.meta["seed"] == 0 and res.meta["dataset"] == "fashion-mnist"
    assert res.meta["eval_examples"] == 200 and res.meta["train_examples"] == 600
    mean = res.meta["normalization"]["mean"][0]
    assert 0.05 < mean < 0.6  # the data's own statistics, not the identity default
    model, meta = rs.load_checkpoint(res.checkpoint)
    assert meta["clean_accuracy"] == res.meta["clean_accuracy"]
    assert not (tmp_path / "m.safetensors.resume.pt").exists()


class _Stop(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, data):
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, augment=True)
    full = train_model("small_cnn", out=tmp_path / "full.safetensors", data=data, train=cfg, seed=1, progress=False)

    def stop_after_first(epoch, record):
        if epoch == 1:
            raise _Stop

    out = tmp_path / "cut.safetensors"
    with pytest.raises(_Stop):
        train_model("small_cnn", out=out, data=data, train=cfg, seed=1, progress=False, on_epoch=stop_after_first)
    assert (tmp_path / "cut.safetensors.resume.pt").exists() and not out.exists()
    lines: list[str] = []
    resumed = train_model("small_cnn", out=out, data=data, train=cfg, seed=1, progress=False, log=lines.append)
    assert resumed.start_epoch == 1 and any("resuming after epoch 1/3" in m for m in lines)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


def test_finished_run_is_not_retrained(tmp_path, data):
    out = tmp_path / "m.safetensors"
    first = train_model("small_cnn", out=out, data=data, train=FAST, seed=0, progress=False)
    again = train_model("small_cnn", out=out, data=data, train=FAST, seed=0, progress=False)
    assert again.start_epoch == 2 and again.meta["weight_hash"] == first.meta["weight_hash"]
    other = train_model("small_cnn", out=out, data=data, train=FAST, seed=5, progress=False)
    assert other.start_epoch == 0 and other.meta["seed"] == 5  # a new configuration retrains


def test_seeds_change_the_model(tmp_path, data):
    cfg = TrainConfig(epochs=1, batch_size=64, augment=False)
    a = train_model("small_cnn", out=tmp_path / "a.safetensors", data=data, train=cfg, seed=0, progress=False)
    b = train_model("small_cnn", out=tmp_path / "b.safetensors", data=data, train=cfg, seed=1, progress=False)
    assert a.meta["weight_hash"] != b.meta["weight_hash"]


def test_adversarial_training_runs(tmp_path, data):
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, augment=False, adv_eps=0.1)
    res = train_model("se_small_cnn", out=tmp_path / "adv.safetensors", data=data, train=cfg, progress=False)
    assert res.meta["train"]["adv_eps"] == 0.1 and res.meta["clean_accuracy"] > 0.3


def test_fgsm_random_start_stays_in_ball_and_box():
    torch.manual_seed(0)
    model = rs.create_model("small_cnn")
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    adv = fgsm_random_start(model, x, y, eps=0.05, gen=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.05 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() > 0.04  # it actually moved to the ball's edge somewhere


def test_augment_translates_within_pad():
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 10, 12] = 1.0
    out = augment(x, pad=2, hflip=False, gen=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pos = out.flatten(1).argmax(1)
    rows, cols = pos // 28, pos % 28
    assert out.sum().item() == 16  # a shift by <= pad keeps the pixel inside the image
    assert ((rows - 10).abs() <= 2).all() and ((cols - 12).abs() <= 2).all()
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 1  # crops differ per example


def test_augment_flips_only_when_allowed():
    x = torch.zeros(64, 1, 4, 4)
    x[:, :, :, 0] = 1.0
    flipped = augment(x, pad=0, hflip=True, gen=torch.Generator().manual_seed(0))
    n_flipped = int((flipped[:, 0, 0, 3] == 1).sum())
    assert 10 < n_flipped < 54
    assert torch.equal(augment(x, pad=0, hflip=False, gen=torch.Generator()), x)


def test_non_finite_loss_is_a_training_error(tmp_path, data):
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e30, momentum=0.0, augment=False)
    with pytest.raises(TrainingError, match="loss became"):
        train_model("small_cnn", out=tmp_path / "m.safetensors", data=data, train=cfg, progress=False)


def test_images_that_do_not_fit_the_model(tmp_path, data):
    # AlexNet's stride-4 stem and three max pools shrink 28 px images to nothing
    with pytest.raises(ModelError, match=r"fashion-mnist images \(1, 28, 28\) do not fit the model"):
        train_model("torchvision:alexnet", out=tmp_path / "m.safetensors", data=data, train=FAST, progress=False)


def test_dataset_owned_options_are_refused(tmp_path, data):
    with pytest.raises(ModelError, match="'in_channels' is set from the dataset"):
        train_model("small_cnn", out=tmp_path / "m.safetensors", data=data, train=FAST, model_kwargs={"in_channels": 3})


def test_fingerprint_of_a_registered_dataset_is_unchanged_by_the_image_size_setting(tmp_path):
    """Checkpoints trained before ``[data] image_size`` existed must still be reused: without it, the
    fingerprint's data fields are the five it always had; an image folder's size is part of it."""
    import json
    from pathlib import Path

    from robustse.core.distributed import SINGLE
    from robustse.training.train import TrainJob as _Job

    def data_fields(data: DataConfig) -> dict:  # type: ignore[type-arg]
        job = _Job(
            "small_cnn", Path(tmp_path / "m.safetensors"), data, TrainConfig(), 0, {}, torch.device("cpu"), SINGLE
        )
        return json.loads(job.fingerprint)["data"]  # type: ignore[no-any-return]

    assert data_fields(DataConfig()) == {
        "dataset": "fashion-mnist", "data_root": None, "download": False, "train_subset": None, "eval_subset": None,
    }  # fmt: skip
    assert data_fields(DataConfig(dataset="imagefolder:x", image_size=32))["image_size"] == 32
