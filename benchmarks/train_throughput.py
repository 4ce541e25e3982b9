"""Training throughput (images/s) of each twin pair, SE vs plain, measured side by side.

Runs interleaved repeats (plain, SE, plain, SE, ...) of a fixed number of SGD steps on random
Fashion-MNIST-shaped batches, so machine noise hits both twins alike, and prints medians and the
SE/plain ratio (1.00 = SE costs nothing; 0.80 = SE trains 20% slower).

    python benchmarks/train_throughput.py [--steps 20] [--repeats 5] [--batch-size 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import robustse as rs
from robustse.core.device import resolve_device
from robustse.models import model_info


def images_per_second(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    model.train()
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--families", nargs="*", default=None, help="plain names (default: every twin family)")
    args = p.parse_args()
    device = resolve_device(args.device)
    families = args.families or [n for n in rs.list_models() if model_info(n).kind == "plain"]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {name}; batch {args.batch_size}; {args.steps} steps x {args.repeats} interleaved repeats")
    print(f"{'family':<12} {'plain img/s':>12} {'SE img/s':>10} {'SE/plain':>9}")
    for fam in families:
        torch.manual_seed(0)
        plain, se = rs.create_model(fam).to(device), rs.create_model(model_info(fam).twin).to(device)
        for m in (plain, se):  # warm-up
            images_per_second(m, x, y, 2)
        runs: dict[str, list[float]] = {"plain": [], "se": []}
        for _ in range(args.repeats):
            runs["plain"].append(images_per_second(plain, x, y, args.steps))
            runs["se"].append(images_per_second(se, x, y, args.steps))
        a, b = statistics.median(runs["plain"]), statistics.median(runs["se"])
        print(f"{fam:<12} {a:>12.0f} {b:>10.0f} {b / a:>9.2f}")


if __name__ == "__main__":
    main()
