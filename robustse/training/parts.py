"""The parts of a training run that do not depend on the run itself: the seeded data splits,
augmentation, the FGSM random start of fast adversarial training, the learning-rate schedule, the
running loss tally, and the training-set gate means a frozen-mean intervention uses."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustse.core.config import DataConfig, TrainConfig
from robustse.core.distributed import Dist
from robustse.core.errors import DataError
from robustse.data.base import Dataset, Split
from robustse.data.datasets import load_split
from robustse.data.folder import is_image_folder, training_preprocess

SUBSET_SEED = 0  # subsets are the same for every model seed: seeds vary init and order, not data


def load_splits(data: DataConfig, *, training: bool = True) -> tuple[Any, Dataset]:
    """Train and test splits of ``data``, with its seeded subsets applied (an image folder's
    decoded at ``data.image_size``).

    Without ``training`` (models given, not trained) the train split is returned whole and an
    image folder's only listed: the sweep decodes just the images its gate means need.
    """
    prepare = training_preprocess(data.image_size)  # image folders only

    def split(name: Split, n: int | None, decode: bool = True) -> Any:
        listing = load_split(data.dataset, split=name, root=data.data_root, download=data.download, preprocess=prepare)
        return listing.subset(n, seed=SUBSET_SEED) if decode else listing

    train, test = split("train", data.train_subset, training), split("test", data.eval_subset)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{data.dataset}: empty split after subsetting")
    return train, test


def augment(x: torch.Tensor, *, pad: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` px, and random horizontal flips (x: (B, C, H, W))."""
    b, c, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    if hflip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def fgsm_random_start(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, gen: torch.Generator
) -> torch.Tensor:
    """Adversarial training input: uniform start in the Linf ball, one signed step of 1.25·eps."""
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1).mul_(eps).to(x.device)
    delta.requires_grad_(True)
    loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
    (grad,) = torch.autograd.grad(loss, delta)
    delta = (delta.detach() + 1.25 * eps * grad.sign()).clamp_(-eps, eps)
    return (x + delta).clamp_(0, 1)


def lr_schedule(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step LR factor: linear warm-up, then cosine annealing to zero.

    ``onecycle`` warms up over the first 25% of steps from lr/25 (Smith & Topin 2019); ``cosine``
    warms up over 5% from ~0. Written out (rather than OneCycleLR) so runs of a handful of steps work.
    """
    frac, start = (0.25, 1 / 25) if cfg.schedule == "onecycle" else (0.05, 0.0)
    warmup = max(1, round(frac * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1 - start) * (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class Tally:
    """Running training loss and accuracy of one epoch (floats, summed over ranks under torchrun)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss.item() * len(y)
        self.correct += int((logits.argmax(1) == y).sum())
        self.seen += len(y)

    def postfix(self) -> dict[str, str]:
        return {"loss": f"{self.loss_sum / self.seen:.3f}", "acc": f"{self.correct / self.seen:.3f}"}

    def summed(self, layout: Dist) -> Tally:
        """Totals over all ranks (the tally itself in a single process)."""
        if not layout.active:
            return self
        return Tally(*(layout.all_sum(v) for v in (self.loss_sum, self.correct, self.seen)))


def preprocess_metadata(data: DataConfig) -> dict[str, Any]:
    """How a model trained on an image folder wants that folder's photos prepared (loading the
    checkpoint restores it, so every later command decodes them the same way)."""
    return {"preprocess": asdict(training_preprocess(data.image_size))} if is_image_folder(data.dataset) else {}


GATE_MEAN_EXAMPLES = 10_000


def training_gate_means(model: nn.Module, train_set: Dataset) -> dict[str, torch.Tensor]:
    """Training-set mean excitation per gate (over a seeded subset of at most 10,000 images)."""
    from robustse.models.gates import find_gates
    from robustse.probes.capture import gate_means

    if not find_gates(model):
        return {}
    return gate_means(model, train_set.subset(GATE_MEAN_EXAMPLES, seed=SUBSET_SEED).x)
