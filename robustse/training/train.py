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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustse.core.config import DataConfig, TrainConfig
from robustse.core.distributed import SINGLE, Dist
from robustse.core.errors import CheckpointError, ModelError, TrainingError
from robustse.core.files import replace_file
from robustse.core.progress import Progress
from robustse.data.base import Dataset, to_float
from robustse.data.datasets import flips_keep_labels
from robustse.data.folder import absolute_name
from robustse.models import create_model
from robustse.models.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from robustse.training.compiled import compiled, compiles_training
from robustse.training.parts import (
    GATE_MEAN_EXAMPLES,
    SUBSET_SEED,
    Tally,
    augment,
    fgsm_random_start,
    load_splits,
    lr_schedule,
    preprocess_metadata,
    training_gate_means,
)
from robustse.training.predict import check_input_fits, evaluate_accuracy, predict

__all__ = [
    "Tally",
    "lr_schedule",
    "GATE_MEAN_EXAMPLES",
    "SUBSET_SEED",
    "TrainResult",
    "augment",
    "check_input_fits",
    "evaluate_accuracy",
    "fgsm_random_start",
    "load_splits",
    "predict",
    "train_model",
    "training_gate_means",
]


@dataclass
class TrainResult:
    """What :func:`train_model` produced."""

    model: nn.Module
    checkpoint: Path
    meta: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0  # > 0 when the run resumed; == epochs when it was already complete


