"""Seed batching: training throughput of K seeds as one stacked network vs one seed at a time.

Both sides run the same SGD steps (forward, backward, optimizer step; batch 128 per member on
random Fashion-MNIST-shaped 1x28x28 inputs for every family) for K members, interleaved, ``--repeats``
times; prints the median images/s of each side and their ratio per family and K, for the stacked
network in the default memory layout and in channels_last.

    python benchmarks/seed_batching.py [--device cpu|cuda] [--ks 1,3,6,12] [--families small_cnn,resnet20]

Then sweep throughput: ``run_sweep`` over K seeds of one architecture (PGD-10, eps 0.03, probes
off, 256 images) with ``seed_batching`` on (one stacked network) and off (one model at a time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import robustse as rs
from robustse.models.stacked import stack_models


def members(family: str, k: int, device: torch.device) -> list[torch.nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(rs.create_model(family, in_channels=1).to(device).train())
    return out


def one_at_a_time(models: list[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
    for _ in range(steps):
        for k, (m, opt) in enumerate(zip(models, opts, strict=True)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x[k]), y[k]).backward()
            opt.step()


def stacked(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        logits = model.member_logits(x)
        torch.stack([F.cross_entropy(logits[:, k], y[k]) for k in range(x.shape[0])]).sum().backward()
        opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(family: str, k: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """Median images/s (one at a time, stacked, stacked channels_last) over interleaved repeats."""
    device = torch.device(args.device)
    models = members(family, k, device)
    big = stack_models(models).to(device).train()
    big_cl = stack_models(models).to(device).train().to_channels_last()
    x = torch.rand(k, args.batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (k, args.batch), device=device)
    runs = {
        "single": lambda: one_at_a_time(models, x, y, args.steps),
        "stacked": lambda: stacked(big, x, y, args.steps),
        "stacked_cl": lambda: stacked(big_cl, x, y, args.steps),
    }
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    images = k * args.batch * args.steps
    return tuple(images / statistics.median(times[name]) for name in runs)  # type: ignore[return-value]


def sweep_seconds(family: str, k: int, args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds of a sweep over K seeds, one model at a time and batched."""
    import tempfile
    from pathlib import Path

    from robustse.data.base import Dataset
    from robustse.experiment.sweep import SweepModel, build_attacks, run_sweep

    device = torch.device(args.device)
    models = [
        SweepModel(f"{family}_s{i}", m.eval(), "-", {"arch": family}) for i, m in enumerate(members(family, k, device))
    ]
    gen = torch.Generator().manual_seed(0)
    ds = Dataset("bench", "test", torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8, generator=gen),
                 torch.randint(0, 10, (256,), generator=gen), tuple(str(i) for i in range(10)))  # fmt: skip
    attacks = build_attacks([{"name": "pgd", "steps": 10}], norm="linf", seed=0, noise=False)
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for flag in (False, True):
                t0 = time.perf_counter()
                run_sweep(models, attacks, [0.03], ds, Path(tmp) / f"{flag}{r}", probes=False, progress=False,
                          device=device, seed_batching=flag)  # fmt: skip
                times[flag].append(time.perf_counter() - t0)
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--ks", default="1,3,6,12")
    p.add_argument("--families", default="small_cnn,resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"training, {args.device}, batch {args.batch} per member, {args.steps} steps, median of {args.repeats}")
    print(f"{'family':<12} {'K':>3} {'one at a time':>14} {'stacked':>9} {'ratio':>6} {'stacked cl':>11} {'ratio':>6}")
    for family in args.families.split(","):
        for k in (int(v) for v in args.ks.split(",")):
            single, batched, cl = measure(family, k, args)
            print(f"{family:<12} {k:>3} {single:>14.0f} {batched:>9.0f} {batched / single:>5.2f}x {cl:>11.0f} "
                  f"{cl / single:>5.2f}x", flush=True)  # fmt: skip
    print(f"\nsweep, {args.device}: PGD-10 at eps 0.03 on 256 images, probes off, median of {args.repeats}")
    print(f"{'family':<12} {'K':>3} {'one at a time':>14} {'batched':>9} {'ratio':>6}")
    for family in args.families.split(","):
        for k in (int(v) for v in args.ks.split(",")):
            one, together = sweep_seconds(family, k, args)
            print(f"{family:<12} {k:>3} {one:>13.2f}s {together:>8.2f}s {one / together:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
