"""Training: seeded SGD (Nesterov) with a one-cycle or cosine schedule, light augmentation,
per-epoch evaluation and a resumable checkpoint after every epoch.

Optional fast adversarial training: FGSM with a uniform random start and step 1.25·eps
(Wong, Rice, Kolter, "Fast is better than free", ICLR 2020).

Every random choice of epoch ``e`` (shuffle, crops, flips, random starts) is drawn from a
generator seeded by ``(seed, e)``, so a run resumed after epoch ``e`` continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .checkpoint import load_checkpoint, read_metadata, save_checkpoint
from .config import DataConfig, TrainConfig
from .data import Dataset, dataset_info, load_dataset, to_float
from .distributed import SINGLE, Dist
from .errors import CheckpointError, DataError, ModelError, TrainingError
from .models import create_model

SUBSET_SEED = 0  # subsets are the same for every model seed: seeds vary init and order, not data


@dataclass
class TrainResult:
    """What :func:`train_model` produced."""

    model: nn.Module
    checkpoint: Path
    meta: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0  # > 0 when the run resumed; == epochs when it was already complete


def load_splits(data: DataConfig) -> tuple[Dataset, Dataset]:
    """Train and test splits of ``data``, with its seeded subsets applied."""
    train = load_dataset(data.dataset, split="train", root=data.data_root, download=data.download)
    test = load_dataset(data.dataset, split="test", root=data.data_root, download=data.download)
    train, test = train.subset(data.train_subset, seed=SUBSET_SEED), test.subset(data.eval_subset, seed=SUBSET_SEED)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{data.dataset}: empty split after subsetting")
    return train, test


@torch.no_grad()
def predict(
    model: nn.Module, ds: Dataset, *, batch_size: int = 512, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Predicted labels (N,) of ``model`` (put in eval mode) on all of ``ds``."""
    model.eval()
    preds = []
    for i in range(0, len(ds), batch_size):
        x = to_float(ds.x[i : i + batch_size].to(device))
        preds.append(model(x).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)


def evaluate_accuracy(
    model: nn.Module, ds: Dataset, *, batch_size: int = 512, device: torch.device | str = "cpu"
) -> float:
    """Top-1 accuracy of ``model`` on ``ds``."""
    return float((predict(model, ds, batch_size=batch_size, device=device) == ds.y).float().mean())


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


