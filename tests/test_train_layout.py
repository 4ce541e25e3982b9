"""Training in channels_last layout: the auto rule, the same model up to float rounding, saved
in the default layout, and not part of a checkpoint's fingerprint."""

from __future__ import annotations

import pytest
import torch

from robustse.core.config import DataConfig, TrainConfig
from robustse.core.distributed import SINGLE
from robustse.core.errors import SpecError
from robustse.training.train import TrainJob, trains_channels_last


def test_auto_is_channels_last_on_a_cpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert trains_channels_last("auto", cpu) and not trains_channels_last("auto", cuda)  # no GPU figure yet
    assert trains_channels_last("on", cuda) and not trains_channels_last("off", cpu)
    with pytest.raises(SpecError, match="train.channels_last must be one of auto, on, off"):
        TrainConfig(channels_last=True)  # type: ignore[arg-type]
    jobs = [TrainJob("small_cnn", None, DataConfig(), TrainConfig(channels_last=c), 0, {}, cpu, SINGLE)  # type: ignore[arg-type]
            for c in ("auto", "on", "off")]  # fmt: skip
    assert len({j.fingerprint for j in jobs}) == 1  # how it ran, not what it trained


def test_channels_last_trains_the_same_model_up_to_float_rounding(real_fmnist, tmp_path):
    from robustse.training.parts import load_splits
    from robustse.training.train import train_model

    data = DataConfig(train_subset=256, eval_subset=200)
    splits = load_splits(data)
    runs = {}
    for mode in ("off", "on"):
        cfg = TrainConfig(epochs=1, batch_size=64, lr=0.02, augment=False, channels_last=mode)  # type: ignore[arg-type]
        runs[mode] = train_model("small_cnn", out=tmp_path / f"{mode}.safetensors", data=data, train=cfg,
                                 splits=splits, progress=False)  # fmt: skip
    off, on = runs["off"], runs["on"]
    assert on.meta["channels_last"] is True and off.meta["channels_last"] is False
    assert on.meta["history"][0]["loss"] == pytest.approx(off.meta["history"][0]["loss"], rel=1e-4)
    for (name, a), b in zip(off.model.state_dict().items(), on.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3, msg=name)  # as tests/test_compile.py
        assert b.is_contiguous(), name  # handed back (and saved) in the default layout
    assert on.meta["clean_accuracy"] == pytest.approx(off.meta["clean_accuracy"], abs=0.01)
