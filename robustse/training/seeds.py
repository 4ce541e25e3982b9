"""Seed batching for training: the seeds of one architecture trained as one stacked network
(:mod:`robustse.models.stacked`), each member with its own initialization, data order, augmentation
draws, batch-norm statistics and optimizer state — the same per-seed streams as training it alone,
so twins stay paired — saved as ordinary per-seed checkpoints (README "Performance": seed batching).

A member equals training its seed alone up to float rounding: the stacked network computes each
member's forward and backward pass with grouped convolutions and block-diagonal matrix products
instead of the ordinary kernels, whose sums round differently (about 1e-7 per layer); over an
epoch of SGD these differences grow, so weights agree to rounding after one step and accuracies
(not weights) agree after a few epochs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from robustse.core.config import DataConfig, TrainConfig
from robustse.core.distributed import SINGLE
from robustse.data.base import Dataset
from robustse.models.stacked import StackedModel, stack_models
from robustse.training.train import (
    Tally,
    TrainJob,
    TrainResult,
    TrainRun,
    epoch_line,
    finished_result,
    load_splits,
    lr_schedule,
    make_output_folder,
    train_model,
)


def batchable(cfg: TrainConfig) -> bool:
    """Whether seeds of this configuration train batched: not with adversarial training (its
    attack step would run per member) or mixed precision (one loss scale would couple members)."""
    return cfg.adv_eps == 0 and not cfg.amp


def train_seeds(
    arch: str,
    *,
    outs: Sequence[Path],
    seeds: Sequence[int],
    data: DataConfig | None = None,
    train: TrainConfig | None = None,
    model_kwargs: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    splits: tuple[Dataset, Dataset] | None = None,
    on_epoch: Callable[[int, list[dict[str, float]]], None] | None = None,
) -> list[TrainResult]:
    """Train ``arch`` once per seed (checkpoint ``outs[i]`` for ``seeds[i]``), the unfinished seeds
    as one stacked network when there are at least two of them at the same epoch.

    Finished checkpoints are reused and resume states continue as in :func:`robustse.training.train.train_model`
    (the files are the same); seeds whose resume states stand at different epochs, and
    configurations :func:`batchable` refuses, train one at a time.
    """
    data, cfg = data or DataConfig(), train or TrainConfig()
    device = torch.device(device)
    jobs = [
        TrainJob(arch, Path(o), data, cfg, s, dict(model_kwargs or {}), device, SINGLE)
        for o, s in zip(outs, seeds, strict=True)
    ]
    results: list[TrainResult | None] = [finished_result(j) for j in jobs]
    todo = [i for i, r in enumerate(results) if r is None]
    if len(todo) >= 2 and batchable(cfg):
        train_set, test_set = splits if splits is not None else load_splits(data)
        runs = [TrainRun(jobs[i], train_set, test_set) for i in todo]
        for run in runs:
            run.load_resume_state(log)
        if len({run.start_epoch for run in runs}) == 1:
            done = _Batch(runs).train(progress=progress, log=log, on_epoch=on_epoch)
            for i, r in zip(todo, done, strict=True):
                results[i] = r
    for i, done_or_none in enumerate(results):
        if done_or_none is None:
            one = jobs[i]
            results[i] = train_model(
                arch, out=one.out, data=data, train=cfg, seed=one.seed, model_kwargs=one.model_kwargs,
                device=device, progress=progress, log=log, splits=splits,
            )  # fmt: skip
    return [r for r in results if r is not None]


class _Batch:
    """K runs of one configuration (different seeds) trained through one stacked network."""

    def __init__(self, runs: list[TrainRun]) -> None:
        self.runs = runs
        first = runs[0]
        cfg = first.job.cfg
        self.stacked: StackedModel = stack_models([r.model for r in runs]).to(first.job.device)
        if first.channels_last:  # as the members would have trained alone (and their metadata says)
            self.stacked.to_channels_last()
        self.opt = torch.optim.SGD(
            self.stacked.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
        self.sched = lr_schedule(cfg, self.opt, cfg.epochs * first.steps_per_epoch)
        self.names = [n for n, _ in self.stacked.net.named_parameters()]
        if first.start_epoch:  # resumed members: their optimizer and schedule continue
            self._load_member_optimizers()

    # ------------------------------------------------------------------ the loop

    def train(self, *, progress: bool, log: Callable[[str], None] | None, on_epoch: Any) -> list[TrainResult]:
        first = self.runs[0]
        for run in self.runs:
            make_output_folder(run.job.out)
        for epoch in range(first.start_epoch, first.job.cfg.epochs):
            t0 = time.perf_counter()
            tallies = self.train_one_epoch(epoch, progress=progress)
            records = self.end_epoch(epoch, tallies, t0)
            if log:
                for run, record in zip(self.runs, records, strict=True):
                    log(epoch_line(run.job, record))
            if on_epoch:
                on_epoch(epoch + 1, records)
        return [run.finish() for run in self.runs]

    def train_one_epoch(self, epoch: int, *, progress: bool) -> list[Tally]:
        """One pass over the training set, each member in its own seeded order."""
        gens = [torch.Generator().manual_seed(r.job.epoch_seed(epoch)) for r in self.runs]
        torch.manual_seed(self.runs[0].job.epoch_seed(epoch))  # global draws (none in robustse's models)
        perms = [
            torch.randperm(len(r.train_set), generator=g).to(r.job.device) for r, g in zip(self.runs, gens, strict=True)
        ]
        self.stacked.train()
        tallies = [Tally() for _ in self.runs]
        with self.runs[0]._progress_bar(epoch, progress) as bar:
            bar.set_description(
                f"{self.runs[0].job.arch} {len(self.runs)} seeds ep {epoch + 1}/{self.runs[0].job.cfg.epochs}"
            )
            for step in range(self.runs[0].steps_per_epoch):
                self._step(step, perms, gens, tallies, epoch)
                bar.update()
        return tallies

    def _step(
        self, step: int, perms: list[torch.Tensor], gens: list[torch.Generator], tallies: list[Tally], epoch: int
    ) -> None:
        """One SGD step of every member on its own batch."""
        batches = [r._inputs(r._batch_indices(p, step), g) for r, p, g in zip(self.runs, perms, gens, strict=True)]
        logits = self.stacked.member_logits(torch.stack([x for x, _ in batches]))  # (B, K, classes)
        losses = [F.cross_entropy(logits[:, k], y) for k, (_, y) in enumerate(batches)]
        for run, loss in zip(self.runs, losses, strict=True):
            run.check_loss(loss, epoch)
        self.opt.zero_grad(set_to_none=True)
        torch.stack(losses).sum().backward()  # each member's gradient is its own loss's
        self.opt.step()
        self.sched.step()
        for k, (tally, (_, y)) in enumerate(zip(tallies, batches, strict=True)):
            tally.add(losses[k].detach(), logits[:, k].detach(), y)

    def end_epoch(self, epoch: int, tallies: list[Tally], t0: float) -> list[dict[str, float]]:
        """Hand each member its weights, optimizer and schedule; evaluate and save its resume state."""
        records = []
        for k, run in enumerate(self.runs):
            run.model.load_state_dict(self.stacked.member_state(k))
            run.opt.load_state_dict(self._member_optimizer(k))
            run.sched.load_state_dict(self.sched.state_dict())
            records.append(run.evaluate(epoch, tallies[k], t0))
            run.save_resume_state()
        return records

    # ------------------------------------------------------------------ optimizer state per member

    def _member_optimizer(self, k: int) -> dict[str, Any]:
        """Member ``k``'s SGD state dict, as its own optimizer would hold it."""
        sd = self.opt.state_dict()
        state = {
            i: {key: self.stacked.member_tensor(self.names[i], v, k) if torch.is_tensor(v) and v.dim() else v
                for key, v in s.items()}
            for i, s in sd["state"].items()
        }  # fmt: skip
        return {"state": state, "param_groups": sd["param_groups"]}

    def _load_member_optimizers(self) -> None:
        """The stacked optimizer and schedule from the members' resumed ones."""
        member = [r.opt.state_dict() for r in self.runs]
        sd = self.opt.state_dict()
        for i in member[0]["state"]:
            buffers = [m["state"][i]["momentum_buffer"] for m in member]
            axis = self.stacked._axis[self.names[i]]
            sd["state"][i] = {"momentum_buffer": torch.cat(buffers, dim=axis)}
        sd["param_groups"] = member[0]["param_groups"]  # the learning rate where the schedule stands
        self.opt.load_state_dict(sd)
        self.sched.load_state_dict(self.runs[0].sched.state_dict())