def _schedule(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
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


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_model(
    arch: str,
    *,
    out: Path,
    data: DataConfig | None = None,
    train: TrainConfig | None = None,
    seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    splits: tuple[Dataset, Dataset] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    layout: Dist = SINGLE,
) -> TrainResult:
    """Train ``arch`` and save it to ``out`` (a ``.safetensors`` checkpoint).

    Resumable: a ``<out>.resume.pt`` state is written after every epoch; rerunning with the same
    arguments continues from it, and a finished checkpoint with the same configuration is
    returned without training.

    Args:
        arch: registry name (``se_resnet20``) or ``torchvision:<name>``.
        out: checkpoint path.
        data: dataset and subsets (default: Fashion-MNIST, all of it).
        train: hyperparameters (default :class:`TrainConfig`).
        seed: seeds initialization, order, augmentation and random starts.
        model_kwargs: extra builder options (SE ``reduction``, ``squeeze``, ``gate``).
        device: where to train.
        progress: show a progress bar with loss and accuracy.
        log: receives one line per epoch.
        splits: preloaded (train, test) datasets, to skip loading.
        on_epoch: called as ``on_epoch(epoch, record)`` after each epoch is saved.
        layout: under torchrun (:mod:`robustse.distributed`), the model is wrapped in
            DistributedDataParallel and every global batch of ``batch_size`` is split over the
            ranks; rank 0 evaluates and writes the resume file and the checkpoint (the output
            folder must be shared by all ranks). Batch norm statistics are per rank.

    Returns:
        :class:`TrainResult` with the model in eval mode.

    Raises:
        DataError, ModelError, CheckpointError: bad input; TrainingError: non-finite loss.

    Example:
        >>> train_model("se_small_cnn", out=Path("m.safetensors"), train=TrainConfig(epochs=2))  # doctest: +SKIP
    """
    data, cfg = data or DataConfig(), train or TrainConfig()
    device = torch.device(device)
    model_kwargs = dict(model_kwargs or {})
    out = Path(out)
    fingerprint = json.dumps(
        {"arch": arch, "model_kwargs": model_kwargs, "data": asdict(data), "train": asdict(cfg), "seed": seed},
        sort_keys=True,
    )
    if out.exists():
        meta = read_metadata(out)
        if meta.get("fingerprint") == fingerprint:
            model, meta = load_checkpoint(out, map_location=device)
            return TrainResult(model, out, meta, list(meta.get("history", [])), start_epoch=cfg.epochs)

    reserved = sorted({"num_classes", "in_channels", "mean", "std"} & set(model_kwargs))
    if reserved:
        raise ModelError(f"{arch}: option {reserved[0]!r} is set from the dataset, not by model options")
    train_set, test_set = splits if splits is not None else load_splits(data)
    info = dataset_info(train_set.name)
    mean, std = train_set.channel_stats()
    torch.manual_seed(seed)
    model = create_model(
        arch, num_classes=train_set.num_classes, in_channels=train_set.in_channels, mean=mean, std=std, **model_kwargs
    )
    model.to(device)
    _check_input_fits(model, train_set, device)
    net: nn.Module = model  # what the training steps call: the model, or its DDP wrapper
    if layout.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")

    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
    )
    sched = _schedule(cfg, opt, cfg.epochs * steps_per_epoch)
    history: list[dict[str, float]] = []
    start_epoch = 0
    resume_path = out.with_name(out.name + ".resume.pt")
    if resume_path.exists():
        try:
            state = torch.load(resume_path, map_location=device, weights_only=True)
        except Exception:  # a torn or foreign file: start over rather than trust it
            state = None
        if state is not None and state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if state.get("scaler") and scaler.is_enabled():  # CUDA mixed precision: the loss scale continues
                scaler.load_state_dict(state["scaler"])
            history = json.loads(state["history"])
            start_epoch = int(state["epoch"])
            if log:
                log(f"{out.name}: resuming after epoch {start_epoch}/{cfg.epochs}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{out.parent}: cannot create output folder ({exc.strerror or exc})") from None

    x_train, y_train = train_set.x.to(device), train_set.y.to(device)
    pad = (4 if train_set.image_size[0] >= 32 else 2) if cfg.augment else 0  # crop padding in px
    test_acc = history[-1]["test_acc"] if history else float("nan")
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        torch.manual_seed(seed * 1_000_003 + epoch)  # dropout etc. draw globally: same on resume
        perm = torch.randperm(len(train_set), generator=gen).to(device)
        # augmentation draws: one stream in a single process; one per rank under torchrun
        aug_gen = (
            gen if not layout.active else torch.Generator().manual_seed(seed * 1_000_003 + epoch * 997 + layout.rank)
        )
        model.train()
        loss_sum, correct, seen = 0.0, 0.0, 0.0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{arch} s{seed} ep {epoch + 1}/{cfg.epochs}",
            disable=None if progress else True,  # None: off when stderr is not a terminal
            leave=False,
            unit="batch",
            dynamic_ncols=True,
        )
        for step in bar:
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            if layout.active:  # this rank's share of the global batch
                idx = idx[layout.rank :: layout.world]
            x, y = to_float(x_train[idx]), y_train[idx]
            if cfg.augment:
                x = augment(x, pad=pad, hflip=info.hflip, gen=aug_gen)
            if cfg.adv_eps > 0:
                x = fgsm_random_start(model, x, y, eps=cfg.adv_eps, gen=aug_gen)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                raise TrainingError(f"{arch} seed {seed}: loss became {loss.item()} at epoch {epoch + 1} (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        if layout.active:  # epoch totals over all ranks; rank 0 evaluates for everyone
            loss_sum, correct, seen = (layout.all_sum(v) for v in (loss_sum, correct, seen))
            test_acc = layout.broadcast(
                evaluate_accuracy(model, test_set, batch_size=cfg.eval_batch_size, device=device)
                if layout.is_main
                else None
            )
        else:
            test_acc = evaluate_accuracy(model, test_set, batch_size=cfg.eval_batch_size, device=device)
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_acc": test_acc,
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        if layout.is_main:
            _atomic_torch_save(
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "history": json.dumps(history),
                },
                resume_path,
            )
        layout.barrier()
        if log and layout.is_main:
            log(
                f"{arch} seed {seed} epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f} "
                f"train {record['train_acc']:.4f} test {test_acc:.4f} ({record['seconds']:.1f}s)"
            )
        if on_epoch:
            on_epoch(epoch + 1, record)

    model.eval()
    meta = {
        "dataset": train_set.name,
        "seed": seed,
        "epochs": cfg.epochs,
        "clean_accuracy": test_acc,
        "eval_examples": len(test_set),
        "train_examples": len(train_set),
        "train": asdict(cfg),
        "data": asdict(data),
        "history": history,
        "train_seconds": sum(r["seconds"] for r in history),
        "device": str(device),
        "fingerprint": fingerprint,
    }
    if layout.is_main:  # only rank 0 writes the checkpoint (the unwrapped model: no DDP sync)
        means = training_gate_means(model, train_set)
        if means:  # stored with the model for the frozen_mean intervention (DESIGN §6)
            meta["gate_means"] = {k: v.tolist() for k, v in means.items()}
        save_checkpoint(model, out, meta=meta)
        resume_path.unlink(missing_ok=True)
    layout.barrier()
    return TrainResult(model, out, read_metadata(out), history, start_epoch)


GATE_MEAN_EXAMPLES = 10_000


def training_gate_means(model: nn.Module, train_set: Dataset) -> dict[str, torch.Tensor]:
    """Training-set mean excitation per gate (over a seeded subset of at most 10,000 images)."""
    from .probes import find_gates, gate_means

    if not find_gates(model):
        return {}
    return gate_means(model, train_set.subset(GATE_MEAN_EXAMPLES, seed=SUBSET_SEED).x)


def _check_input_fits(model: nn.Module, ds: Dataset, device: torch.device) -> None:
    """One forward pass on two examples, so a size/channel mismatch fails early with one line."""
    try:
        with torch.no_grad():
            model.eval()
            model(to_float(ds.x[:2].to(device)))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"{ds.name} images {tuple(ds.x.shape[1:])} do not fit the model ({first})") from None
