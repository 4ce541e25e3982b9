"""The one input-fits-the-model check, and prediction."""

from __future__ import annotations

import pytest
import torch

import robustse as rs
from robustse.core.errors import DataError, InputMismatchError, ModelError
from robustse.data.base import Dataset
from robustse.training.predict import check_input_fits, evaluate_accuracy, predict


def _images(n: int, channels: int, size: int) -> Dataset:
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)
    return Dataset("toy", "test", x, torch.zeros(n, dtype=torch.int64), tuple("abcdefghij"))


def test_fitting_images_pass_and_the_mode_is_kept():
    model = rs.create_model("small_cnn", in_channels=1)
    check_input_fits(model, _images(3, 1, 28), channels=1)
    assert model.training
    model.eval()
    check_input_fits(model, _images(3, 1, 28))
    assert not model.training


def test_wrong_channel_count_is_named_before_any_forward_pass():
    model = rs.create_model("small_cnn", in_channels=1)
    with pytest.raises(InputMismatchError, match=r"^toy images have 3 channel\(s\) but m1 takes 1$"):
        check_input_fits(model, _images(2, 3, 28), channels=1, who="m1")


def test_images_the_model_cannot_take_fail_with_one_line():
    model = rs.create_model("small_cnn", in_channels=1)  # two 2x2 max pools: 2 px images vanish
    with pytest.raises(InputMismatchError, match=r"toy images \(1, 2, 2\) do not fit the model \(") as info:
        check_input_fits(model, _images(2, 1, 2))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, DataError) and isinstance(info.value, ModelError)  # both older contracts
    assert info.value.exit_code == 2


def test_predict_and_accuracy():
    model = rs.create_model("small_cnn", in_channels=1)
    ds = _images(5, 1, 28)
    preds = predict(model, ds, batch_size=2)
    assert preds.shape == (5,) and preds.dtype == torch.int64 and not model.training
    assert evaluate_accuracy(model, ds, batch_size=2) == float((preds == 0).float().mean())
    assert predict(model, _images(0, 1, 28)).shape == (0,)