def _atomic_torch_save(obj: Any, path: Path) -> None:
    replace_file(path, lambda fh: torch.save(obj, fh))


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
        layout: under torchrun (:mod:`robustse.core.distributed`), the model is wrapped in
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
    job = TrainJob(arch, Path(out), data, cfg, seed, model_kwargs, device, layout)
    finished = finished_result(job)
    if finished is not None:
        return finished
    _refuse_dataset_options(arch, model_kwargs)
    run = TrainRun(job, *(splits if splits is not None else load_splits(data)))
    run.load_resume_state(log)
    make_output_folder(job.out)
    for epoch in range(run.start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        tally = run.train_one_epoch(epoch, progress=progress)
        record = run.evaluate(epoch, tally, t0)
        run.save_resume_state()
        if log and layout.is_main:
            log(epoch_line(job, record))
        if on_epoch:
            on_epoch(epoch + 1, record)
    return run.finish()


# --------------------------------------------------------------------------- the steps of train_model


@dataclass(frozen=True)
class TrainJob:
    """The fixed inputs of one :func:`train_model` call."""

    arch: str
    out: Path
    data: DataConfig
    cfg: TrainConfig
    seed: int
    model_kwargs: dict[str, Any]
    device: torch.device
    layout: Dist

    @property
    def fingerprint(self) -> str:
        """What a finished checkpoint or a resume state must match to be reused."""
        data = asdict(self.data)
        if data["image_size"] is None:  # as before the setting existed: earlier checkpoints still match
            del data["image_size"]
        fields = {"arch": self.arch, "model_kwargs": self.model_kwargs, "data": data}
        train = {k: v for k, v in asdict(self.cfg).items() if k not in ("compile", "channels_last")}  # how, not what
        return json.dumps({**fields, "train": train, "seed": self.seed}, sort_keys=True)

    @property
    def resume_path(self) -> Path:
        return self.out.with_name(self.out.name + ".resume.pt")

    def epoch_seed(self, epoch: int) -> int:
        """Seed of every random draw of ``epoch`` (module docstring)."""
        return self.seed * 1_000_003 + epoch


def finished_result(job: TrainJob) -> TrainResult | None:
    """The finished checkpoint at ``job.out`` if it was trained with the same configuration."""
    if not job.out.exists() or read_metadata(job.out).get("fingerprint") != job.fingerprint:
        return None
    model, meta = load_checkpoint(job.out, map_location=job.device)
    return TrainResult(model, job.out, meta, list(meta.get("history", [])), start_epoch=job.cfg.epochs)


def _refuse_dataset_options(arch: str, model_kwargs: dict[str, Any]) -> None:
    reserved = sorted({"num_classes", "in_channels", "mean", "std"} & set(model_kwargs))
    if reserved:
        raise ModelError(f"{arch}: option {reserved[0]!r} is set from the dataset, not by model options")


def make_output_folder(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{out.parent}: cannot create output folder ({exc.strerror or exc})") from None


def _build_model(job: TrainJob, train_set: Dataset) -> nn.Module:
    """The seeded model for ``train_set``'s classes, channels and pixel statistics, on the device."""
    mean, std = train_set.channel_stats()
    torch.manual_seed(job.seed)
    model = create_model(
        job.arch,
        num_classes=train_set.num_classes,
        in_channels=train_set.in_channels,
        mean=mean,
        std=std,
        **job.model_kwargs,
    )
    model.to(job.device)
    check_input_fits(model, train_set, device=job.device)
    return model


def trains_channels_last(setting: str, device: torch.device) -> bool:
    """Whether training runs in channels_last layout: ``on``, or ``auto`` on a CPU (measured on a
    2-core CPU by ``benchmarks/layout_speed.py``, batch 128: ``small_cnn`` 1.47x, ``se_small_cnn``
    1.53x, ``static_small_cnn`` 1.42x; no GPU figure yet, so ``auto`` leaves CUDA as it was)."""
    return setting == "on" or (setting == "auto" and device.type == "cpu")


def _wrap(model: nn.Module, job: TrainJob) -> nn.Module:
    """What the training steps call: the model, or its DistributedDataParallel wrapper under torchrun."""
    if not job.layout.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[job.device.index] if job.device.type == "cuda" else None)


def _read_resume_state(path: Path, device: torch.device) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # a torn or foreign file: start over rather than trust it
        return None
    return state if isinstance(state, dict) else None


def _usable_resume_state(state: dict[str, Any], model: nn.Module, epochs: int) -> bool:
    """Whether a resume state has every part, of the right kind and shape, before any of it is loaded."""
    own = model.state_dict()
    weights = state.get("model")
    if not isinstance(weights, dict) or set(weights) != set(own):
        return False
    if any(not isinstance(v, torch.Tensor) or v.shape != own[k].shape for k, v in weights.items()):
        return False
    epoch = state.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= epochs:
        return False
    try:
        history = json.loads(state.get("history", ""))
    except (TypeError, ValueError, RecursionError):
        return False
    return isinstance(history, list) and all(isinstance(state.get(k), dict) for k in ("optimizer", "scheduler"))


def epoch_line(job: TrainJob, record: dict[str, float]) -> str:
    return (
        f"{job.arch} seed {job.seed} epoch {record['epoch']}/{job.cfg.epochs}: loss {record['loss']:.4f} "
        f"train {record['train_acc']:.4f} test {record['test_acc']:.4f} ({record['seconds']:.1f}s)"
    )


class TrainRun:
    """One training run: the model, optimizer, schedule, loss scaler and history, and its steps."""

    def __init__(self, job: TrainJob, train_set: Dataset, test_set: Dataset) -> None:
        self.job, self.train_set, self.test_set = job, train_set, test_set
        cfg, device = job.cfg, job.device
        self.hflip = flips_keep_labels(train_set.name)
        self.model = _build_model(job, train_set)
        self.channels_last = trains_channels_last(cfg.channels_last, device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.net = _wrap(self.model, job)
        self.amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
        self.steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
        self.compiled = compiles_training(
            cfg.compile, job.arch, device, steps=cfg.epochs * self.steps_per_epoch,
            single_process=not job.layout.active, plain_float=not cfg.amp and cfg.adv_eps == 0,
            channels_last=self.channels_last,
        )  # fmt: skip
        self.step_net = compiled(self.net) if self.compiled else self.net
        self.opt = torch.optim.SGD(
            self.model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
        self.sched = lr_schedule(cfg, self.opt, cfg.epochs * self.steps_per_epoch)
        self.history: list[dict[str, float]] = []
        self.start_epoch = 0
        self._on_device: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ resume state

    def load_resume_state(self, log: Callable[[str], None] | None) -> None:
        """Continue from ``<out>.resume.pt`` if it holds this configuration's state."""
        job = self.job
        state = _read_resume_state(job.resume_path, job.device)
        if state is None or state.get("fingerprint") != job.fingerprint:
            return
        if not _usable_resume_state(state, self.model, job.cfg.epochs):
            if log:
                log(f"{job.resume_path.name}: not a usable resume state (edited or foreign); training from the start")
            return
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():  # CUDA mixed precision: the loss scale continues
            self.scaler.load_state_dict(state["scaler"])
        self.history = json.loads(state["history"])
        self.start_epoch = int(state["epoch"])
        if log:
            log(f"{job.out.name}: resuming after epoch {self.start_epoch}/{job.cfg.epochs}")

    def save_resume_state(self) -> None:
        """Rank 0 writes the state after the latest epoch (atomically); every rank waits for it."""
        if self.job.layout.is_main:
            state = {
                "fingerprint": self.job.fingerprint,
                "epoch": self.history[-1]["epoch"],
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(),
                "history": json.dumps(self.history),
            }
            _atomic_torch_save(state, self.job.resume_path)
        self.job.layout.barrier()

    # ------------------------------------------------------------------ one epoch

    def train_one_epoch(self, epoch: int, *, progress: bool) -> Tally:
        """One pass over the training set in this epoch's seeded order."""
        job = self.job
        gen = torch.Generator().manual_seed(job.epoch_seed(epoch))
        torch.manual_seed(job.epoch_seed(epoch))  # dropout etc. draw globally: same on resume
        perm = torch.randperm(len(self.train_set), generator=gen).to(job.device)
        aug_gen = self._augmentation_generator(epoch, gen)
        self.model.train()
        tally = Tally()
        with self._progress_bar(epoch, progress) as bar:
            for step in range(self.steps_per_epoch):
                self._step(self._batch_indices(perm, step), aug_gen, epoch, tally)
                if step % 20 == 0:
                    bar.set_postfix(**tally.postfix())
                bar.update()
        return tally

    def _augmentation_generator(self, epoch: int, gen: torch.Generator) -> torch.Generator:
        """Augmentation draws: ``gen`` in a single process; one stream per rank under torchrun."""
        layout = self.job.layout
        if not layout.active:
            return gen
        return torch.Generator().manual_seed(self.job.seed * 1_000_003 + epoch * 997 + layout.rank)

    def _progress_bar(self, epoch: int, progress: bool) -> Progress:
        job = self.job
        desc = f"{job.arch} s{job.seed} ep {epoch + 1}/{job.cfg.epochs}"
        return Progress(self.steps_per_epoch, desc, show=progress and job.layout.is_main, leave=False)

    def _batch_indices(self, perm: torch.Tensor, step: int) -> torch.Tensor:
        size, layout = self.job.cfg.batch_size, self.job.layout
        idx = perm[step * size : (step + 1) * size]
        return idx[layout.rank :: layout.world] if layout.active else idx  # this rank's share

    def _inputs(self, idx: torch.Tensor, aug_gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch ``idx`` as floats, augmented and (adversarial training) perturbed."""
        cfg = self.job.cfg
        if self._on_device is None:  # the training set moves to the device once, as uint8
            self._on_device = (self.train_set.x.to(self.job.device), self.train_set.y.to(self.job.device))
        x_train, y_train = self._on_device
        x, y = to_float(x_train[idx]), y_train[idx]
        if cfg.augment:
            pad = 4 if self.train_set.image_size[0] >= 32 else 2  # crop padding in px
            x = augment(x, pad=pad, hflip=self.hflip, gen=aug_gen)
        if cfg.adv_eps > 0:
            x = fgsm_random_start(self.model, x, y, eps=cfg.adv_eps, gen=aug_gen)
        return x, y

    def _step(self, idx: torch.Tensor, aug_gen: torch.Generator, epoch: int, tally: Tally) -> None:
        """One SGD step on the batch ``idx`` (mixed precision if configured)."""
        job = self.job
        x, y = self._inputs(idx, aug_gen)
        with torch.autocast(job.device.type, dtype=self.amp_dtype, enabled=job.cfg.amp):
            logits = self.step_net(x)
            loss = F.cross_entropy(logits.float(), y)
        self.check_loss(loss, epoch)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        tally.add(loss, logits, y)

    def check_loss(self, loss: torch.Tensor, epoch: int) -> None:
        """A non-finite loss stops the run with one line naming the model, seed and epoch."""
        if not torch.isfinite(loss):
            job = self.job
            raise TrainingError(
                f"{job.arch} seed {job.seed}: loss became {loss.item()} at epoch {epoch + 1} (lower --lr?)"
            )

    # ------------------------------------------------------------------ evaluation and the end

    def evaluate(self, epoch: int, tally: Tally, t0: float) -> dict[str, float]:
        """Test accuracy after ``epoch`` (rank 0 evaluates for everyone); the epoch's history record."""
        layout = self.job.layout
        tally = tally.summed(layout)
        if layout.active:
            test_acc = layout.broadcast(self._test_accuracy() if layout.is_main else None)
        else:
            test_acc = self._test_accuracy()
        record = {
            "epoch": epoch + 1,
            "loss": tally.loss_sum / tally.seen,
            "train_acc": tally.correct / tally.seen,
            "test_acc": test_acc,
            "seconds": time.perf_counter() - t0,
        }
        self.history.append(record)
        return record

    def _test_accuracy(self) -> float:
        cfg = self.job.cfg
        return evaluate_accuracy(self.model, self.test_set, batch_size=cfg.eval_batch_size, device=self.job.device)

    def finish(self) -> TrainResult:
        """Rank 0 writes the checkpoint (the unwrapped model: no DDP sync) and drops the resume state."""
        job = self.job
        self.model.eval().to(memory_format=torch.contiguous_format)  # saved and handed back as built
        meta = self._metadata()
        if job.layout.is_main:
            means = training_gate_means(self.model, self.train_set)
            if means:  # stored with the model for the frozen_mean intervention (README "Metrics")
                meta["gate_means"] = {k: v.tolist() for k, v in means.items()}
            save_checkpoint(self.model, job.out, meta=meta)
            job.resume_path.unlink(missing_ok=True)
        job.layout.barrier()
        return TrainResult(self.model, job.out, read_metadata(job.out), self.history, self.start_epoch)

    def _metadata(self) -> dict[str, Any]:
        job, history = self.job, self.history
        return {
            "dataset": absolute_name(self.train_set.name),
            "seed": job.seed,
            "epochs": job.cfg.epochs,
            "clean_accuracy": history[-1]["test_acc"] if history else float("nan"),
            "eval_examples": len(self.test_set),
            "train_examples": len(self.train_set),
            "train": asdict(job.cfg),
            "data": asdict(job.data),
            "history": history,
            "train_seconds": sum(r["seconds"] for r in history),
            "device": str(job.device),
            "compiled": self.compiled,  # training steps ran through torch.compile
            "channels_last": self.channels_last,  # ... and in channels_last memory layout
            "fingerprint": job.fingerprint,
            **preprocess_metadata(job.data),
        }
