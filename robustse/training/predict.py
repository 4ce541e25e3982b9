"""Prediction on in-memory datasets, and the one check that a dataset's images fit a model.

Images are uint8 (N, C, H, W) as :class:`~robustse.data.Dataset` holds them; they become floats
in [0, 1] batch by batch. Images that do not fit a model get the one-line error listed in the
README's "Reliability" table.
"""

from __future__ import annotations

import torch
from torch import nn

from robustse.core.device import evaluating
from robustse.core.errors import InputMismatchError
from robustse.core.progress import track
from robustse.data.base import Dataset, forward_rows, to_float


@torch.no_grad()
def predict(
    model: nn.Module, ds: Dataset, *, batch_size: int = 512, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Predicted labels (N,) of ``model`` (put in eval mode) on all of ``ds``, ``batch_size``
    images a pass at most (fewer for large images: :func:`~robustse.data.forward_rows`)."""
    model.eval()
    preds = []
    rows = forward_rows(ds.x, batch_size)
    for i in track(range(0, len(ds), rows), "predict", leave=False):
        x = to_float(ds.x[i : i + rows].to(device))
        preds.append(model(x).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)


@torch.no_grad()
def logits_of(
    model: nn.Module, ds: Dataset, *, batch_size: int = 512, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Logits (N, K) of ``model`` (put in eval mode) on all of ``ds``, on the CPU (batched as
    :func:`predict`)."""
    model.eval()
    rows = forward_rows(ds.x, batch_size)
    batches = track(range(0, len(ds), rows), "logits", leave=False)
    out = [model(to_float(ds.x[i : i + rows].to(device))).cpu() for i in batches]
    return torch.cat(out) if out else torch.empty(0)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The temperature T minimising the negative log-likelihood of ``softmax(logits / T)`` on
    held-out examples (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017); T is
    searched in [e^-4, e^4]. Dividing logits by T fixes their overall scale, so measures computed
    on calibrated logits compare networks whose logits differ only in scale."""
    from scipy.optimize import minimize_scalar

    z, t = logits.double(), y.long()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / float(torch.tensor(log_t).exp()), t))

    return float(torch.tensor(minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded").x).exp())


def evaluate_accuracy(
    model: nn.Module, ds: Dataset, *, batch_size: int = 512, device: torch.device | str = "cpu"
) -> float:
    """Top-1 accuracy of ``model`` on ``ds``."""
    return float((predict(model, ds, batch_size=batch_size, device=device) == ds.y).float().mean())


def check_input_fits(
    model: nn.Module,
    ds: Dataset,
    *,
    device: torch.device | str | None = None,
    channels: int | None = None,
    who: str = "the model",
) -> None:
    """Fail early, with one line, when the images of ``ds`` do not fit ``model``.

    Three checks: the images' channel count against ``channels`` (what the model takes, e.g. a
    checkpoint's ``arch_kwargs["in_channels"]``; skipped when None), then one forward pass on two
    examples, which catches every other channel or size mismatch, and whose logits must number
    the dataset's classes. The model's train/eval mode is restored afterwards.

    Args:
        model: the model.
        ds: the dataset whose images the model will see.
        device: where to run the forward pass (default: where the model's parameters are).
        channels: input channels the model takes, if known.
        who: how messages name the model (e.g. a sweep label).

    Raises:
        InputMismatchError: the images do not fit (a :class:`~robustse.core.errors.DataError`).
    """
    if channels is not None and ds.in_channels != channels:
        raise InputMismatchError(f"{ds.name} images have {ds.in_channels} channel(s) but {who} takes {channels}")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad(), evaluating(model):
            outputs = model(to_float(ds.x[:2].to(device))).shape[-1]
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        shape = tuple(ds.x.shape[1:])
        raise InputMismatchError(f"{ds.name} images {shape} do not fit {who} ({first})") from None
    if outputs != ds.num_classes:
        raise InputMismatchError(f"{ds.name} has {ds.num_classes} classes but {who} outputs {outputs}")
